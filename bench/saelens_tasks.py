"""Worker tasks of the SAELens side-by-side (study 6): each runs in a fresh subprocess (``bench._worker``) so
that its peak RSS is its own. Our side: `build_store` and `train_batches`; SAELens's side: its
`CacheActivationsRunner` and its `ActivationsStore` reading its own cache. Both train with the product's
`bra.sae.trainer.Trainer`."""

from __future__ import annotations

import dataclasses
import gc
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench._common import PeakSampler, dir_bytes, max_rss_bytes, rss_bytes
from bra.sae.config import TrainConfig


def _device(name: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def _preimport(hf_dir: str) -> None:
    """Import what both sides load lazily (transformers, the model's class, the SAE trainer), so that the
    baseline RSS of each worker is taken after imports and the measured peak is the work itself."""
    from transformers import AutoConfig, AutoTokenizer  # noqa: F401
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    import bra.sae.train  # noqa: F401
    import bra.sae.trainer  # noqa: F401

    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(hf_dir))]


def ours_build_task(spec: dict[str, Any]) -> dict[str, Any]:
    """Worker: `build_store` of the packed-window manifest."""
    from bra.pipeline.build import build_store
    from bra.pipeline.manifest import load_manifest

    _preimport(spec["hf_dir"])
    torch.set_num_threads(int(spec["threads"]))
    manifest = load_manifest(spec["manifest"])
    gc.collect()
    baseline = rss_bytes()
    t0 = time.perf_counter()
    with PeakSampler() as sampler:
        res = build_store(manifest, Path(spec["store"]), overwrite=True)
    wall = time.perf_counter() - t0
    return {
        "seconds": res.seconds,
        "wall": wall,
        "load_seconds": wall - res.seconds,
        "n_tokens": res.n_tokens,
        "disk_bytes": dir_bytes(Path(spec["store"])),
        "baseline_rss": baseline,
        "peak_rss": sampler.peak,
        "ru_maxrss": max_rss_bytes(),
    }


def saelens_build_task(spec: dict[str, Any]) -> dict[str, Any]:
    """Worker: SAELens `CacheActivationsRunner` over the same windows."""
    import datasets
    from sae_lens import CacheActivationsRunner, CacheActivationsRunnerConfig

    warnings.filterwarnings(
        "ignore", category=UserWarning
    )  # "fewer samples than training tokens", tensor copy
    torch.set_num_threads(int(spec["threads"]))
    device = _device(spec["device"])
    dtype = spec["dtype"]
    bpt = spec["d_in"] * np.dtype(dtype).itemsize
    kwargs = {
        **spec["from_pretrained_kwargs"],
        "dtype": torch.bfloat16 if device == "cuda" else torch.float32,
    }
    cfg = CacheActivationsRunnerConfig(
        dataset_path=spec["tokens"],
        model_name=spec["hf_dir"],
        model_class_name="AutoModelForCausalLM",
        hook_name=spec["hook_name"],
        d_in=spec["d_in"],
        training_tokens=spec["n_tokens"],
        context_size=spec["context"],
        model_batch_size=spec["batch_size"],
        new_cached_activations_path=spec["out"],
        shuffle=False,
        dtype=dtype,
        device=device,
        buffer_size_gb=(spec["buffer_tokens"] + 0.5) * bpt / 1e9,
        prepend_bos=False,
        model_from_pretrained_kwargs=kwargs,
    )
    tokens = datasets.load_from_disk(spec["tokens"])
    gc.collect()
    baseline = rss_bytes()
    with PeakSampler() as sampler:
        t0 = time.perf_counter()
        runner = CacheActivationsRunner(cfg, override_dataset=tokens)
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        runner.run()
        run_s = time.perf_counter() - t0
    return {
        "seconds": run_s,
        "load_seconds": load_s,
        "wall": run_s + load_s,
        "n_tokens": spec["n_tokens"],
        "n_buffers": cfg.n_buffers,
        "tokens_per_buffer": cfg.n_tokens_in_buffer,
        "disk_bytes": dir_bytes(Path(spec["out"])),
        "baseline_rss": baseline,
        "peak_rss": sampler.peak,
        "ru_maxrss": max_rss_bytes(),
    }


