"""The one place that names the store's arrays, dtypes, attrs and schema version.

Layout of a store (a Zarr v3 group; every reader and writer goes through this module)::

    STORE/
      zarr.json                  group attrs: provenance (StoreAttrs), status, statistics, digests
      acts/layer_<L>             [n_tokens, d_model] residual stream after block L, storage dtype
      scales/layer_<L>           [n_tokens] float32 per-row scale of a scaled dtype (fp8 stores only):
                                 a row reads back as its codes x its scale
      token_id, doc_index, position, tier, segment, mask     [n_tokens] per-token columns
      shards/done                [n_shards] uint8, 1 once the shard's rows are all written
      shards/crc32               [n_shards, n_columns] CRC32 of each column's raw bytes in the shard
      shards/rank                [n_shards] int16, the process (torch.distributed rank) that wrote the
                                 shard, -1 while not written; optional: stores made before it lack it
      shards/stats/layer_<L>/{count,sumsq,mean,m2}   per-shard Welford partials (float64)
      docs.parquet               per-document table (doc_index, doc_id, tier, source, n_tokens, ...)
      prompts.parquet            eval stores only: prompt, completion, surface labels
      generation.parquet         eval stores only: templated prompt ids, completion ids (read by a resume)

Rows are in document order (windows in order, positions in order). ``mask`` is True for rows that
training and statistics must skip: the first position of every window (the attention sink, whether
or not the tokenizer adds a BOS) and any BOS token. Padding is never stored.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from bra.errors import StoreError
from bra.vocab import SEGMENT_COMPLETION, SEGMENT_DOCUMENT, SEGMENT_NAMES, SEGMENT_PROMPT  # noqa: F401

SCHEMA_VERSION = 1

ACTS_GROUP = "acts"
SCALES_GROUP = "scales"  # stores of a scaled (lossy) dtype only: one float32 scale per row and layer
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
# Stores of a generation variant (attr ``variant`` set): both tables gain these columns after their own
# (before the prompt sets' metadata in prompts.parquet): the prefill as written ("" when none) and how many
# leading completion ids are its tokens. Stores without a variant lack them.
VARIANT_COLUMNS = ("prefill", "n_prefill_tokens")

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
ATTR_DTYPE = "dtype"  # logical storage dtype: float32, float16, bfloat16, float8_e4m3
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
ATTR_TOKENS_DIGEST = "tokens_digest"  # CRC32 of every planned token id: a resume refuses an edited corpus
ATTR_VARIANT = "variant"  # eval stores of a generation variant; absent otherwise (and in stores built before)
ATTR_EDIT = "edit"  # eval stores generated under a residual edit (`bra-sae intervene`); absent otherwise
ATTR_DIGESTS = "attrs_digest"  # per-key digests written at completion, so verify can name an edited attr

REQUIRED_ATTRS = (
    ATTR_SCHEMA, ATTR_STATUS, ATTR_KIND, ATTR_MODEL_ID, ATTR_LAYERS, ATTR_HOOK_NAMES, ATTR_D_MODEL,
    ATTR_DTYPE, ATTR_TOKENIZER_FP, ATTR_MANIFEST_HASH, ATTR_TIER_NAMES, ATTR_N_TOKENS,
    ATTR_SHARD_TOKENS, ATTR_CHUNK_TOKENS,
)

# logical storage dtype -> numpy dtype on disk. Zarr has no bfloat16 and no fp8: they are stored as their bit
# patterns (uint16, uint8).
STORAGE_DTYPES: dict[str, str] = {"float32": "float32", "float16": "float16", "bfloat16": "uint16",
                                  "float8_e4m3": "uint8"}
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")
"""The dtypes a forward pass may run in (``model.compute_dtype``); fp8 is a storage dtype only."""
SCALED_DTYPES = frozenset({"float8_e4m3"})
"""Storage dtypes kept as codes plus one float32 scale per row (``scales/layer_<L>``): lossy, opt-in."""
DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "fp16": "float16", "f16": "float16", "half": "float16",
                 "bf16": "bfloat16", "fp8": "float8_e4m3", "e4m3": "float8_e4m3", "fp8_e4m3": "float8_e4m3",
                 "float8_e4m3fn": "float8_e4m3"}
E4M3_MAX = 448.0
"""Largest finite float8 e4m3fn value (``ml_dtypes.finfo(float8_e4m3fn).max``): a row's absmax maps to it."""

DOC_COLUMNS = ("doc_index", "doc_id", "tier", "tier_code", "corpus", "source", "n_tokens", "token_offset",
               "n_windows", "n_text_tokens")

