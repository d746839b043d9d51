"""``bench/gpu.sh`` (``python -m bench.gpu``): the stage-one and training numbers on one CUDA device, at
gemma-2-2b's real widths, with no download (issue 18).

A ``Gemma2ForCausalLM`` with gemma-2-2b's widths (d_model 2304, MLP 9216, 8 heads of 256, 4 KV heads, vocab
256,000, soft-capping) and 13 random blocks (the build stops after block 12, so the other 13 never run) is
saved with the tests' small BPE tokenizer. On synthetic documents packed into fixed-length windows it
measures, interleaved and best of N where the budget allows:

* build tok/s (`build_store`, bf16 storage, default codec) and build ÷ bare forward (`forward_batch` over
  the same batches);
* the writer alone (study 10's `write_store`) in GB/s vs writer threads;
* SAE training steps/s at d_sae 6144, k 32, batch 4096 from the store (`train_batches`) and from RAM;
* SAELens's cache build (`CacheActivationsRunner`, float32) and training from its cache on the same model and
  windows, when ``sae_lens`` is importable;

and writes ``bench/results-gpu.md`` (plus ``.json``). Without a CUDA device it prints one line and exits 2.
``--smoke`` runs every step on the CPU at tiny widths, to test this script (its numbers mean nothing).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

logger = logging.getLogger("bench.gpu")

REPO = Path(__file__).resolve().parent.parent
GEMMA2_2B = {
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "vocab_size": 256_000,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "num_hidden_layers": 13,
}
SMOKE = {
    **GEMMA2_2B,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 512,
    "query_pre_attn_scalar": 16,
    "sliding_window": 64,
}
LAYER = 12
SMOKE_NOTE = "tiny smoke widths (CPU, fp32: these numbers mean nothing)"
WIDTHS_NOTE = "gemma-2-2b's widths"
NO_CUDA = (
    "error: bench/gpu.sh needs a CUDA device (torch.cuda.is_available() is False here); nothing was run "
    "and bench/results-gpu.md is unchanged"
)


def make_model(folder: Path, widths: dict[str, Any], device: str) -> Path:
    """Save a random Gemma2 of ``widths`` (bf16) with the tests' BPE tokenizer to ``folder``."""
    import torch
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

    from bra.testing import make_tiny_gemma

    if (folder / "config.json").is_file():
        return folder
    tiny = make_tiny_gemma(folder.parent / "tokenizer-source")
    AutoTokenizer.from_pretrained(str(tiny)).save_pretrained(folder)
    torch.manual_seed(0)
    cfg = Gemma2Config(
        **widths,
        max_position_embeddings=8192,
        attn_implementation="eager",
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    with torch.device(device):
        model = Gemma2ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(folder)
    del model
    return folder


def synthetic_texts(n_words: int, seed: int = 0) -> list[str]:
    """Documents of random words from the tests' sample sentences (the tokenizer knows their pieces)."""
    import numpy as np

    from bra.testing import SAMPLE_TEXT

    words = sorted({w for t in SAMPLE_TEXT for w in t.split()})
    rng = np.random.default_rng(seed)
    picks = rng.choice(words, size=n_words)
    return [" ".join(picks[i : i + 2000]) for i in range(0, n_words, 2000)]


def prepare(work: Path, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Fixed-length windows (BOS first) split over two tiers, our manifest over their texts, SAELens's token
    dataset of the same windows (checked: our plan yields exactly them)."""
    from transformers import AutoTokenizer

    from bench._inputs import pack_sequences, write_jsonl, write_manifest
    from bra.pipeline.plan import plan_corpora

    tok = AutoTokenizer.from_pretrained(str(folder))
    n_seqs = max(2, args.tokens // args.seq)
    windows, texts = pack_sequences(tok, synthetic_texts(args.tokens * 3), n_seqs, args.seq, tok.bos_token_id)
    half = n_seqs // 2
    corpora = {
        tier: write_jsonl(work / f"{tier}.jsonl", [{"id": f"w{i}", "text": t} for i, t in part])
        for tier, part in (
            ("hazard_adjacent", list(enumerate(texts))[:half]),
            ("benign", list(enumerate(texts))[half:]),
        )
    }
    manifest = write_manifest(
        work / "gpu.yaml",
        {
            "name": "gpu",
            "model": {"id": str(folder), "attn_implementation": "eager", "device": args.device},
            "layers": [LAYER],
            "max_seq_len": args.seq,
            "batch_size": args.batch,
            "add_bos": True,
            "storage": {"dtype": "bfloat16", "chunk_tokens": args.chunk, "shard_tokens": args.shard},
            "corpora": [
                {
                    "name": tier.split("_")[0],
                    "tier": tier,
                    "source": {"path": str(p), "text_field": "text", "id_field": "id"},
                }
                for tier, p in corpora.items()
            ],
        },
    )
    plan = plan_corpora(manifest, tok)
    if [w.ids.tolist() for w in plan.windows] != windows:
        raise AssertionError("our token plan differs from the packed windows")
    from datasets import Dataset

    Dataset.from_dict({"input_ids": windows}).save_to_disk(str(work / "tokens"))
    return {
        "manifest": manifest,
        "manifest_path": str(work / "gpu.yaml"),
        "tokens": str(work / "tokens"),
        "n_tokens": len(windows) * args.seq,
        "hf_dir": str(folder),
    }


def best_of(
    fns: dict[str, Callable[[], float]], reps: int
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Interleaved repetitions (bench._common.interleaved); the best of each side and every repetition."""
    from bench._common import interleaved

    times = interleaved(fns, reps)
    return {k: min(v) for k, v in times.items()}, times


def build_vs_bare(prep: dict[str, Any], work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """`build_store` (forward + write) and the bare forward over the same batches, interleaved."""
    import torch

    from bench.build_ratio import bare_forward, load_for_bare
    from bra.pipeline.build import build_store

    manifest, store = prep["manifest"], work / "gpu.zarr"

    def build() -> float:
        res = build_store(manifest, store, overwrite=True, writer_threads=args.writer_threads)
        return res.seconds

    def bare() -> float:
        setup = load_for_bare(manifest)
        seconds, _ = bare_forward(setup, keep=False)
        del setup
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return seconds

    best, times = best_of({"build": build, "bare": bare}, args.reps)
    if not store.exists():
        build()
    n = prep["n_tokens"]
    return {
        "store": str(store),
        "build_tok_s": n / best["build"],
        "bare_tok_s": n / best["bare"],
        "ratio": best["build"] / best["bare"],
        "seconds": times,
        "writer_threads": args.writer_threads or "default",
    }


def writer_alone(args: argparse.Namespace, work: Path, d_model: int) -> dict[str, Any]:
    """Study 10's write path alone at d_model 2304 (or the smoke width) vs writer threads."""
    from bench.writer import synthetic_rows, write_store
    from bra.dist import cpu_cores

    counts = sorted({1, 2, 4, 8, cpu_cores()} & set(range(1, cpu_cores() + 1)))
    n = args.writer_shards * args.shard
    block = synthetic_rows(min(n, args.shard), d_model)
    out: dict[str, Any] = {"n_tokens": n, "threads": {}}
    fns = {
        str(t): (
            lambda t=t: write_store(
                work / f"w{t}.zarr", block, n, args.chunk, args.shard, min(args.shard, 8192), t
            )[0]
        )
        for t in counts
    }
    best, _ = best_of(fns, args.reps)
    for t in counts:
        shutil.rmtree(work / f"w{t}.zarr", ignore_errors=True)
        out["threads"][t] = {"tok_s": n / best[str(t)], "gb_s": n * d_model * 2 / best[str(t)] / 1e9}
    return out


def train_config(args: argparse.Namespace, **overrides: Any) -> Any:
    """The TrainConfig of both training phases: the sizes on the command line, a shuffle buffer of at least
    4 batches, then ``overrides``."""
    from bra.sae.config import StreamConfig, TrainConfig

    return TrainConfig(d_sae=args.d_sae, k=args.k, batch_size=args.train_batch, device=args.device,
                       stream=StreamConfig(buffer_rows=max(4 * args.train_batch, 16384)), **overrides)


def training(store_path: str, args: argparse.Namespace) -> dict[str, Any]:
    """Steps/s from the store (`train_batches`, balanced, the product's default loss terms) and from RAM."""
    from bench.train_ratio import preload, steps_from_ram, steps_from_store
    from bra.cache.store import open_store
    from bra.sae.data import training_data

    store = open_store(store_path)
    tcfg = train_config(args, contrastive_rows=min(512, args.train_batch))
    data = training_data(store, None, tcfg.heldout_fraction, tcfg.seed, tcfg.shuffle_tiers)
    rows = preload(store, data)
    best, times = best_of(
        {
            "store": lambda: steps_from_store(store, data, tcfg, args.warmup, args.steps),
            "ram": lambda: steps_from_ram(store, data, tcfg, rows, args.warmup, args.steps),
        },
        args.reps,
    )
    return {
        "store_steps_s": args.steps / best["store"],
        "ram_steps_s": args.steps / best["ram"],
        "ratio": best["ram"] / best["store"],
        "seconds": times,
        "config": tcfg.to_dict(),
    }


def saelens(
    prep: dict[str, Any], work: Path, store_path: str, args: argparse.Namespace, d_model: int
) -> dict[str, Any]:
    """SAELens's cache build and training from its cache vs ours on the same windows (study 6's tasks)."""
    if importlib.util.find_spec("sae_lens") is None:
        return {"skipped": "sae_lens is not importable (pip install sae-lens)"}
    import numpy as np

    from bench.saelens_side import saelens_buffer_tokens
    from bench.saelens_tasks import ours_train_task, saelens_build_task, saelens_train_task
    from bra.cache.store import open_store

    n = prep["n_tokens"]
    cache = work / "saelens-cache"
    spec = {
        "tokens": prep["tokens"],
        "hf_dir": prep["hf_dir"],
        "hook_name": f"model.layers.{LAYER}",
        "d_in": d_model,
        "context": args.seq,
        "n_tokens": n,
        "batch_size": args.batch,
        "buffer_tokens": saelens_buffer_tokens(args.batch * args.seq, args.shard, n),
        "from_pretrained_kwargs": {"attn_implementation": "eager"},
        "threads": os.cpu_count() or 1,
        "device": args.device,
        "dtype": "float32",
        "out": str(cache),
    }
    shutil.rmtree(cache, ignore_errors=True)
    build = saelens_build_task(spec)
    stats = open_store(store_path).stats(LAYER)
    tcfg = train_config(args, contrastive="none", contrastive_coef=0.0, balanced=False, heldout_fraction=0.0)
    train = {
        **spec,
        "store": store_path,
        "cache": str(cache),
        "train_config": tcfg.to_dict(),
        "warmup": args.warmup,
        "steps": args.steps,
        "mean": list(stats["mean"]),
        "input_scale": float(np.sqrt(d_model / stats["mean_sq_norm"])),
    }
    best, _ = best_of(
        {
            "ours": lambda: ours_train_task(train)["seconds"],
            "saelens": lambda: saelens_train_task(train)["seconds"],
        },
        args.reps,
    )
    return {
        "build_tok_s": n / build["seconds"],
        "build_seconds": build["seconds"],
        "ours_steps_s": args.steps / best["ours"],
        "saelens_steps_s": args.steps / best["saelens"],
        "train_ratio": best["saelens"] / best["ours"],
        "config": tcfg.to_dict(),
    }


def markdown(res: dict[str, Any]) -> str:
    """results-gpu.md from what has been measured so far (a section not reached says so)."""
    m = res["machine"]
    lines = [
        "# BioRefusalAudit on one GPU",
        "",
        f"Generated by `{res['command']}` on {res['date']} (commit {m['git_commit']}), "
        f"{res.get('seconds', 0):.0f} s so far{' (finished)' if res.get('finished') else ''}. "
        f"**Machine:** {m['gpu']}; {m['cpu_model']}, {m['cores']} cores, {m['memory_gib']} GiB RAM; load at "
        f"start {m['load_average_at_start'][0]}. Model: random Gemma2 at "
        f"{SMOKE_NOTE if res.get('smoke') else WIDTHS_NOTE} "
        f"({res['widths']['hidden_size']} d_model, {res['widths']['num_hidden_layers']} blocks, hooked block "
        f"{LAYER}), {'fp32' if res.get('smoke') else 'bf16'} compute, eager attention; "
        f"{res.get('n_tokens', 0):,} tokens in windows of "
        f"{res['seq']}, batch {res['batch']} windows. Best of {res['reps']} interleaved reps per side.",
        "",
        "| measurement | value |",
        "| --- | ---: |",
    ]
    b, w, t, s = (res.get(k) for k in ("build", "writer", "training", "saelens"))
    if b is None:
        lines.append("| build | not measured (not reached) |")
    else:
        lines += [
            f"| build throughput (forward + write, bf16 store, writer threads {b['writer_threads']}) | "
            f"{b['build_tok_s']:,.0f} tok/s |",
            f"| bare forward to block {LAYER} | {b['bare_tok_s']:,.0f} tok/s |",
            f"| build ÷ bare forward (time) | {b['ratio']:.3f} × |",
        ]
    if w is None:
        lines.append("| writer alone | not measured (not reached) |")
    else:
        lines += [
            f"| writer alone, {n} thread(s) | {r['gb_s']:.2f} GB/s ({r['tok_s']:,.0f} tok/s) |"
            for n, r in w["threads"].items()
        ]
    if t is None:
        lines.append("| SAE training | not measured (not reached) |")
    else:
        lines += [
            f"| SAE training from the store (d_sae {t['config']['d_sae']}, k {t['config']['k']}, batch "
            f"{t['config']['batch_size']}) | {t['store_steps_s']:.2f} steps/s |",
            f"| SAE training from RAM | {t['ram_steps_s']:.2f} steps/s |",
            f"| store ÷ RAM steps/s | {t['ratio']:.3f} × |",
        ]
    if s is None:
        lines.append("| SAELens | not measured (not reached) |")
    elif "skipped" in s or "error" in s:
        lines.append(f"| SAELens | not measured: {s.get('skipped') or s.get('error')} |")
    else:
        lines += [
            f"| SAELens cache build (float32; bf16 is impossible there) | {s['build_tok_s']:,.0f} tok/s |",
            f"| SAE training steps/s from cache, ours ÷ SAELens (no tier term, unbalanced) | "
            f"{s['train_ratio']:.3f} × ({s['ours_steps_s']:.2f} vs {s['saelens_steps_s']:.2f}) |",
        ]
    return "\n".join(lines) + "\n"


def save(res: dict[str, Any], out: Path, t0: float) -> None:
    """Write both result files now (after every phase: a run cut off by its time limit keeps its numbers)."""
    res["seconds"] = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(res), encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str) + "\n", encoding="utf-8")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/gpu.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results-gpu.md")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp folder)")
    p.add_argument("--tokens", type=int, default=1 << 19, help="tokens of the build (default 524,288)")
    p.add_argument("--seq", type=int, default=1024, help="window length")
    p.add_argument("--batch", type=int, default=32, help="windows per forward pass")
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--shard", type=int, default=16384)
    p.add_argument("--writer-threads", type=int, default=None, help="build's writer threads (default: bra's)")
    p.add_argument("--writer-shards", type=int, default=8, help="shards each writer-alone side writes")
    p.add_argument("--d-sae", type=int, default=6144)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--train-batch", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=50, help="timed training steps per repetition")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument(
        "--smoke",
        action="store_true",
        help="run every step on the CPU at tiny widths (tests this script; numbers mean nothing)",
    )
    args = p.parse_args(argv)
    args.device = "cpu" if args.smoke else "cuda"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)  # noqa: T201 - the one line a user sees
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    from bench._common import load_average, machine_record

    t0 = time.perf_counter()
    widths = SMOKE if args.smoke else GEMMA2_2B
    own = args.work is None
    work = Path(tempfile.mkdtemp(prefix="bra-gpu-")) if own else args.work
    work.mkdir(parents=True, exist_ok=True)
    try:
        res: dict[str, Any] = {
            "command": "bench/gpu.sh " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": machine_record(torch.get_num_threads(), REPO),
            "widths": widths,
            "seq": args.seq,
            "batch": args.batch,
            "reps": args.reps,
            "smoke": args.smoke,
        }
        folder = make_model(work / "gemma2-2b-random", widths, args.device)
        prep = prepare(work, folder, args)
        res["n_tokens"] = prep["n_tokens"]
        res["build"] = build_vs_bare(prep, work, args)
        save(res, args.out, t0)
        res["writer"] = writer_alone(args, work, widths["hidden_size"])
        save(res, args.out, t0)
        res["training"] = training(res["build"]["store"], args)
        save(res, args.out, t0)
        try:
            res["saelens"] = saelens(prep, work, res["build"]["store"], args, widths["hidden_size"])
        except Exception as exc:  # SAELens's failure must not hide our numbers
            logger.exception("SAELens side failed")
            res["saelens"] = {
                "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            }
        res["load_average_at_end"], res["finished"] = load_average(), True
        save(res, args.out, t0)
        logger.info("wrote %s in %.0f s", args.out, res["seconds"])
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
