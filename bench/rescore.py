"""Study 5: re-score time ÷ (rebuild + score) time on the same inputs (issue 5).

Rebuild = a fresh `build_store` of an eval manifest: load the model, generate greedy completions, run the
teacher-forced forward over prompt + completion, write the store. Score = `bra.audit.score.score` (catalog,
T, D, probes, AUROC table with bootstrap CIs and permutations, report.html with plots) reading only the
store. Re-score = the same `score` call again into a new folder (another SAE, catalog or threshold costs the
same). Module imports are warmed up before either clock starts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from bench._common import Row, StudyResult
from bench._context import BenchContext
from bench._inputs import EVAL_SET, ModelRef, storage_block, write_jsonl, write_manifest
from bra.audit.score import ScoreConfig, compute_scores, score
from bra.cache import schema
from bra.cache.store import open_store
from bra.cache.writer import write_table_atomic
from bra.pipeline.build import build_store
from bra.pipeline.manifest import Manifest
from bra.sae.formats import save_saelens
from bra.sae.model import SAEConfig, TopKSAE

logger = logging.getLogger(__name__)

TARGET = "≤ 0.05"
TIER_LABEL = {"benign_bio": "comply", "dual_use_bio": "hedge", "hazard_adjacent_category": "refuse"}
TOPICS = [
    "cells divide by mitosis",
    "photosynthesis makes sugar",
    "ribosomes read messenger RNA",
    "forests store carbon",
    "epidemiologists estimate outbreaks",
    "the smallpox eradication campaign",
    "biosafety level four laboratories",
    "the Biological Weapons Convention",
]


def eval_rows(ref: ModelRef, n_prompts: int) -> list[dict[str, Any]]:
    """SmolLM2: the bundled eval-demo prompts (``n_prompts`` of them, a third per tier; 0 = all 60).
    Tiny Gemma2: short generated prompts in the upstream format (its completions are random tokens)."""
    if ref.name == "smollm2":
        with open(EVAL_SET, encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
        if n_prompts:
            per = -(-n_prompts // len(TIER_LABEL))
            rows = [r for tier in TIER_LABEL for r in [x for x in rows if x["tier"] == tier][:per]]
        return rows
    framings = ["direct", "educational", "roleplay", "obfuscated"]
    per = -(-(n_prompts or 24) // len(TIER_LABEL))
    return [
        {
            "id": f"{tier[:3]}-{i}",
            "tier": tier,
            "framing": framings[i % 4],
            "prompt": f"Tell me about {TOPICS[i % len(TOPICS)]} ({tier.split('_')[0]} {i})",
            "rationale": "bench",
            "expected_surface": TIER_LABEL[tier],
            "category": "bench",
        }
        for tier in TIER_LABEL
        for i in range(per)
    ]


def eval_manifest(ctx: BenchContext, ref: ModelRef) -> Manifest:
    """An eval manifest like manifests/eval-demo.yaml over the chosen prompts."""
    cfg = ctx.cfg
    prompts = write_jsonl(ctx.work / "data" / "rescore-prompts.jsonl", eval_rows(ref, cfg.rescore_prompts))
    data = {
        "name": "bench-eval",
        "model": ref.manifest_model,
        "layers": [ref.layer],
        "max_seq_len": 160 if ref.name == "smollm2" else 128,
        "batch_size": cfg.batch_size,
        "storage": storage_block(cfg),
        "prompt_sets": [str(prompts)],
        "generation": {
            "max_new_tokens": cfg.rescore_new_tokens,
            "seed": 0,
            "batch_size": 12 if ref.name == "smollm2" else 8,
        },
    }
    return write_manifest(ctx.work / "bench-eval.yaml", data)


def labels_from_tiers(store: Path) -> None:
    """Tiny Gemma2 only: its random completions are all "unknown" to the rule labeller, which leaves T
    nothing to fit, so surface labels are set from the tier (as tests/test_score.py does)."""
    table = pd.read_parquet(store / schema.PROMPTS_TABLE)
    labels = [TIER_LABEL[t] for t in table["tier"]]
    from bra.vocab import SURFACE_CLASSES

    table["surface_label"] = labels
    table["surface_probs"] = [[0.8 if c == lab else 0.05 for c in SURFACE_CLASSES] for lab in labels]
    write_table_atomic(table, store / schema.PROMPTS_TABLE)


def scoring_sae(store_path: Path, d_sae: int, k: int, out: Path) -> Path:
    """A random TopK SAE for the store's model and layer, saved in SAELens format (its weights do not change
    what scoring costs; input scale from the store statistics as training would set it)."""
    store = open_store(store_path)
    layer = store.layers[0]
    msn = float(store.stats(layer)["mean_sq_norm"])
    cfg = SAEConfig(
        d_model=store.d_model,
        d_sae=d_sae,
        k=k,
        model_name=store.meta.model_id,
        hook_name=schema.hook_name(layer),
        layer=layer,
        input_scale=math.sqrt(store.d_model / msn),
    )
    mean = torch.tensor(store.stats(layer)["mean"], dtype=torch.float32)
    return save_saelens(TopKSAE.init_random(cfg, seed=0, data_mean=mean), out, overwrite=True)


def run(ctx: BenchContext) -> StudyResult:
    """Rebuild, score, re-score."""
    import matplotlib.pyplot  # noqa: F401

    import bra.audit.report  # noqa: F401  (warm imports: matplotlib, sklearn)

    cfg = ctx.cfg
    ref = ctx.ref()
    manifest = eval_manifest(ctx, ref)
    store = ctx.work / "eval.zarr"
    t0 = time.perf_counter()
    built = build_store(manifest, store, overwrite=True)
    t_build = time.perf_counter() - t0
    relabelled = ref.name != "smollm2"
    if relabelled:
        labels_from_tiers(store)
    sae = scoring_sae(store, cfg.rescore_d_sae, cfg.sae_k, ctx.work / "rescore-sae")
    score_cfg = ScoreConfig(n_boot=cfg.score_n_boot, n_perm=cfg.score_n_perm)
    t0 = time.perf_counter()
    report = score(store, sae, ctx.work / "score-0", score_cfg)
    t_score = time.perf_counter() - t0
    rescore = []
    for i in range(cfg.rescore_reps):
        t0 = time.perf_counter()
        score(store, sae, ctx.work / f"score-{i + 1}", score_cfg)
        rescore.append(time.perf_counter() - t0)
    t_rescore = min(rescore)
    ratio = t_rescore / (t_build + t_score)
    computes = []
    for _ in range(cfg.rescore_reps):
        t0 = time.perf_counter()
        compute_scores(store, sae, score_cfg)
        computes.append(time.perf_counter() - t0)
    t_compute = min(computes)
    n_prompts = len(pd.read_parquet(store / schema.PROMPTS_TABLE))
    note = (
        f"{ref.name}, {n_prompts} prompts, max_new_tokens {cfg.rescore_new_tokens}, {built.n_tokens:,} "
        f"stored tokens; rebuild {t_build:.1f} s + score {t_score:.1f} s vs re-score {t_rescore:.1f} s "
        f"(best of {len(rescore)}); SAE d_sae {cfg.rescore_d_sae}, ScoreConfig defaults but "
        f"n_boot {score_cfg.n_boot}, n_perm {score_cfg.n_perm}"
    )
    rows = [
        Row("rescore", "re-score ÷ (rebuild + score), same inputs", round(ratio, 4), "×", TARGET, note),
        Row(
            "rescore",
            "re-score time",
            round(t_rescore, 2),
            "s",
            note=f"computing the scores alone (`compute_scores`, timed separately, best of {len(computes)}): "
            f"{t_compute:.1f} s; the rest writes "
            f"scores.parquet, report.json, the plots and report.html",
        ),
    ]
    details = {
        "model": ref.name,
        "n_prompts": n_prompts,
        "n_tokens": built.n_tokens,
        "rebuild_seconds": t_build,
        "build_loop_seconds": built.seconds,
        "score_seconds": t_score,
        "rescore_seconds": rescore,
        "compute_scores_seconds": t_compute,
        "labels_from_tiers": relabelled,
        "score_config": dataclasses.asdict(score_cfg),
        "surface_classes_absent": report.get("alignment", {}).get("absent_classes"),
    }
    text = (
        f"{note}. The rebuild is dominated by greedy generation and the forward pass. Scoring itself "
        f"(`compute_scores`: read the store once, encode every token with the SAE and a random baseline SAE, "
        f"catalog, T, probes, AUROCs with {score_cfg.n_boot} bootstrap resamples and {score_cfg.n_perm} "
        f"permutations, the catalog's top-activating contexts decoded), timed on its own, took "
        f"{t_compute:.1f} s; the rest of the {t_rescore:.1f} s re-score writes the outputs (scores.parquet, "
        f"JSON, plots, report.html). The rebuild grows with prompts "
        f"× new tokens × model size while scoring stays nearly constant, so the ratio falls as the eval set "
        f"and model grow (the product eval, gemma-2-2b-it with up to 256 new tokens, rebuilds orders of "
        f"magnitude slower)."
        + (
            " Tiny Gemma2 completions are random tokens, so surface labels were set from the tier after the "
            "build (outside the clock), as the tests do."
            if relabelled
            else ""
        )
    )
    return StudyResult("rescore", "5. Re-score ÷ (rebuild + score)", rows, details, text)