# prompts.parquet (eval stores): one row per prompt; doc_index links it to docs.parquet and the token rows.
# surface_probs is a list in bra.pipeline.surface.SURFACE_CLASSES order (all zeros when the label is unknown).
PROMPT_COLUMNS = ("id", "tier", "framing", "category", "domain", "expected_surface", "prompt", "completion",
                  "n_prompt_tokens", "n_completion_tokens", "doc_index", "surface_label", "surface_probs",
                  "surface_matched", "finished", "rationale", "sampled_from")
# Judge columns (`bra.pipeline.judgerun.consensus_columns`), present once a relabel ran judges: every vote as
# JSON (the rules' first), the weighted consensus of rules and judges, 1 - its top share, the review flag.
JUDGE_VOTES = "judge_votes"
CONSENSUS_LABEL = "consensus_label"
CONSENSUS_PROBS = "consensus_probs"  # SURFACE_CLASSES order, all zeros when consensus_label is unknown
DISAGREEMENT = "disagreement"  # NaN when no vote carried mass
NEEDS_REVIEW = "needs_review"
N_ABSTENTIONS = "n_abstentions"
JUDGE_COLUMNS = (JUDGE_VOTES, CONSENSUS_LABEL, CONSENSUS_PROBS, DISAGREEMENT, NEEDS_REVIEW, N_ABSTENTIONS)


def canonical_dtype(name: str) -> str:
    """Map a user spelling (bf16, fp16, float32, ...) of a compute dtype to its name, or raise ValueError."""
    name = DTYPE_ALIASES.get(name.lower(), name.lower())
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"unknown dtype {name!r} (expected one of {', '.join(COMPUTE_DTYPES)})")
    return name


def canonical_storage_dtype(name: str) -> str:
    """Map a user spelling (bf16, fp8, float32, ...) of a storage dtype to its logical name, or raise
    ValueError."""
    name = DTYPE_ALIASES.get(name.lower(), name.lower())
    if name not in STORAGE_DTYPES:
        raise ValueError(f"unknown dtype {name!r} (expected one of {', '.join(STORAGE_DTYPES)})")
    return name


def is_scaled(dtype: str) -> bool:
    """Whether rows of logical ``dtype`` are stored as codes with a per-row scale (and are lossy)."""
    return dtype in SCALED_DTYPES


def acts_path(layer: int) -> str:
    """Array path of the activations of one hooked layer."""
    return f"{ACTS_GROUP}/layer_{layer}"


def scales_path(layer: int) -> str:
    """Array path of the per-row scales of one hooked layer (stores of a scaled dtype only)."""
    return f"{SCALES_GROUP}/layer_{layer}"


def layer_of(path: str) -> int:
    """The layer of an ``acts/layer_<L>`` or ``scales/layer_<L>`` path."""
    return int(path.rsplit("_", 1)[1])


def stats_path(layer: int, field: str) -> str:
    """Array path of one per-shard statistics field of one layer."""
    return f"{STATS_GROUP}/layer_{layer}/{field}"


def hook_name(layer: int) -> str:
    """SAELens / TransformerLens name of the residual stream after block ``layer``."""
    return f"blocks.{layer}.hook_resid_post"


def column_names(layers: list[int], dtype: str | None = None) -> list[str]:
    """Names whose per-shard CRC32 is stored, in CRC_ARRAY's column order (a scaled ``dtype``'s scale arrays
    come last, so stores of the other dtypes keep the columns they always had)."""
    scales = [scales_path(layer) for layer in layers] if dtype is not None and is_scaled(dtype) else []
    return list(TOKEN_COLUMNS) + [acts_path(layer) for layer in layers] + scales


def crc32(array: np.ndarray) -> int:
    """CRC32 of an array's raw C-order bytes."""
    return zlib.crc32(np.ascontiguousarray(array).view(np.uint8).reshape(-1)) & 0xFFFFFFFF


def load_codec(dtype: str) -> None:
    """Import what encoding rows of ``dtype`` needs (ml_dtypes for bf16 and fp8: its first import took 0.7 s
    here), so that a build does it before its clock starts, not inside the first batch."""
    if dtype not in ("float32", "float16"):
        import ml_dtypes  # noqa: F401


def to_storage(acts_f32: np.ndarray, dtype: str) -> np.ndarray:
    """Convert float32 activations to the on-disk representation of logical ``dtype`` (not a scaled dtype:
    use ``encode_rows``)."""
    if is_scaled(dtype):
        raise ValueError(f"{dtype} rows need their scales: use encode_rows")
    if dtype == "float32":
        return np.ascontiguousarray(acts_f32, dtype=np.float32)
    if dtype == "float16":
        return acts_f32.astype(np.float16)
    # bf16 with round-to-nearest-even, identical to torch's .to(torch.bfloat16)
    import ml_dtypes

    return acts_f32.astype(ml_dtypes.bfloat16).view(np.uint16)