def _train_loop(batches: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """Time the product's `Trainer` over batches of float32 rows from any iterator."""
    from bra.sae.model import SAEConfig, TopKSAE
    from bra.sae.trainer import Trainer, TrainInput

    tcfg = TrainConfig.from_dict(spec["train_config"])
    device = torch.device(_device(tcfg.device))
    d = spec["d_in"]
    sae = TopKSAE.init_random(
        SAEConfig(d_model=d, d_sae=tcfg.d_sae, k=tcfg.k, input_scale=spec["input_scale"]),
        tcfg.seed,
        torch.tensor(spec["mean"], dtype=torch.float32),
    ).to(device)
    zeros = torch.zeros(tcfg.batch_size, dtype=torch.int64, device=device)
    inputs = (TrainInput(x.to(device), zeros[: len(x)], zeros[: len(x)]) for x in batches)
    warmup, steps = spec["warmup"], spec["steps"]
    cfg = dataclasses.replace(tcfg, steps=warmup + steps, k_aux=tcfg.k_aux or d // 2)
    trainer = Trainer(sae, inputs, cfg, progress=False)
    trainer.fit(stop_at=warmup)
    t0 = time.perf_counter()
    trainer.fit()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - t0, "steps": steps}


def ours_train_task(spec: dict[str, Any]) -> dict[str, Any]:
    """Worker: train steps fed by our reader (`train_batches`, unbalanced)."""
    from bra.cache.store import open_store
    from bra.sae.data import check_finite, train_batches, training_data

    _preimport(spec["hf_dir"])
    torch.set_num_threads(int(spec["threads"]))
    tcfg = TrainConfig.from_dict(spec["train_config"])
    store = open_store(spec["store"])
    data = training_data(store, None, 0.0, tcfg.seed, False)

    def rows():
        buffer_rows = tcfg.stream.buffer_rows
        for batch, _ in train_batches(store, data, tcfg.batch_size, buffer_rows, tcfg.seed, False):
            check_finite(batch)
            yield torch.from_numpy(batch.acts)

    gc.collect()
    baseline = rss_bytes()
    with PeakSampler() as sampler:
        out = _train_loop(rows(), spec)
    return {**out, "baseline_rss": baseline, "peak_rss": sampler.peak}


def saelens_train_task(spec: dict[str, Any]) -> dict[str, Any]:
    """Worker: train steps fed by SAELens's reader of its own cache (ActivationsStore + mixing_buffer)."""
    from sae_lens.training.activations_store import ActivationsStore

    warnings.filterwarnings("ignore", category=UserWarning)
    _preimport(spec["hf_dir"])
    torch.set_num_threads(int(spec["threads"]))
    tcfg = TrainConfig.from_dict(spec["train_config"])
    context = spec["context"]
    store = ActivationsStore(
        model=None,
        dataset=None,
        streaming=False,
        hook_name=spec["hook_name"],
        hook_head_index=None,  # type: ignore[arg-type]
        context_size=context,
        d_in=spec["d_in"],
        n_batches_in_buffer=max(tcfg.stream.buffer_rows // context, 1),
        total_training_tokens=spec["n_tokens"],
        store_batch_size_prompts=spec["batch_size"],
        train_batch_size_tokens=tcfg.batch_size,
        prepend_bos=False,
        normalize_activations="none",
        device=torch.device("cpu"),
        dtype=spec["dtype"],
        cached_activations_path=spec["cache"],
    )

    def rows():
        while True:
            yield next(store).float()

    gc.collect()
    baseline = rss_bytes()
    with PeakSampler() as sampler:
        out = _train_loop(rows(), spec)
    return {**out, "baseline_rss": baseline, "peak_rss": sampler.peak}


TASKS = {
    "ours-build": ours_build_task,
    "saelens-build": saelens_build_task,
    "ours-train": ours_train_task,
    "saelens-train": saelens_train_task,
}
