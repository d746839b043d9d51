"""Study 3: opt-in lossy fp8 (e4m3) storage, measured, not implemented in the product (issue 7).

fp8 e4m3fn (``ml_dtypes.float8_e4m3fn``, largest finite value 448) with an absmax scale per row or per
chunk of rows: q = fp8(x / s), x' = q * s, s = absmax / 448, the scale kept as fp32. Reported:

* bytes per token, raw and compressed with the repo's default codec, against the bf16 default;
* FVU of the stored vs exact activations, sum ||x - x'||² / sum ||x - mean||², over unmasked rows (masked
  attention-sink rows are kept in a store but never trained on);
* the cost downstream: two SAEs, identical seed, init and batch order, trained in RAM on the bf16-rounded
  and on the fp8-rounded training rows, each evaluated against the exact rows of held-out documents.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import ml_dtypes
import numpy as np
import torch

from bench._common import Row, StudyResult
from bench._context import BenchContext
from bench.codecs import REPO_DEFAULT, label, write_read
from bra.cache import schema
from bra.sae import losses
from bra.sae.config import TrainConfig
from bra.sae.model import SAEConfig, TopKSAE
from bra.sae.trainer import Trainer, TrainInput

logger = logging.getLogger(__name__)

E4M3_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)


def quantize_fp8(x: np.ndarray, block_rows: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(fp8 codes as uint8 [n, d], fp32 scales [n_blocks]); per row when ``block_rows`` is None."""
    n = x.shape[0]
    if block_rows is None:
        absmax = np.abs(x).max(axis=1)
        scale = np.where(absmax > 0, absmax / E4M3_MAX, 1.0).astype(np.float32)
        q = (x / scale[:, None]).astype(ml_dtypes.float8_e4m3fn)
    else:
        n_blocks = -(-n // block_rows)
        absmax = np.array([np.abs(x[i * block_rows : (i + 1) * block_rows]).max() for i in range(n_blocks)])
        scale = np.where(absmax > 0, absmax / E4M3_MAX, 1.0).astype(np.float32)
        q = (x / np.repeat(scale, block_rows)[:n, None]).astype(ml_dtypes.float8_e4m3fn)
    return q.view(np.uint8), scale


def dequantize_fp8(codes: np.ndarray, scale: np.ndarray, block_rows: int | None) -> np.ndarray:
    """Inverse of `quantize_fp8` (float32)."""
    x = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    per_row = scale if block_rows is None else np.repeat(scale, block_rows)[: len(x)]
    return x * per_row[:, None]


def fvu(stored: np.ndarray, exact: np.ndarray) -> float:
    """Fraction of variance unexplained by ``stored`` as a copy of ``exact``."""
    exact64 = exact.astype(np.float64)
    num = ((exact64 - stored.astype(np.float64)) ** 2).sum()
    den = ((exact64 - exact64.mean(axis=0)) ** 2).sum()
    return float(num / den)


def _disk_bytes(arrays: list[np.ndarray], cfg: Any, tmp: Any) -> int:
    """Bytes on disk of arrays written with the repo's default codec and geometry."""
    total = 0
    for i, a in enumerate(arrays):
        a2 = a if a.ndim == 2 else a[:, None]
        total += write_read(
            np.ascontiguousarray(a2), REPO_DEFAULT, cfg.chunk_tokens, cfg.shard_tokens, tmp / f"fp8-{i}"
        )[2]
    return total


def train_in_ram(x: np.ndarray, hazard: np.ndarray, doc: np.ndarray, cfg: TrainConfig, seed: int) -> TopKSAE:
    """Train with the product's `Trainer` on rows of ``x`` in a seeded order (same order for any x), at a
    constant learning rate."""
    d = x.shape[1]
    msn = float((x.astype(np.float64) ** 2).sum(axis=1).mean())
    sae_cfg = SAEConfig(d_model=d, d_sae=cfg.d_sae, k=cfg.k, input_scale=float(np.sqrt(d / msn)))
    sae = TopKSAE.init_random(sae_cfg, seed, torch.from_numpy(x.mean(axis=0)))
    X, H, D = (
        torch.from_numpy(x),
        torch.from_numpy(hazard.astype(np.int64)),
        torch.from_numpy(doc.astype(np.int64)),
    )

    def batches() -> Iterator[TrainInput]:
        rng = np.random.default_rng(seed)
        order, pos = rng.permutation(len(x)), 0
        while True:
            if pos + cfg.batch_size > len(order):
                order, pos = rng.permutation(len(x)), 0
            idx = torch.from_numpy(order[pos : pos + cfg.batch_size])
            pos += cfg.batch_size
            yield TrainInput(X[idx], H[idx], D[idx])

    Trainer(sae, batches(), dataclasses.replace(cfg, lr_decay_frac=0.0), progress=False).fit()
    return sae.eval()


@torch.no_grad()
def sae_fvu(sae: TopKSAE, exact: np.ndarray) -> float:
    """FVU of the SAE's reconstruction of exact rows."""
    x = torch.from_numpy(exact)
    return float(losses.fvu(sae(x).x_hat, x))


def run(ctx: BenchContext) -> StudyResult:
    """Quantise, measure bytes and FVU, train the two SAEs."""
    cfg = ctx.cfg
    _, act = ctx.ensure_store()
    tmp = ctx.work / "fp8"
    tmp.mkdir(exist_ok=True)
    x = act.acts
    # bytes on disk are measured on whole chunks (see bench.codecs); FVU on every row
    m = len(x) // cfg.chunk_tokens * cfg.chunk_tokens if len(x) >= cfg.chunk_tokens else len(x)
    n, d = x.shape
    keep = ~act.mask
    bf16 = schema.from_storage(schema.to_storage(x, "bfloat16"), "bfloat16")
    fp16 = x.astype(np.float16).astype(np.float32)
    variants: dict[str, dict[str, Any]] = {}
    for name, block in (
        ("fp8 e4m3, per-row scale", None),
        (f"fp8 e4m3, per-chunk scale ({cfg.chunk_tokens} rows)", cfg.chunk_tokens),
    ):
        codes, scale = quantize_fp8(x, block)
        deq = dequantize_fp8(codes, scale, block)
        variants[name] = {
            "x": deq,
            "raw_bytes": codes.nbytes + scale.nbytes,
            "disk_bytes": _disk_bytes([codes[:m], scale[: m if block is None else -(-m // block)]], cfg, tmp),
            "block_rows": block,
        }
    bf16_disk = _disk_bytes([schema.to_storage(x[:m], "bfloat16")], cfg, tmp)
    ref = {
        "bf16 (repo default)": {"x": bf16, "raw_bytes": n * d * 2, "disk_bytes": bf16_disk},
        "fp16": {"x": fp16, "raw_bytes": n * d * 2, "disk_bytes": None},
    }
    table = {}
    for name, v in {**ref, **variants}.items():
        table[name] = {
            "fvu_vs_exact": fvu(v["x"][keep], x[keep]),
            "fvu_vs_exact_all_rows": fvu(v["x"], x),
            "raw_bytes_per_token": v["raw_bytes"] / n,
            "disk_bytes_per_token": None if v["disk_bytes"] is None else v["disk_bytes"] / m,
        }

    # SAEs on bf16 vs per-row fp8 training rows; evaluated on exact held-out rows (split by document)
    heldout_doc = (act.doc_index % 5) == 0
    train_rows, test_rows = keep & ~heldout_doc, keep & heldout_doc
    tcfg = TrainConfig(
        d_sae=cfg.fp8_d_sae,
        k=min(cfg.sae_k, cfg.fp8_d_sae),
        steps=cfg.fp8_steps,
        batch_size=min(cfg.train_batch, int(train_rows.sum())),
        contrastive="none",
        balanced=False,
        dead_tokens=max(cfg.train_batch * 50, 1000),
        device="cpu",
    )
    fp8_row = next(iter(variants))
    sae_fvu_by = {}
    for name, xv in (("bf16", bf16), ("fp8 per-row", variants[fp8_row]["x"])):
        sae = train_in_ram(xv[train_rows], act.hazard[train_rows], act.doc_index[train_rows], tcfg, seed=0)
        sae_fvu_by[name] = sae_fvu(sae, x[test_rows])
    saved = 1 - table[fp8_row]["disk_bytes_per_token"] / table["bf16 (repo default)"]["disk_bytes_per_token"]
    rows = [
        Row(
            "fp8",
            "fp8 (per-row scale) bytes saved vs bf16 default, on disk",
            round(saved, 3),
            "fraction",
            note=f"{table[fp8_row]['disk_bytes_per_token']:.0f} vs "
            f"{table['bf16 (repo default)']['disk_bytes_per_token']:.0f} B/token (both "
            f"{label(REPO_DEFAULT)})",
        ),
        Row(
            "fp8",
            "FVU of fp8 (per-row) stored vs exact activations",
            float(f"{table[fp8_row]['fvu_vs_exact']:.3g}"),
            "",
            note=f"bf16: {table['bf16 (repo default)']['fvu_vs_exact']:.2g}, fp16: "
            f"{table['fp16']['fvu_vs_exact']:.2g}; unmasked rows",
        ),
    ]
    chunk_name = list(variants)[1]
    worse = table[chunk_name]["fvu_vs_exact"] / table[fp8_row]["fvu_vs_exact"]
    sink = float(np.abs(x[act.mask]).max() / np.abs(x[keep]).max()) if act.mask.any() else float("nan")
    rows.append(
        Row(
            "fp8",
            "FVU of fp8 (per-chunk scale) stored vs exact",
            float(f"{table[chunk_name]['fvu_vs_exact']:.3g}"),
            "",
            note=f"{worse:.1f}× the per-row FVU; largest |value| of masked (attention-sink) rows is "
            f"{sink:.1f}× that of the other rows, and one absmax per chunk covers both",
        )
    )
    rows.append(
        Row(
            "fp8",
            "SAE held-out FVU, trained on fp8 ÷ on bf16",
            round(sae_fvu_by["fp8 per-row"] / sae_fvu_by["bf16"], 4),
            "×",
            note=f"fp8 {sae_fvu_by['fp8 per-row']:.4f} vs bf16 {sae_fvu_by['bf16']:.4f} (d_sae "
            f"{tcfg.d_sae}, k {tcfg.k}, {tcfg.steps} steps of {tcfg.batch_size}; exact held-out rows)",
        )
    )
    details = {
        "n_tokens": n,
        "d_model": d,
        "variants": table,
        "sae_heldout_fvu": sae_fvu_by,
        "sae_train_config": tcfg.to_dict(),
        "per_chunk_vs_per_row_fvu": worse,
        "sink_absmax_ratio": sink,
        "n_train_rows": int(train_rows.sum()),
        "n_heldout_rows": int(test_rows.sum()),
    }
    return StudyResult(
        "fp8",
        "3. Opt-in lossy fp8 (e4m3) storage",
        rows,
        details,
        _text(table, sae_fvu_by, tcfg, worse, sink),
    )


def _text(
    table: dict[str, dict[str, Any]],
    sae_fvu_by: dict[str, float],
    tcfg: TrainConfig,
    worse: float,
    sink: float,
) -> str:
    lines = [
        "| storage | raw B/token | on-disk B/token | FVU vs exact (unmasked rows) | FVU incl. masked rows |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, r in table.items():
        disk = "—" if r["disk_bytes_per_token"] is None else f"{r['disk_bytes_per_token']:.0f}"
        lines.append(
            f"| {name} | {r['raw_bytes_per_token']:.0f} | {disk} | {r['fvu_vs_exact']:.3g} | "
            f"{r['fvu_vs_exact_all_rows']:.3g} |"
        )
    lines += [
        "",
        f"SAE trained in RAM with the product's `Trainer` (d_sae {tcfg.d_sae}, k {tcfg.k}, {tcfg.steps} "
        f"steps, no tier term), same seed and row order, evaluated on the exact rows of held-out documents: "
        f"bf16 {sae_fvu_by['bf16']:.4f}, fp8 per-row {sae_fvu_by['fp8 per-row']:.4f}.",
        "fp8 is not implemented in the store; if it is added it must stay opt-in and `bra-cache info` "
        "must say the store is lossy. " + _scale_verdict(worse, sink),
    ]
    return "\n".join(lines)


def _scale_verdict(worse: float, sink: float) -> str:
    """Per-chunk vs per-row scale, in words."""
    if worse > 1.5:
        return (
            f"Per-chunk scales cost {worse:.1f}× the per-row FVU here: one absmax per chunk is set by the "
            f"chunk's most extreme row (the masked attention-sink rows, still stored, reach {sink:.1f}× the "
            f"largest value of the other rows), which pushes every other row's small values towards fp8's "
            f"subnormal range. A per-row scale costs 4 bytes per token and avoids that."
        )
    return (
        f"Per-chunk scales cost {worse:.1f}× the per-row FVU here (the masked rows' largest value is "
        f"{sink:.1f}× the others'), so the cheaper per-chunk scale would do for this model."
    )