def from_storage(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Decode on-disk activations of logical ``dtype`` to float32 (a scaled dtype: ``decode_rows``)."""
    if is_scaled(dtype):
        raise ValueError(f"{dtype} rows need their scales: use decode_rows")
    if dtype == "bfloat16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32, copy=False)


def encode_rows(acts_f32: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(on-disk rows, per-row float32 scales or None) of float32 activations [n, d] in logical ``dtype``.

    fp8 e4m3: each row is divided by its scale ``absmax / 448`` (1 for an all-zero row) and rounded to
    nearest even (``ml_dtypes.float8_e4m3fn``), so its largest value lands on fp8's largest. One scale per
    row, not per chunk: bench study 3 measured a per-chunk scale at 7x the per-row FVU, because a chunk's
    absmax is set by its attention-sink rows. A row holding NaN/inf gets a non-finite scale, which verify
    names.
    """
    if not is_scaled(dtype):
        return to_storage(acts_f32, dtype), None
    import ml_dtypes

    x = np.asarray(acts_f32, dtype=np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        absmax = np.abs(x).max(axis=1) if x.shape[1] else np.zeros(len(x), np.float32)
        scale = np.where(absmax > 0, absmax / np.float32(E4M3_MAX), np.float32(1)).astype(np.float32)
        scale[~np.isfinite(absmax)] = absmax[~np.isfinite(absmax)]
        q = np.clip(x / scale[:, None], -E4M3_MAX, E4M3_MAX)  # x / (absmax / 448) may round just above 448
    return q.astype(ml_dtypes.float8_e4m3fn).view(np.uint8), scale


def decode_rows(raw: np.ndarray, dtype: str, scale: np.ndarray | None = None) -> np.ndarray:
    """Float32 rows from on-disk ``raw`` rows of logical ``dtype`` (and their scales, for a scaled dtype):
    for fp8, codes x scale."""
    if not is_scaled(dtype):
        return from_storage(raw, dtype)
    if scale is None or len(scale) != len(raw):
        raise ValueError(f"{dtype} rows need one scale each")
    rows = _e4m3_values()[raw]  # a 256-entry table: 11x faster than ml_dtypes' cast, the same values
    rows *= scale.astype(np.float32, copy=False)[:, None]
    return rows


@functools.cache
def _e4m3_values() -> np.ndarray:
    """[256] float32: the value of every fp8 e4m3fn bit pattern."""
    import ml_dtypes

    return np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)


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


def _ints(value: Any) -> tuple[int, ...]:
    return tuple(int(x) for x in value)


def _strs(value: Any) -> tuple[str, ...]:
    return tuple(str(x) for x in value)


def _json_object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"expected a JSON object, got {type(value).__name__}")
    return copy.deepcopy(value)  # never alias the group's cached metadata


