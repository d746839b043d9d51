"""Study 6: side by side with SAELens (issue 7): same model, same tokens, same layer.

SAELens's `CacheActivationsRunner` needs equal-length pre-tokenised rows, so both sides get the same
fixed-length windows cut from the demo corpus (`pack_sequences`: only windows whose text re-tokenises to
the same ids, so our text manifest yields exactly those tokens; checked against our token plan and the
stored token ids). Each side runs in its own fresh subprocess (same torch thread count) so that its peak
RSS is its own:

* cache build: ours `build_store` (bf16 + blosc-zstd, the repo default) vs `CacheActivationsRunner`
  (`model_class_name="AutoModelForCausalLM"` on the local HF folder, hook = the block's module path, one
  model batch per buffer/shard, no shuffle). Time = the forward/write part (`BuildResult.seconds` vs
  `runner.run()`); model loading is reported separately.
* training: the same `Trainer` (no tier term: SAELens caches carry no tier labels) fed by our reader
  (`train_batches`, unbalanced) vs SAELens's own reader of its cache (`ActivationsStore` over the Arrow
  dataset + its `mixing_buffer`), same batch size and buffer rows.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from bench import saelens_recipe
from bench._common import Row, StudyResult
from bench._context import BenchContext
from bench._inputs import ModelRef, corpus_manifest, demo_texts, pack_sequences, write_jsonl
from bench._worker import run_task
from bra.sae.config import StreamConfig, TrainConfig

logger = logging.getLogger(__name__)

CONTEXT = {"smollm2": 128, "tiny-gemma": 32}


# ----------------------------------------------------------------------------------------- preparation


def prepare(ctx: BenchContext, ref: ModelRef) -> dict[str, Any]:
    """Windows, our manifest, SAELens's token dataset; verify our plan yields exactly these windows."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    from bra.pipeline.plan import plan_corpora

    cfg = ctx.cfg
    tok = AutoTokenizer.from_pretrained(str(ref.hf_dir))
    context = CONTEXT[ref.name]
    bos = tok.bos_token_id if ref.add_bos else None
    half = cfg.saelens_seqs // 2
    folder = ctx.work / f"saelens-{ref.name}"
    corpora, windows = {}, []
    for tier in ("hazard_adjacent", "benign"):
        ws, texts = pack_sequences(tok, [r["text"] for r in demo_texts(tier)], half, context, bos)
        corpora[tier] = write_jsonl(
            folder / f"{tier}.jsonl", [{"id": f"w{i}", "text": t} for i, t in enumerate(texts)]
        )
        windows += ws
    manifest = corpus_manifest(folder, ref, cfg, f"sl-{ref.name}", corpora, context)
    plan = plan_corpora(manifest, tok)
    if [w.ids.tolist() for w in plan.windows] != windows:
        raise AssertionError("our token plan differs from the packed windows")
    Dataset.from_dict({"input_ids": windows}).save_to_disk(str(folder / "tokens"))
    n_tokens = len(windows) * context
    buffer_tokens = saelens_buffer_tokens(cfg.batch_size * context, cfg.shard_tokens, n_tokens)
    return {
        "manifest": str(folder / f"sl-{ref.name}.yaml"),
        "store": str(folder / "ours.zarr"),
        "tokens": str(folder / "tokens"),
        "folder": str(folder),
        "hf_dir": str(ref.hf_dir),
        "hook_name": f"model.layers.{ref.layer}",
        "d_in": ref.d_model,
        "context": context,
        "n_tokens": n_tokens,
        "batch_size": cfg.batch_size,
        "buffer_tokens": buffer_tokens,
        "from_pretrained_kwargs": ref.from_pretrained_kwargs,
        "threads": ctx.threads,
        "device": cfg.device,
    }


