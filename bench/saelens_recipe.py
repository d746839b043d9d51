"""Study 6, same recipe: our trainer (`--preset plain`) vs SAELens's TopK trainer (`SAETrainer` +
`TopKTrainingSAE`) on the same store rows, same steps, batch, d_sae, k and lr, over several seeds (issue 18).

Both trainers read the same batches: our reader (`train_batches`, unbalanced, the plain preset's) in the
same seeded order, so the rows each step sees are identical and only the trainers differ. The held-out
documents (`training_data`'s split for that seed) are never trained on; FVU is measured on all their
unmasked rows with one formula for both SAEs (float64 sum of squared errors ÷ sum of squared deviations
from the held-out mean). Nothing is tuned here: each side keeps its own defaults for everything the recipe
does not fix.

* ours: `Trainer` exactly as `bra-sae fit --preset plain` builds it (`initial_sae`: TopK-paper init with
  the encoder scale fitted on a sample of training rows, b_dec = data mean,
  input scaled to mean squared norm d_model, normalised-MSE loss, AuxK 1/32, unit-norm decoder with the
  gradient projection, AdamW, the last 20 % of steps decaying lr linearly to 0).
* SAELens: `TopKTrainingSAE` with its defaults (`decoder_init_norm` 0.1, `apply_b_dec_to_input`, b_dec 0,
  `rescale_acts_by_decoder_norm`, summed-MSE loss, TopK AuxK) and `SAETrainer`'s defaults (Adam, constant
  lr, grad-norm clipping at 1), with `normalize_activations="expected_average_only_in"` (its counterpart of
  our input scale; its factor is estimated from 8 batches before the clock starts and folded in at the end).

The same trainings are timed (the training loop only; both wait on the same reader), which gives the
trainer-vs-trainer steps/s beside the reader-vs-reader row of study 6 (there both sides use our Trainer).
Our default preset (the NT-Xent tier term, balanced batches) is trained on the same split too: its
reconstruction cost is its FVU ÷ plain's, its separation gain the held-out cosine between the mean latent
profiles of hazard and benign rows (`losses.cosine_tier_separation`; lower is more separated).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from bench._common import fmt
from bra.cache.store import Store, open_store
from bra.sae import losses
from bra.sae.config import PRESETS, StreamConfig, TrainConfig
from bra.sae.data import TrainingData, check_finite, train_batches, training_data
from bra.sae.model import SAEConfig, TopKSAE
from bra.sae.train import initial_sae
from bra.sae.trainer import StoreInputs, Trainer

logger = logging.getLogger(__name__)

TARGET_FVU = "≤ 1.00"
TARGET_STEPS = "≥ 1.1"
NORM_BATCHES = 8
"""Batches SAELens's activation scaler estimates its factor from (its default, 1000, would read the
store many times over)."""


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What both trainers share."""

    steps: int
    batch: int
    d_sae: int
    k: int
    lr: float
    seeds: tuple[int, ...]
    heldout_fraction: float
    buffer_rows: int


def recipe_of(cfg: Any) -> Recipe:
    """The recipe of a bench config."""
    return Recipe(cfg.recipe_steps, cfg.recipe_batch, cfg.recipe_d_sae, cfg.sae_k, cfg.recipe_lr,
                  tuple(range(cfg.recipe_seeds)), cfg.recipe_heldout, cfg.train_buffer_rows)


def train_config(r: Recipe, seed: int, preset: str = "plain", device: str = "cpu") -> TrainConfig:
    """`bra-sae fit --preset <preset>` with the recipe's settings."""
    return TrainConfig(**{**PRESETS[preset], "d_sae": r.d_sae, "k": r.k, "lr": r.lr, "steps": r.steps,
                          "batch_size": r.batch, "seed": seed, "heldout_fraction": r.heldout_fraction,
                          "stream": StreamConfig(buffer_rows=r.buffer_rows), "device": device,
                          "contrastive_rows": min(512, r.batch), "log_every": max(r.steps, 1),
                          "checkpoint_every": max(r.steps, 1)})