@dataclass(frozen=True, kw_only=True)
class StoreAttrs:
    """The write-once group attrs of a store: provenance and geometry, fixed when the store is created.

    Fields are in the order they are written to ``zarr.json``. The progress keys (``status``, ``stats``,
    ``attrs_digest``) change during a build and are read and written by the functions below instead.
    Stores written before a key was added lack it: those fields are optional (None when absent).
    """

    schema_version: int = SCHEMA_VERSION
    """Layout version of the store (``SCHEMA_VERSION`` for stores this code writes)."""
    kind: str
    """``corpus`` (tiered documents, for training) or ``eval`` (prompts and greedy completions)."""
    model_id: str
    """Hugging Face id or local folder of the model the activations came from."""
    model_revision: str | None = None
    """The model's revision (None: the default branch); written even when None."""
    layers: tuple[int, ...]
    """Hooked blocks, ascending; the rows of ``acts/layer_<L>`` are the residual stream after block L."""
    hook_names: tuple[str, ...]
    """SAELens / TransformerLens hook name of each layer (``blocks.L.hook_resid_post``)."""
    d_model: int
    """Width of the residual stream."""
    dtype: str
    """Logical storage dtype of the activations: float32, float16, bfloat16 or float8_e4m3 (lossy: codes plus
    a per-row scale in ``scales/layer_<L>``)."""
    compute_dtype: str | None = None
    """Dtype the forward pass ran in (float32, bfloat16, ...)."""
    tokenizer_fingerprint: str
    """Digest of the tokenizer's vocabulary and settings: a resume with another tokenizer is refused."""
    manifest_hash: str
    """Digest of the manifest's content and its input files: a build of another manifest is refused."""
    manifest: dict[str, Any] | None = None
    """The manifest's content (JSON), to say which key differs when a build is refused."""
    dataset_revisions: dict[str, Any] | None = None
    """Revision of every corpus read from the Hugging Face hub (``local`` for files)."""
    package_version: str | None = None
    """Version of bra that created the store."""
    tier_names: tuple[str, ...]
    """Tier names; index = the code in the ``tier`` column."""
    hazard_tiers: tuple[str, ...] | None = None
    """The tiers the manifest marks as the hazard class."""
    benign_tiers: tuple[str, ...] | None = None
    """The tiers the manifest marks as the benign (negative) class; absent in stores built before it was."""
    n_tokens: int
    """Rows in the store."""
    n_docs: int | None = None
    """Documents (rows of ``docs.parquet``)."""
    chunk_tokens: int
    """Rows per compressed inner chunk."""
    shard_tokens: int
    """Rows per shard file (a multiple of ``chunk_tokens``)."""
    codec: dict[str, Any] | None = None
    """Compression of every array: ``{codec, clevel, shuffle}``."""
    corpus_counts: dict[str, Any] | None = None
    """Per corpus (or the generation, for eval stores): documents and tokens read, and how."""
    tokens_digest: str | None = None
    """CRC32 of every planned token id and their count: a resume over an edited corpus is refused."""
    variant: dict[str, Any] | None = None
    """The generation variant of an eval store (name, chat_template, system_prompt, prefill,
    max_new_tokens); absent for a manifest without variants."""
    edit: dict[str, Any] | None = None
    """The residual edit the store was generated and recorded under (`bra-sae intervene`: the edit spec,
    layer, latents or direction digest, and their sources); absent for an unedited store."""

    @property
    def layout(self) -> StoreLayout:
        """Chunk/shard geometry (raises ValueError when the sizes are unusable)."""
        return StoreLayout(self.n_tokens, self.d_model, self.chunk_tokens, self.shard_tokens)

    @property
    def manifest_model(self) -> dict[str, Any]:
        """The ``model`` section of the saved manifest (id, revision, gguf, ...), to load the model again."""
        model = (self.manifest or {}).get("model")
        if not isinstance(model, dict):
            raise StoreError(f"store attrs have no {ATTR_MANIFEST!r} with a model section")
        return copy.deepcopy(model)

    def to_attrs(self) -> dict[str, Any]:
        """The JSON attrs, keys in on-disk order; optional fields that are None are left out."""
        out: dict[str, Any] = {}
        for name, key in _FIELD_KEYS.items():
            value = getattr(self, name)
            if value is None and name not in _WRITTEN_WHEN_NONE:
                continue
            out[key] = list(value) if isinstance(value, tuple) else copy.deepcopy(value)
        return out

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any], where: str = "store") -> StoreAttrs:
        """Typed attrs from a store's group attrs; unknown and progress keys are ignored.

        A required key that is missing, or a value of the wrong type, is a one-line StoreError naming it.
        """
        values: dict[str, Any] = {}
        for name, key in _FIELD_KEYS.items():
            if key not in attrs:
                if name in _REQUIRED_FIELDS:
                    raise StoreError(f"{where} has no {key!r} attr; check it with `bra-cache verify`")
                continue
            raw = attrs[key]
            try:
                values[name] = None if raw is None and name not in _REQUIRED_FIELDS else _CONVERT[name](raw)
            except (TypeError, ValueError) as exc:
                raise StoreError(f"{where}: attr {key!r} is unusable ({exc})") from None
        return cls(**values)