def saelens_buffer_tokens(batch_tokens: int, shard_tokens: int, n_tokens: int) -> int:
    """SAELens's buffer (= its shard) in tokens: whole model batches, about our shard size, dividing the run
    (a last, partial buffer would be dropped by `CacheActivationsRunner` with a warning)."""
    if n_tokens % batch_tokens:
        raise ValueError(f"{n_tokens} tokens are not whole model batches of {batch_tokens}")
    n_batches = n_tokens // batch_tokens
    per = max(1, min(shard_tokens // batch_tokens, n_batches))
    while n_batches % per:
        per -= 1
    return per * batch_tokens


# -------------------------------------------------------------------------------------------- study


def _safe_worker(task: str, spec: dict[str, Any], isolate: bool) -> dict[str, Any]:
    try:
        return run_task(task, spec, isolate)
    except Exception as exc:  # recorded in the results, not fatal to the other sides
        logger.warning("%s failed: %s", task, exc)
        text = str(exc).strip()
        return {"error": f"{type(exc).__name__}: {text.splitlines()[-1] if text else ''}"}


def _compare_rows(spec: dict[str, Any], cache: str) -> dict[str, Any]:
    """Token ids equal? Activations equal after rounding theirs (fp32) to our bf16?"""
    import datasets

    from bra.cache import schema
    from bra.cache.store import open_store

    ours = open_store(spec["store"])
    theirs = datasets.load_from_disk(cache).with_format("numpy")
    tok_theirs = np.asarray(theirs["token_ids"]).reshape(-1)
    tok_ours = ours.array("token_id")[:]
    acts_theirs = np.asarray(theirs[spec["hook_name"]], dtype=np.float32).reshape(-1, spec["d_in"])
    raw_ours = ours.acts(ours.layers[0])[:]
    same_bits = schema.to_storage(acts_theirs, ours.dtype) == raw_ours
    diff = np.abs(schema.from_storage(raw_ours, ours.dtype) - acts_theirs)
    return {
        "token_ids_equal": bool(np.array_equal(tok_ours, tok_theirs)),
        "bf16_bits_equal_fraction": float(same_bits.mean()),
        "max_abs_diff_vs_bf16_store": float(diff.max()),
        "rms_activation": float(np.sqrt((acts_theirs.astype(np.float64) ** 2).mean())),
        "max_abs_activation": float(np.abs(acts_theirs).max()),
    }


def _merged(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Over repetitions: the best (smallest) of every time, the median of every other number (the runs
    themselves are kept under ``runs``); the first error when any repetition failed."""
    bad = [r for r in runs if "error" in r]
    if bad:
        return {**bad[0], "runs": runs}
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]

    def agg(k: str) -> float:
        values = [r[k] for r in runs]
        return float(min(values) if k in ("seconds", "wall") else np.median(values))

    return {**runs[0], **{k: agg(k) for k in keys}, "runs": runs}


def _paired(
    tasks: dict[str, tuple[str, dict[str, Any]]], reps: int, isolate: bool
) -> dict[str, dict[str, Any]]:
    """Run each (task, spec) ``reps`` times, alternating the order every repetition; see `_merged`."""
    names = list(tasks)
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r in range(reps):
        for n in names if r % 2 == 0 else names[::-1]:
            task, spec = tasks[n]
            runs[n].append(_safe_worker(task, spec, isolate))
    return {n: _merged(v) for n, v in runs.items()}


def side_by_side(ctx: BenchContext, ref: ModelRef) -> dict[str, Any]:
    """All workers for one model: builds (ours vs each SAELens dtype), row comparison, training reads."""
    cfg = ctx.cfg
    spec = prepare(ctx, ref)
    folder = Path(spec["folder"])
    first = cfg.saelens_dtypes[0]
    cache = str(folder / f"saelens-{first}")
    builds = {
        "ours_build": ("ours-build", spec),
        f"saelens_build_{first}": ("saelens-build", {**spec, "dtype": first, "out": cache}),
    }
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in builds}
    for rep in range(cfg.saelens_reps):  # alternating order; see _merged
        for k in list(builds) if rep % 2 == 0 else list(builds)[::-1]:
            if k != "ours_build":
                shutil.rmtree(cache, ignore_errors=True)  # SAELens refuses a non-empty output folder
            runs[k].append(_safe_worker(*builds[k], cfg.isolate))
    out: dict[str, Any] = {"spec": spec, **{k: _merged(v) for k, v in runs.items()}}
    for dtype in cfg.saelens_dtypes[1:]:
        out[f"saelens_build_{dtype}"] = _safe_worker(
            "saelens-build", {**spec, "dtype": dtype, "out": str(folder / f"saelens-{dtype}")}, cfg.isolate
        )
    if "error" not in out["ours_build"] and "error" not in out[f"saelens_build_{first}"]:
        out["rows_compared"] = _compare_rows(spec, cache)
    if "error" in out["ours_build"]:
        return out
    from bra.cache.store import open_store

    stats = open_store(spec["store"]).stats(ref.layer)
    tcfg = TrainConfig(
        d_sae=cfg.train_d_sae,
        k=cfg.sae_k,
        batch_size=cfg.train_batch,
        stream=StreamConfig(buffer_rows=cfg.train_buffer_rows),
        contrastive="none",
        contrastive_coef=0.0,
        balanced=False,
        heldout_fraction=0.0,
        device=cfg.device,
    )
    train = {
        **spec,
        "train_config": tcfg.to_dict(),
        "warmup": cfg.train_warmup,
        "steps": cfg.saelens_train_steps,
        "input_scale": float(np.sqrt(ref.d_model / stats["mean_sq_norm"])),
        "mean": list(stats["mean"]),
    }
    tasks = {"ours_train": ("ours-train", train)}
    if "error" not in out[f"saelens_build_{first}"]:
        tasks["saelens_train"] = ("saelens-train", {**train, "dtype": first, "cache": cache})
    out.update(_paired(tasks, cfg.saelens_reps, cfg.isolate))
    try:
        out["recipe"] = saelens_recipe.compare(spec["store"], saelens_recipe.recipe_of(cfg))
    except Exception as exc:  # recorded; the other numbers of this model stand
        logger.exception("same-recipe comparison on %s failed", ref.name)
        out["recipe"] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def run(ctx: BenchContext) -> StudyResult:
    """Every model of the config."""
    results: dict[str, dict[str, Any]] = {}
    rows: list[Row] = []
    for name in ctx.cfg.saelens_models:
        try:
            results[name] = side_by_side(ctx, ctx.ref(name))
            rows += _rows(name, results[name], ctx.cfg)
        except Exception as exc:  # one model's failure must not hide the other's numbers
            logger.exception("side by side on %s failed", name)
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            rows.append(
                Row("saelens", f"{name}: side by side", None, note=f"failed: {results[name]['error']}")
            )
    ok = {k: v for k, v in results.items() if "error" not in v}
    return StudyResult("saelens", "6. Side by side with SAELens", rows, results, _text(ok, ctx))


def _mib(r: dict[str, Any]) -> float:
    return (r["peak_rss"] - r["baseline_rss"]) / 2**20


def _rows(name: str, r: dict[str, Any], cfg: Any) -> list[Row]:
    spec, ours = r["spec"], r["ours_build"]
    first = cfg.saelens_dtypes[0]
    theirs = r.get(f"saelens_build_{first}", {})
    n = spec["n_tokens"]
    rows = []
    if "error" in theirs or "error" in ours:
        why = theirs.get("error") or ours.get("error")
        rows.append(
            Row(
                "saelens",
                f"{name}: cache build tokens/s, ours ÷ SAELens",
                None,
                "×",
                note=f"not measured: {why}",
            )
        )
        return rows
    rows += [
        Row(
            "saelens",
            f"{name}: cache build tokens/s, ours ÷ SAELens",
            round(theirs["seconds"] / ours["seconds"], 3),
            "×",
            note=f"ours {n / ours['seconds']:.0f} tok/s ({_ours_storage()}) vs SAELens "
            f"{n / theirs['seconds']:.0f} "
            f"tok/s ({first}); {n:,} tokens, forward/write part only",
        ),
        Row(
            "saelens",
            f"{name}: bytes on disk per token, ours ÷ SAELens",
            round(ours["disk_bytes"] / theirs["disk_bytes"], 3),
            "×",
            note=f"ours {ours['disk_bytes'] / n:.0f} vs SAELens {theirs['disk_bytes'] / n:.0f} B/token "
            f"({first}); whole folders (token ids, metadata included)",
        ),
        Row(
            "saelens",
            f"{name}: cache-build peak RSS above baseline, ours ÷ SAELens",
            round(_mib(ours) / max(_mib(theirs), 1e-9), 3),
            "×",
            note=f"ours {_mib(ours):.0f} MiB vs SAELens {_mib(theirs):.0f} MiB (model weights "
            "included on both sides)",
        ),
    ]
    ot, st = r.get("ours_train", {}), r.get("saelens_train", {})
    if "seconds" in ot and "seconds" in st:
        rows.append(
            Row(
                "saelens",
                f"{name}: SAE training steps/s from cache, our reader ÷ SAELens's reader (both our Trainer)",
                round(st["seconds"] / ot["seconds"], 3),
                "×",
                note=f"ours {ot['steps'] / ot['seconds']:.2f} vs SAELens {st['steps'] / st['seconds']:.2f} "
                f"steps/s; reader peak RSS above baseline ours {_mib(ot):.0f} MiB vs SAELens "
                f"{_mib(st):.0f} MiB",
            )
        )
    else:
        rows.append(
            Row(
                "saelens",
                f"{name}: SAE training steps/s from cache, our reader ÷ SAELens's reader (both our Trainer)",
                None,
                "×",
                note=f"not measured: {ot.get('error') or st.get('error') or 'a cache is missing'}",
            )
        )
    recipe = r.get("recipe", {})
    if "error" in recipe or not recipe:
        rows.append(Row("saelens", f"{name}: same recipe, ours ÷ SAELens TopK trainer", None,
                        note=f"not measured: {recipe.get('error', 'not run')}"))
    else:
        rows += saelens_recipe.rows(name, recipe)
    return rows


def _ours_storage() -> str:
    from bench.codecs import REPO_DEFAULT, label
    from bra.pipeline.manifest import StorageSpec

    return f"{StorageSpec().dtype}, {label(REPO_DEFAULT)}"


def _build_speed(results: dict[str, dict[str, Any]], cfg: Any) -> str:
    """The build-speed paragraph, from the measured numbers."""
    first = cfg.saelens_dtypes[0]
    parts = []
    for name, r in results.items():
        ours, theirs = r["ours_build"], r.get(f"saelens_build_{first}", {})
        if "seconds" not in ours or "seconds" not in theirs:
            continue
        ratio = theirs["seconds"] / ours["seconds"]
        verdict = (
            "within 10 %, i.e. within the run-to-run noise of this shared machine"
            if abs(ratio - 1) < 0.1
            else "ours faster"
            if ratio > 1
            else "SAELens faster"
        )
        parts.append(
            f"{name}: ours {r['spec']['n_tokens'] / ours['seconds']:.0f} vs SAELens "
            f"{r['spec']['n_tokens'] / theirs['seconds']:.0f} tok/s ({ratio:.2f}×, {verdict})"
        )
    return (
        "Both stop the forward pass after the hooked block, so on a real model both spend nearly all "
        "their time in the same truncated forward pass; "
        + "; ".join(parts)
        + f" (best of {cfg.saelens_reps} alternating runs each). What differs is around it: SAELens's "
        "`HookedProxyLM` puts a forward hook on every submodule of the HF model (hundreds of `HookPoint` "
        "calls per forward), collects a buffer, converts it to an Arrow table (`Dataset.from_dict`, a full "
        "copy) and saves it while the model waits; ours converts each batch to bf16 and hands whole shards "
        "to one writer thread (compression, CRC32, Welford partials), which overlaps the next forward pass "
        "but competes with it for the same cores."
    )


def _text(results: dict[str, dict[str, Any]], ctx: BenchContext) -> str:
    lines = [
        "| model | side | tokens | forward/write s | tok/s | setup s | B/token on disk | build peak RSS "
        "above baseline MiB | train steps/s | train peak RSS above baseline MiB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    notes: list[str] = []
    for name, r in results.items():
        n = r["spec"]["n_tokens"]
        sides = [(f"ours ({_ours_storage()})", r["ours_build"], r.get("ours_train", {}))]
        for i, dtype in enumerate(ctx.cfg.saelens_dtypes):
            sides.append(
                (
                    f"SAELens ({dtype})",
                    r.get(f"saelens_build_{dtype}", {}),
                    r.get("saelens_train", {}) if i == 0 else {},
                )
            )
        for side, b, t in sides:
            if "error" in b:
                lines.append(f"| {name} | {side} | {n:,} | failed: {b['error']} | | | | | | |")
                continue
            steps = f"{t['steps'] / t['seconds']:.2f}" if "seconds" in t else "—"
            tmib = f"{_mib(t):.0f}" if "peak_rss" in t else "—"
            lines.append(
                f"| {name} | {side} | {n:,} | {b['seconds']:.2f} | {n / b['seconds']:.0f} | "
                f"{b['load_seconds']:.1f} | {b['disk_bytes'] / n:.0f} | {_mib(b):.0f} | {steps} | {tmib} |"
            )
        cmp_ = r.get("rows_compared")
        if cmp_:
            notes.append(
                f"{name}: token ids identical on both sides: {cmp_['token_ids_equal']}; SAELens's fp32 rows "
                f"rounded to bf16 equal our stored bf16 bits for {cmp_['bf16_bits_equal_fraction']:.4%} of "
                f"values, i.e. both computed the same fp32 activations (max |diff| "
                f"{cmp_['max_abs_diff_vs_bf16_store']:.3g} is bf16 rounding: values reach "
                f"{cmp_['max_abs_activation']:.3g}, RMS {cmp_['rms_activation']:.3g})."
            )
    for note in notes:
        lines += ["", note]
    recipes = {k: v["recipe"] for k, v in results.items() if "summary" in v.get("recipe", {})}
    if recipes:
        lines += ["", "**Same recipe, our trainer vs SAELens's** (`bench/saelens_recipe.py`; per seed):", "",
                  saelens_recipe.table(recipes), "", _RECIPE]
    lines += ["", _EXPLAIN.format(build_speed=_build_speed(results, ctx.cfg))]
    return "\n".join(lines)


_RECIPE = (
    "Both trainers read the same batches (our reader, the plain preset's seeded order) and each seed's "
    "held-out documents are never trained on; FVU is one float64 formula over all held-out unmasked rows. "
    "Ours is `bra-sae fit --preset plain` (TopK-paper init with the encoder scale fitted on 4,096 training "
    "rows, b_dec = data mean, input scaled to mean squared "
    "norm d_model, normalised-MSE loss, AuxK, unit-norm decoder with gradient projection, AdamW, lr decaying "
    "to 0 over the last 20 % of steps); SAELens's is `TopKTrainingSAE` + `SAETrainer` with their defaults "
    "(decoder init norm 0.1, b_dec 0 subtracted from the input, activations rescaled by decoder norms, "
    "summed-MSE loss, Adam at constant lr, grad-norm clipping 1) and `normalize_activations="
    "\"expected_average_only_in\"` (its counterpart of our input scale). \"steps/s\" times the training "
    "loop only (the same reader on both sides), so it compares trainers; the reader row above compares "
    "readers under one trainer. The tier-term columns are our default preset (NT-Xent, balanced batches) on "
    "the same split: \"cos\" is the held-out cosine of the hazard and benign mean latent profiles (lower = "
    "more separated)."
)

_EXPLAIN = """Why the numbers differ:

* **Bytes.** SAELens writes uncompressed Arrow rows in the cache dtype (fp32 by default: 4 × d_model bytes
  per token, plus 4 for the token id); bf16 is impossible there (pyarrow has no bfloat16, and the failure
  comes only after the first buffer's forward passes), fp16 halves it. Ours stores bf16 bit patterns
  compressed with the repo's default codec, plus per-token columns (token id, doc, position, tier, segment,
  mask), per-shard checksums and statistics, and the document table.
* **Build speed.** {build_speed}
* **Tiny models.** When the forward pass costs next to nothing (the tiny Gemma2: d_model 64, 4 blocks),
  the comparison measures fixed costs instead: per shard ours writes a dozen small Zarr arrays (activations,
  six token columns, checksums, statistics, done flag) through Zarr's async layer, SAELens one Arrow file per
  buffer. "setup s" is everything outside the timed part: for ours, model load, tokenisation and the final
  document table/statistics; for SAELens, model load and its `ActivationsStore`.
* **Memory.** SAELens holds a whole buffer (`buffer_size_gb`, default 2 GB) of activations, plus its Arrow
  copy, before writing; here its buffer was set to one shard's worth of tokens, like ours, so the peaks are
  comparable. Ours holds at most two pending shards.
* **Training reads.** SAELens reads consecutive rows of a memory-mapped, uncompressed Arrow file (no
  decompression, already float) into its mixing buffer, shuffling only within that buffer; ours decompresses
  bf16 chunks in a seeded random chunk order in background threads, skips masked rows and mixes rows in its
  buffer. With a CPU SAE step of ~100 ms either reader is a small share of a step, so the training ratio
  in the table is mostly run-to-run noise; on a GPU, where a step takes milliseconds, the readers matter."""
