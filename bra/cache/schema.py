"""The one place that names the store's arrays, dtypes, attrs and schema version.

Layout of a store (a Zarr v3 group; every reader and writer goes through this module)::

    STORE/
      zarr.json                  group attrs: provenance, status, statistics (see ATTR_* below)
      acts/layer_<L>             [n_tokens, d_model] residual stream after block L, storage dtype
      token_id, doc_index, position, tier, segment, mask     [n_tokens] per-token columns
      shards/done                [n_shards] uint8, 1 once the shard's rows are all written
      shards/crc32               [n_shards, n_columns] CRC32 of each column's raw bytes in the shard
      shards/rank                [n_shards] int16, the process (torch.distributed rank) that wrote the
                                 shard, -1 while not written; optional: stores made before it lack it
      shards/stats/layer_<L>/{count,sumsq,mean,m2}   per-shard Welford partials (float64)
      docs.parquet               per-document table (doc_index, doc_id, tier, source, n_tokens, ...)
      prompts.parquet            eval stores only: prompt, completion, surface labels

Rows are in document order (windows in order, positions in order). ``mask`` is True for rows that
training and statistics must skip: the first position of every window (the attention sink, whether
or not the tokenizer adds a BOS) and any BOS token. Padding is never stored.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from bra.vocab import SEGMENT_COMPLETION, SEGMENT_DOCUMENT, SEGMENT_NAMES, SEGMENT_PROMPT  # noqa: F401

SCHEMA_VERSION = 1

ACTS_GROUP = "acts"
SHARDS_GROUP = "shards"
DONE_ARRAY = "shards/done"
CRC_ARRAY = "shards/crc32"
RANK_ARRAY = "shards/rank"  # optional (added after schema 1 was first written); readers must not require it
STATS_GROUP = "shards/stats"
DOCS_TABLE = "docs.parquet"
PROMPTS_TABLE = "prompts.parquet"
# Eval stores: each prompt's chat-templated ids and its greedy completion's ids, written as soon as the store
# is created, so a resumed build reuses the completions (regenerating them could differ on a GPU).
GENERATION_TABLE = "generation.parquet"
GENERATION_COLUMNS = ("doc_index", "prompt_ids", "completion_ids", "text", "finished")

# Per-token columns, in the order their checksums are stored in CRC_ARRAY (activations follow).
TOKEN_COLUMNS: dict[str, str] = {
    "token_id": "int32",
    "doc_index": "int32",
    "position": "int32",
    "tier": "int8",
    "segment": "int8",
    "mask": "bool",
}


STATUS_CREATING = "creating"  # remote stores only: arrays being made (object stores cannot rename a folder)
STATUS_BUILDING = "building"
STATUS_COMPLETE = "complete"

# group attrs
ATTR_SCHEMA = "bra_schema_version"
ATTR_STATUS = "status"
ATTR_KIND = "kind"  # "corpus" or "eval"
ATTR_MODEL_ID = "model_id"
ATTR_MODEL_REVISION = "model_revision"
ATTR_LAYERS = "layers"
ATTR_HOOK_NAMES = "hook_names"
ATTR_D_MODEL = "d_model"
ATTR_DTYPE = "dtype"  # logical storage dtype: float32, float16, bfloat16
ATTR_COMPUTE_DTYPE = "compute_dtype"
ATTR_TOKENIZER_FP = "tokenizer_fingerprint"
ATTR_MANIFEST_HASH = "manifest_hash"
ATTR_MANIFEST = "manifest"
ATTR_DATASET_REVISIONS = "dataset_revisions"
ATTR_PACKAGE_VERSION = "package_version"
ATTR_TIER_NAMES = "tier_names"
ATTR_HAZARD_TIERS = "hazard_tiers"
ATTR_BENIGN_TIERS = "benign_tiers"  # the negative class beside hazard_tiers; absent in stores built before
ATTR_N_TOKENS = "n_tokens"
ATTR_N_DOCS = "n_docs"
ATTR_CHUNK_TOKENS = "chunk_tokens"
ATTR_SHARD_TOKENS = "shard_tokens"
ATTR_CODEC = "codec"
ATTR_STATS = "stats"  # {layer: {count, mean, var, mean_sq_norm}}, masked rows excluded
ATTR_CORPUS_COUNTS = "corpus_counts"
ATTR_DIGESTS = "attrs_digest"  # per-key digests written at completion, so verify can name an edited attr

REQUIRED_ATTRS = (
    ATTR_SCHEMA, ATTR_STATUS, ATTR_KIND, ATTR_MODEL_ID, ATTR_LAYERS, ATTR_HOOK_NAMES, ATTR_D_MODEL,
    ATTR_DTYPE, ATTR_TOKENIZER_FP, ATTR_MANIFEST_HASH, ATTR_TIER_NAMES, ATTR_N_TOKENS,
    ATTR_SHARD_TOKENS, ATTR_CHUNK_TOKENS,
)

# logical storage dtype -> numpy dtype on disk. Zarr has no bfloat16: it is stored as its bit pattern.
STORAGE_DTYPES: dict[str, str] = {"float32": "float32", "float16": "float16", "bfloat16": "uint16"}
DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "fp16": "float16", "f16": "float16", "half": "float16",
                 "bf16": "bfloat16"}

DOC_COLUMNS = ("doc_index", "doc_id", "tier", "tier_code", "corpus", "source", "n_tokens", "token_offset",
               "n_windows", "n_text_tokens")

# prompts.parquet (eval stores): one row per prompt; doc_index links it to docs.parquet and the token rows.
# surface_probs is a list in bra.pipeline.surface.SURFACE_CLASSES order (all zeros when the label is unknown).
PROMPT_COLUMNS = ("id", "tier", "framing", "category", "domain", "expected_surface", "prompt", "completion",
                  "n_prompt_tokens", "n_completion_tokens", "doc_index", "surface_label", "surface_probs",
                  "surface_matched", "finished", "rationale", "sampled_from")


def canonical_dtype(name: str) -> str:
    """Map a user spelling (bf16, fp16, float32, ...) to the logical dtype name, or raise ValueError."""
    name = DTYPE_ALIASES.get(name.lower(), name.lower())
    if name not in STORAGE_DTYPES:
        raise ValueError(f"unknown dtype {name!r} (expected one of {', '.join(STORAGE_DTYPES)})")
    return name


def attr_digests(attrs: dict[str, Any]) -> dict[str, str]:
    """Per-key digest of the attrs (the digest record itself excluded)."""
    return {k: hashlib.sha256(json.dumps(v, sort_keys=True).encode()).hexdigest()[:12]
            for k, v in sorted(attrs.items()) if k != ATTR_DIGESTS}


def acts_path(layer: int) -> str:
    """Array path of the activations of one hooked layer."""
    return f"{ACTS_GROUP}/layer_{layer}"


def stats_path(layer: int, field: str) -> str:
    """Array path of one per-shard statistics field of one layer."""
    return f"{STATS_GROUP}/layer_{layer}/{field}"


def hook_name(layer: int) -> str:
    """SAELens / TransformerLens name of the residual stream after block ``layer``."""
    return f"blocks.{layer}.hook_resid_post"


def column_names(layers: list[int]) -> list[str]:
    """Names whose per-shard CRC32 is stored, in CRC_ARRAY's column order."""
    return list(TOKEN_COLUMNS) + [acts_path(layer) for layer in layers]


