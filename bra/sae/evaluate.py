"""`bra-sae eval`: FVU, L0, dead/dense fractions and per-tier reconstruction on the held-out documents,
and (with a model) the CE-loss score of splicing reconstructions back in at the hook."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from bra.cache.reader import document_split
from bra.cache.store import Store
from bra.errors import SAEError
from bra.sae.base import SparseAutoencoder, sae_device

logger = logging.getLogger(__name__)


def check_compatible(sae: SparseAutoencoder, store: Store, layer: int) -> None:
    """Refuse an SAE trained for another model, layer or width than the store holds (any architecture)."""
    cfg = sae.cfg
    if cfg.d_model != store.d_model:
        raise SAEError(f"SAE d_model {cfg.d_model} does not match store {store.path} d_model {store.d_model}")
    model = store.meta.model_id
    if cfg.model_name and model and cfg.model_name != model:
        raise SAEError(f"SAE was trained on {cfg.model_name}, store {store.path} holds {model}")
    if cfg.layer >= 0 and cfg.layer != layer:
        raise SAEError(f"SAE reads layer {cfg.layer} ({cfg.hook_name}), but layer {layer} was requested "
                       f"from store {store.path}")


def refuse_non_finite(x: np.ndarray, rows: np.ndarray, store: Store, what: str) -> None:
    """Raise SAEError naming the first store row of ``x`` [n, d_model] holding a NaN/inf (``rows``: the
    store row of each row of ``x``)."""
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        row = int(rows[np.flatnonzero(bad)[0]])
        raise SAEError(f"NaN/inf activation at store row {row} of {store.path}; refusing to {what} it")


def heldout_docs(store: Store, split_file: Path | None, fraction: float, seed: int) -> np.ndarray:
    """[n_docs] bool: the run's recorded held-out documents, or a fresh split with the same rule."""
    docs = store.docs()
    if split_file is not None and split_file.is_file():
        import json

        try:
            ids = set(json.loads(split_file.read_text())["heldout_doc_ids"])
        except (ValueError, KeyError, TypeError) as exc:  # malformed JSON, or not the split we write
            raise SAEError(f"{split_file} is not a readable split record ({type(exc).__name__}: {exc}); "
                           f"pass --split all or restore it") from None
        return docs["doc_id"].isin(ids).to_numpy()
    return document_split(docs, fraction, seed)


@torch.no_grad()
def reconstruction_metrics(sae: SparseAutoencoder, store: Store, layer: int, doc_selected: np.ndarray,
                           rows_per_read: int = 8192, dense_threshold: float = 0.1) -> dict[str, Any]:
    """Stream the selected documents' rows once and accumulate FVU (overall and per tier), L0, firing.

    A latent is active where it is non-zero (TopK, ReLU and JumpReLU latents are >= 0; the identity's are
    signed)."""
    tiers = store.tier_names
    sse = np.zeros(len(tiers))
    sum_x = np.zeros((len(tiers), store.d_model))
    sum_sq = np.zeros(len(tiers))
    count = np.zeros(len(tiers), dtype=np.int64)
    l0_sum = 0.0
    fires = torch.zeros(sae.cfg.d_sae, dtype=torch.int64)
    device = sae_device(sae)
    for start in tqdm(range(0, store.n_tokens, rows_per_read), desc="eval", unit="block", leave=False):
        stop = min(start + rows_per_read, store.n_tokens)
        keep = ~store.read_rows("mask", start, stop) & doc_selected[store.read_rows("doc_index", start, stop)]
        if not keep.any():
            continue
        x_np = store.read_acts(layer, start, stop)[keep]
        refuse_non_finite(x_np, start + np.flatnonzero(keep), store, "evaluate")
        x = torch.from_numpy(x_np).to(device)
        tier = store.read_rows("tier", start, stop)[keep]
        out = sae(x)
        err = ((out.x_hat - x) ** 2).sum(-1).double().cpu().numpy()
        xd = x.double().cpu().numpy()
        for t in np.unique(tier):
            sel = tier == t
            sse[t] += err[sel].sum()
            sum_x[t] += xd[sel].sum(0)
            sum_sq[t] += (xd[sel] ** 2).sum()
            count[t] += sel.sum()
        active = out.z != 0
        l0_sum += float(active.sum())
        fires += active.sum(0).cpu()

    def fvu(sel: np.ndarray) -> float | None:
        n = count[sel].sum()
        if n == 0:
            return None
        total_var = sum_sq[sel].sum() - (sum_x[sel].sum(0) ** 2).sum() / n
        return float(sse[sel].sum() / total_var)

    n = int(count.sum())
    if n == 0:
        raise SAEError(f"no rows to evaluate in store {store.path} (empty held-out split?)")
    freq = fires.double() / n
    return {
        "rows": n, "fvu": fvu(np.ones(len(tiers), bool)), "l0": l0_sum / n,
        "dead_frac": float((fires == 0).double().mean()),
        "dense_frac": float((freq > dense_threshold).double().mean()),
        "per_tier": {t: {"rows": int(count[i]), "fvu": fvu(np.arange(len(tiers)) == i)}
                     for i, t in enumerate(tiers) if count[i]},
    }


@torch.no_grad()
def ce_loss_score(sae: SparseAutoencoder, store: Store, layer: int, model: Any, doc_selected: np.ndarray,
                  max_windows: int = 64) -> dict[str, float]:
    """CE-loss score: 1 - (CE_spliced - CE_clean) / (CE_zero - CE_clean), over stored token windows.

    Windows are rebuilt from the stored token ids (consecutive rows whose position restarts at 0), so
    only the model is needed, never the original text.
    """
    from bra.pipeline.model import decoder_layers

    pos = store.read_rows("position", 0, store.n_tokens)
    ids_all = store.read_rows("token_id", 0, store.n_tokens)
    doc = store.read_rows("doc_index", 0, store.n_tokens)
    starts = np.flatnonzero(pos == 0)
    ends = np.append(starts[1:], len(pos))
    windows = [(s, e) for s, e in zip(starts, ends, strict=True)
               if doc_selected[doc[s]] and e - s > 1][:max_windows]
    if not windows:
        raise SAEError("no held-out windows for the CE-loss score")
    block = decoder_layers(model)[layer]
    device = next(model.parameters()).device
    mode: dict[str, str] = {"m": "clean"}

    def hook(_m: Any, _i: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        if mode["m"] == "clean":
            return output
        new = torch.zeros_like(hidden) if mode["m"] == "zero" else \
            sae(hidden[0].float()).x_hat.to(hidden.dtype)[None]
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

    totals = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
    n_tok = 0
    handle = block.register_forward_hook(hook)
    try:
        for s, e in windows:
            ids = torch.from_numpy(ids_all[s:e].astype(np.int64))[None].to(device)
            for m in totals:
                mode["m"] = m
                logits = model(input_ids=ids).logits.float()
                totals[m] += float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:],
                                                                     reduction="sum"))
            n_tok += e - s - 1
    finally:
        handle.remove()
    ce = {k: v / n_tok for k, v in totals.items()}
    denom = ce["zero"] - ce["clean"]
    return {"ce_clean": ce["clean"], "ce_spliced": ce["spliced"], "ce_zero": ce["zero"],
            "ce_loss_score": 1 - (ce["spliced"] - ce["clean"]) / denom if denom else float("nan"),
            "windows": len(windows)}