def heldout_rows(store: Store, data: TrainingData) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [n, d_model] unmasked rows of the held-out documents, [n] bool hazard)."""
    doc = store.array("doc_index")[:]
    keep = ~store.array("mask")[:] & data.heldout[doc]
    if not keep.any():
        raise ValueError(f"store {store.path} has no held-out rows at this split")
    x = store.read_acts(data.layer, 0, store.n_tokens)[keep]
    return np.ascontiguousarray(x, dtype=np.float32), data.doc_hazard[doc[keep]]


def fvu(reconstruct: Callable[[torch.Tensor], torch.Tensor], x: np.ndarray) -> float:
    """Held-out FVU in float64: sum ||x - x_hat||² / sum ||x - mean(x)||²."""
    with torch.no_grad():
        x_hat = reconstruct(torch.from_numpy(x)).double().numpy()
    x64 = x.astype(np.float64)
    return float(((x64 - x_hat) ** 2).sum() / ((x64 - x64.mean(0)) ** 2).sum())


def separation(sae: TopKSAE, x: np.ndarray, hazard: np.ndarray) -> float | None:
    """Held-out cosine of the hazard and benign mean latent profiles (None when a tier is missing)."""
    if hazard.all() or not hazard.any():
        return None
    with torch.no_grad():
        z = sae.encode(torch.from_numpy(x))
        return float(losses.cosine_tier_separation(z, torch.from_numpy(hazard.astype(np.int64))))


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def ours(store: Store, r: Recipe, seed: int, preset: str = "plain") -> tuple[TopKSAE, float]:
    """Our SAE as `fit` builds and trains it; (SAE, seconds of the training loop)."""
    tcfg = train_config(r, seed, preset)
    data = training_data(store, None, tcfg.heldout_fraction, seed, False)
    scfg = SAEConfig(d_model=store.d_model, d_sae=r.d_sae, k=r.k, input_scale=data.input_scale)
    sae, _ = initial_sae(store, data, scfg, tcfg, torch.device("cpu"))
    batches = train_batches(store, data, r.batch, r.buffer_rows, seed, tcfg.balanced)
    try:
        trainer = Trainer(sae, StoreInputs(batches, torch.device("cpu")), tcfg, progress=False)
        _, seconds = _timed(trainer.fit)
    finally:
        batches.close()
    return sae, seconds


def _rows(store: Store, data: TrainingData, r: Recipe, seed: int) -> Iterator[torch.Tensor]:
    """The plain preset's batches (unbalanced, same seed) as float32 tensors, for SAELens."""
    batches = train_batches(store, data, r.batch, r.buffer_rows, seed, False)
    try:
        for batch, _ in batches:
            check_finite(batch)
            yield torch.from_numpy(batch.acts)
    finally:
        batches.close()


