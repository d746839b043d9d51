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


def organism_base(model: str) -> str | None:
    """The base model id of a model organism folder (`bra.organism`), else None. A base model's SAE reads
    its organisms' activations by design: the known-depth study audits them with it."""
    from bra.organism.provenance import is_organism, load_provenance

    if not Path(model).is_dir() or not is_organism(model):
        return None
    base = load_provenance(model).get("base_model")
    return base.get("id") if isinstance(base, dict) else base


def check_compatible(sae: SparseAutoencoder, store: Store, layer: int) -> None:
    """Refuse an SAE trained for another model, layer or width than the store holds (any architecture)."""
    cfg = sae.cfg
    if cfg.d_model != store.d_model:
        raise SAEError(f"SAE d_model {cfg.d_model} does not match store {store.path} d_model {store.d_model}")
    model = store.meta.model_id
    if cfg.model_name and model and cfg.model_name != model and organism_base(model) != cfg.model_name:
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


def sample_windows(tier_W: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices (sorted) of min(n, len) windows of tiers ``tier_W``, random within each tier and spread evenly
    over the tiers: the smallest tiers first, each taking at most an equal share of what is left, so a tier
    with too few windows gives its share to the others."""
    rng = np.random.default_rng(seed)
    tiers, counts = np.unique(tier_W, return_counts=True)
    left = min(n, len(tier_W))
    picked = [np.zeros(0, np.int64)]
    for i, t in enumerate(np.argsort(counts, kind="stable")):
        take = min(int(counts[t]), left // (len(tiers) - i))
        picked.append(rng.choice(np.flatnonzero(tier_W == tiers[t]), take, replace=False))
        left -= take
    return np.sort(np.concatenate(picked))


def _ce_windows(store: Store, doc_selected: np.ndarray, max_windows: int, seed: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """(token ids, mask, tier of every row; the (start, stop) rows of the sampled windows)."""
    pos = store.read_rows("position", 0, store.n_tokens)
    doc = store.read_rows("doc_index", 0, store.n_tokens)
    masked = store.read_rows("mask", 0, store.n_tokens)
    tier = store.read_rows("tier", 0, store.n_tokens)
    starts = np.flatnonzero(pos == 0)
    ends = np.append(starts[1:], len(pos))
    eligible = [(int(s), int(e)) for s, e in zip(starts, ends, strict=True)
                if doc_selected[doc[s]] and e - s > 1 and not masked[s:e].all()]
    if not eligible:
        raise SAEError("no held-out windows for the CE-loss score")
    picked = sample_windows(np.array([tier[s] for s, _ in eligible]), max_windows, seed)
    return store.read_rows("token_id", 0, store.n_tokens), masked, tier, [eligible[i] for i in picked]


@torch.no_grad()
def ce_loss_score(sae: SparseAutoencoder, store: Store, layer: int, model: Any, doc_selected: np.ndarray,
                  max_windows: int = 64, seed: int = 0) -> dict[str, Any]:
    """CE-loss score: 1 - (CE_spliced - CE_clean) / (CE_zero - CE_clean), over stored token windows.

    Windows are rebuilt from the stored token ids (consecutive rows whose position restarts at 0), so
    only the model is needed, never the original text. Up to ``max_windows`` selected windows are drawn
    across the tiers (`sample_windows`, seeded): the first ones in store order would all be of one tier.
    The reconstruction (and the zero ablation) replaces the hook's output only at the store's unmasked
    positions: a masked row (position 0, the attention sink, or a BOS) is one the SAE never trained on, and
    its residual norm is typically far above the others' (massive activations, Sun et al. 2024).
    """
    from bra.pipeline.model import decoder_layers

    ids_all, masked, tier, windows = _ce_windows(store, doc_selected, max_windows, seed)
    block = decoder_layers(model)[layer]
    device = next(model.parameters()).device
    state: dict[str, Any] = {"mode": "clean", "keep": None}

    def hook(_m: Any, _i: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        if state["mode"] == "clean":
            return output
        keep = state["keep"]
        new = hidden.clone()
        new[:, keep] = 0 if state["mode"] == "zero" else sae(hidden[0, keep].float()).x_hat.to(hidden.dtype)
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

    totals = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
    n_tok = 0
    handle = block.register_forward_hook(hook)
    try:
        for s, e in windows:
            ids = torch.from_numpy(ids_all[s:e].astype(np.int64))[None].to(device)
            state["keep"] = torch.from_numpy(~masked[s:e]).to(device)
            for m in totals:
                state["mode"] = m
                logits = model(input_ids=ids).logits.float()
                totals[m] += float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:],
                                                                     reduction="sum"))
            n_tok += e - s - 1
    finally:
        handle.remove()
    ce = {k: v / n_tok for k, v in totals.items()}
    denom = ce["zero"] - ce["clean"]
    names = store.tier_names
    codes, per = np.unique([tier[s] for s, _ in windows], return_counts=True)
    return {"ce_clean": ce["clean"], "ce_spliced": ce["spliced"], "ce_zero": ce["zero"],
            "ce_loss_score": 1 - (ce["spliced"] - ce["clean"]) / denom if denom else float("nan"),
            "windows": len(windows),
            "windows_per_tier": {names[c]: int(k) for c, k in zip(codes, per, strict=True)},
            "positions_spliced": int(sum(int((~masked[s:e]).sum()) for s, e in windows))}