# field -> attr key, in on-disk order (the order of the build's attrs since schema 1)
_FIELD_KEYS: dict[str, str] = {
    "schema_version": ATTR_SCHEMA,
    "kind": ATTR_KIND,
    "model_id": ATTR_MODEL_ID,
    "model_revision": ATTR_MODEL_REVISION,
    "layers": ATTR_LAYERS,
    "hook_names": ATTR_HOOK_NAMES,
    "d_model": ATTR_D_MODEL,
    "dtype": ATTR_DTYPE,
    "compute_dtype": ATTR_COMPUTE_DTYPE,
    "tokenizer_fingerprint": ATTR_TOKENIZER_FP,
    "manifest_hash": ATTR_MANIFEST_HASH,
    "manifest": ATTR_MANIFEST,
    "dataset_revisions": ATTR_DATASET_REVISIONS,
    "package_version": ATTR_PACKAGE_VERSION,
    "tier_names": ATTR_TIER_NAMES,
    "hazard_tiers": ATTR_HAZARD_TIERS,
    "benign_tiers": ATTR_BENIGN_TIERS,
    "n_tokens": ATTR_N_TOKENS,
    "n_docs": ATTR_N_DOCS,
    "chunk_tokens": ATTR_CHUNK_TOKENS,
    "shard_tokens": ATTR_SHARD_TOKENS,
    "codec": ATTR_CODEC,
    "corpus_counts": ATTR_CORPUS_COUNTS,
    "tokens_digest": ATTR_TOKENS_DIGEST,
    "variant": ATTR_VARIANT,
    "edit": ATTR_EDIT,
}
_REQUIRED_FIELDS = frozenset(name for name, key in _FIELD_KEYS.items() if key in REQUIRED_ATTRS)
# every build writes the revision, None meaning the default branch; leaving it out would change the attrs
_WRITTEN_WHEN_NONE = frozenset({"model_revision"})
_CONVERT: dict[str, Callable[[Any], Any]] = {
    "schema_version": int, "kind": str, "model_id": str, "model_revision": str, "layers": _ints,
    "hook_names": _strs, "d_model": int, "dtype": str, "compute_dtype": str, "tokenizer_fingerprint": str,
    "manifest_hash": str, "manifest": _json_object, "dataset_revisions": _json_object, "package_version": str,
    "tier_names": _strs, "hazard_tiers": _strs, "benign_tiers": _strs, "n_tokens": int, "n_docs": int,
    "chunk_tokens": int,
    "shard_tokens": int, "codec": _json_object, "corpus_counts": _json_object, "tokens_digest": str,
    "variant": _json_object, "edit": _json_object,
}
assert list(_FIELD_KEYS) == [f.name for f in dataclasses.fields(StoreAttrs)] == list(_CONVERT)


def tokens_digest(windows: Iterable[np.ndarray], n_tokens: int) -> str:
    """The ``tokens_digest`` value: CRC32 over every window's token ids, in plan order, and the row count."""
    crc = 0
    for ids in windows:
        crc = zlib.crc32(ids.tobytes(), crc)
    return f"{crc:08x}:{n_tokens}"


# The progress keys: status, statistics and the digest record. They change while a store is built, so they
# are not StoreAttrs fields; these functions are the only code that names them.

def schema_version_of(attrs: Mapping[str, Any]) -> Any:
    """The recorded schema version, or None when the attrs are not a bra store's."""
    return attrs.get(ATTR_SCHEMA)


def status_of(attrs: Mapping[str, Any]) -> str | None:
    """The build status (creating, building, complete), or None when unset."""
    status = attrs.get(ATTR_STATUS)
    return None if status is None else str(status)


def status_update(status: str) -> dict[str, Any]:
    """The attrs update that sets the build status."""
    return {ATTR_STATUS: status}


def stats_of(attrs: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Final statistics per layer (``{"L": {count, mean, var, mean_sq_norm}}``); empty until complete."""
    return dict(attrs.get(ATTR_STATS) or {})


def attr_digests(attrs: Mapping[str, Any]) -> dict[str, str]:
    """Per-key digest of the attrs (the digest record itself excluded)."""
    return {k: hashlib.sha256(json.dumps(v, sort_keys=True).encode()).hexdigest()[:12]
            for k, v in sorted(attrs.items()) if k != ATTR_DIGESTS}


def completion_update(attrs: Mapping[str, Any], stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The one attrs update that completes a store: its statistics, status complete, and the digests of the
    attrs as they will then be (so verify can name a key edited later)."""
    update = {ATTR_STATS: stats, ATTR_STATUS: STATUS_COMPLETE}
    return {**update, ATTR_DIGESTS: attr_digests({**attrs, **update})}


def missing_attrs(attrs: Mapping[str, Any]) -> list[str]:
    """Required keys the attrs lack."""
    return [k for k in REQUIRED_ATTRS if k not in attrs]


def digest_problems(attrs: Mapping[str, Any]) -> list[str]:
    """Keys changed since the store was completed (or the missing digest record), one line each."""
    recorded = attrs.get(ATTR_DIGESTS)
    if not isinstance(recorded, dict):
        return [f"no {ATTR_DIGESTS!r} record"]
    now = attr_digests(attrs)
    return [f"{k!r} was changed after the build" for k in sorted(set(recorded) | set(now))
            if recorded.get(k) != now.get(k)]