def saelens(store: Store, r: Recipe, seed: int) -> tuple[Any, float]:
    """SAELens's TopK SAE trained by its `SAETrainer` on the same batches; (SAE, seconds of `fit`)."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    warnings.filterwarnings("ignore", category=UserWarning)
    data = training_data(store, None, r.heldout_fraction, seed, False)
    torch.manual_seed(seed)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=store.d_model, d_sae=r.d_sae, k=r.k, device="cpu",
                                                normalize_activations="expected_average_only_in"))
    tcfg = SAETrainerConfig(total_training_samples=r.steps * r.batch, train_batch_size_samples=r.batch,
                            lr=r.lr, lr_end=r.lr / 10, device="cpu",  # lr_end: the runner's default
                            n_batches_for_norm_estimate=NORM_BATCHES)
    norm_rows = _rows(store, data, r, seed + 10_000)  # its own stream: the training batches stay the same
    trainer = SAETrainer(cfg=tcfg, sae=sae, data_provider=_rows(store, data, r, seed))
    trainer.activation_scaler.estimate_scaling_factor(store.d_model, norm_rows, NORM_BATCHES)
    norm_rows.close()
    with _quiet_tqdm():
        sae, seconds = _timed(trainer.fit)
    trainer.data_provider.close()  # type: ignore[attr-defined]
    return sae, seconds


class _quiet_tqdm:
    """SAETrainer always draws a tqdm bar; send it nowhere."""

    def __enter__(self) -> None:
        import sae_lens.training.sae_trainer as mod

        self.mod, self.orig = mod, mod.tqdm
        mod.tqdm = lambda *a, **kw: self.orig(*a, **{**kw, "disable": True})  # type: ignore[assignment]

    def __exit__(self, *_: object) -> None:
        self.mod.tqdm = self.orig  # type: ignore[assignment]


def _saelens_reconstruct(sae: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    def go(x: torch.Tensor) -> torch.Tensor:
        return sae.decode(sae.encode(x))

    return go


def compare(store_path: str, r: Recipe) -> dict[str, Any]:
    """Every seed: ours plain, SAELens, ours with the tier term (alternating the first two's order)."""
    store = open_store(store_path)
    per_seed = []
    for i, seed in enumerate(r.seeds):
        data = training_data(store, None, r.heldout_fraction, seed, False)
        x, hazard = heldout_rows(store, data)
        out: dict[str, Any] = {"seed": seed, "heldout_rows": len(x), "heldout_docs": int(data.heldout.sum())}
        order = ("ours", "saelens") if i % 2 == 0 else ("saelens", "ours")
        for side in order:
            if side == "ours":
                sae, secs = ours(store, r, seed)
                out["ours"] = {"fvu": fvu(lambda t, s=sae: s(t).x_hat, x), "seconds": secs,
                               "separation": separation(sae, x, hazard)}
            else:
                sl, secs = saelens(store, r, seed)
                out["saelens"] = {"fvu": fvu(_saelens_reconstruct(sl), x), "seconds": secs}
        tier, secs = ours(store, r, seed, preset="contrastive")
        out["ours_tier_term"] = {"fvu": fvu(lambda t, s=tier: s(t).x_hat, x), "seconds": secs,
                                 "separation": separation(tier, x, hazard)}
        per_seed.append(out)
        logger.info("recipe seed %d: %s", seed, {k: v for k, v in out.items() if isinstance(v, dict)})
    return {"recipe": dataclasses.asdict(r), "store": store_path, "d_model": store.d_model,
            "per_seed": per_seed, "summary": summarise(per_seed, r.steps)}


def _stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "min": float(a.min()), "max": float(a.max()),
            "sd": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": len(a)}


def summarise(per_seed: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    """Mean and spread over seeds of every ratio (each seed's ratio first: the seeds are paired)."""
    fvu_ratio = [s["ours"]["fvu"] / s["saelens"]["fvu"] for s in per_seed]
    tier_cost = [s["ours_tier_term"]["fvu"] / s["ours"]["fvu"] for s in per_seed]
    steps_ratio = [s["saelens"]["seconds"] / s["ours"]["seconds"] for s in per_seed]
    sep = [(s["ours"]["separation"], s["ours_tier_term"]["separation"]) for s in per_seed
           if s["ours"]["separation"] is not None]
    return {
        "fvu_ratio": _stats(fvu_ratio),
        "fvu_ours": _stats([s["ours"]["fvu"] for s in per_seed]),
        "fvu_saelens": _stats([s["saelens"]["fvu"] for s in per_seed]),
        "fvu_tier_term": _stats([s["ours_tier_term"]["fvu"] for s in per_seed]),
        "tier_term_fvu_cost": _stats(tier_cost),
        "separation_plain": _stats([a for a, _ in sep]) if sep else None,
        "separation_tier_term": _stats([b for _, b in sep]) if sep else None,
        "steps_ratio": _stats(steps_ratio),
        "best_steps_per_s": {"ours": steps / min(s["ours"]["seconds"] for s in per_seed),
                             "saelens": steps / min(s["saelens"]["seconds"] for s in per_seed)},
    }


def spread(st: dict[str, float], digits: int = 4) -> str:
    """'mean (min–max, n seeds)'."""
    return f"{st['mean']:.{digits}f} ({st['min']:.{digits}f}–{st['max']:.{digits}f}, {st['n']} seeds)"


def rows(name: str, res: dict[str, Any]) -> list[Any]:
    """Summary-table rows of one model's recipe comparison."""
    from bench._common import Row

    s, r = res["summary"], res["recipe"]
    geometry = (f"{r['steps']} steps × {r['batch']} rows, d_sae {r['d_sae']}, k {r['k']}, lr {r['lr']:g}; "
                f"held-out {res['per_seed'][0]['heldout_rows']:,} rows (seed 0)")
    best = s["best_steps_per_s"]
    out = [
        Row("saelens", f"{name}: held-out FVU, ours (--preset plain) ÷ SAELens TopK trainer, same recipe",
            round(s["fvu_ratio"]["mean"], 4), "×", TARGET_FVU,
            note=f"mean of per-seed ratios {spread(s['fvu_ratio'])}; ours {spread(s['fvu_ours'])} vs SAELens "
                 f"{spread(s['fvu_saelens'])}; {geometry}; same batches on both sides"),
        Row("saelens", f"{name}: SAE training steps/s, our Trainer ÷ SAELens's SAETrainer, same batches",
            round(s["steps_ratio"]["mean"], 3), "×", TARGET_STEPS,
            note=f"mean of per-seed ratios {spread(s['steps_ratio'], 3)}; best ours {best['ours']:.2f} vs "
                 f"SAELens {best['saelens']:.2f} steps/s; {geometry}"),
        Row("saelens", f"{name}: tier term's reconstruction cost, FVU default preset ÷ plain",
            round(s["tier_term_fvu_cost"]["mean"], 4), "×",
            note=f"{spread(s['tier_term_fvu_cost'])}; FVU with the NT-Xent term {spread(s['fvu_tier_term'])}"
                 + (f"; held-out cosine of hazard vs benign mean latent profiles (lower = more separated): "
                    f"plain {spread(s['separation_plain'], 3)}, with the term "
                    f"{spread(s['separation_tier_term'], 3)}" if s["separation_plain"] else "")),
    ]
    return out


def table(results: dict[str, dict[str, Any]]) -> str:
    """The recipe table of study 6's text."""
    lines = ["| model | seed | held-out rows | FVU ours (plain) | FVU SAELens | ratio | FVU ours (tier term) "
             "| cos plain | cos tier term | steps/s ours | steps/s SAELens |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, res in results.items():
        steps = res["recipe"]["steps"]
        for s in res["per_seed"]:
            o, sl, t = s["ours"], s["saelens"], s["ours_tier_term"]
            cos = [fmt(v) if v is not None else "—" for v in (o["separation"], t["separation"])]
            lines.append(f"| {name} | {s['seed']} | {s['heldout_rows']:,} | {o['fvu']:.4f} | "
                         f"{sl['fvu']:.4f} | {o['fvu'] / sl['fvu']:.4f} | {t['fvu']:.4f} | {cos[0]} | "
                         f"{cos[1]} | "
                         f"{steps / o['seconds']:.2f} | {steps / sl['seconds']:.2f} |")
    return "\n".join(lines)