def crc32(array: np.ndarray) -> int:
    """CRC32 of an array's raw C-order bytes."""
    return zlib.crc32(np.ascontiguousarray(array).view(np.uint8).reshape(-1)) & 0xFFFFFFFF


def to_storage(acts_f32: np.ndarray, dtype: str) -> np.ndarray:
    """Convert float32 activations to the on-disk representation of logical ``dtype``."""
    if dtype == "float32":
        return np.ascontiguousarray(acts_f32, dtype=np.float32)
    if dtype == "float16":
        return acts_f32.astype(np.float16)
    # bf16 with round-to-nearest-even, identical to torch's .to(torch.bfloat16)
    import ml_dtypes

    return acts_f32.astype(ml_dtypes.bfloat16).view(np.uint16)


def from_storage(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Decode on-disk activations of logical ``dtype`` to float32."""
    if dtype == "bfloat16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32, copy=False)


@dataclass(frozen=True)
class StoreLayout:
    """Sizes that fix where every row lives."""

    n_tokens: int
    """Total rows (tokens) in the store."""
    d_model: int
    """Width of the residual stream."""
    chunk_tokens: int
    """Rows per compressed inner chunk."""
    shard_tokens: int
    """Rows per shard file (a multiple of chunk_tokens); each writer owns whole shards."""

    def __post_init__(self) -> None:
        if self.n_tokens <= 0:
            raise ValueError("a store needs at least one token")
        if self.chunk_tokens <= 0 or self.shard_tokens <= 0 or self.shard_tokens % self.chunk_tokens:
            raise ValueError(
                f"shard_tokens ({self.shard_tokens}) must be a positive multiple of chunk_tokens "
                f"({self.chunk_tokens})"
            )

    @property
    def n_shards(self) -> int:
        """Number of shards along the token axis."""
        return -(-self.n_tokens // self.shard_tokens)

    def shard_bounds(self, shard: int) -> tuple[int, int]:
        """Row range [start, stop) of one shard."""
        start = shard * self.shard_tokens
        return start, min(start + self.shard_tokens, self.n_tokens)
