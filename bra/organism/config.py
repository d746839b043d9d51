"""Organism recipes: the YAML that says which model organisms ``bra-organism build`` makes, validated into
frozen dataclasses with one-line errors naming the key (``recipe.yaml: rmu.lr: expected a number``).

A recipe names a base model (the ``model:`` section of any manifest: hub id, local folder or GGUF), the hooked
layer L, the refusal-training prompts (an eval set in the upstream JSONL format), forget and retain corpora
(the ``corpora:`` entries of any manifest) and the two training stages' settings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bra.errors import ManifestError
from bra.pipeline.manifest import (
    CorpusSpec,
    Manifest,
    ModelSpec,
    parse_corpora,
    parse_section,
    read_yaml_mapping,
)
from bra.vocab import BENIGN_TIER, DUAL_USE_TIER, EVAL_TIERS, HAZARD_TIER

SHALLOW, DEEP = "shallow", "deep"
KINDS: tuple[str, ...] = (SHALLOW, DEEP)
"""Organism kinds: ``shallow`` (refusal trained above L only), ``deep`` (RMU at and below L, then the same
refusal training above L)."""


@dataclass(frozen=True)
class RefusalSpec:
    """The refusal stage (both kinds): fine-tune every block above L (and the final norm; the lm_head too when
    it is not tied to the frozen input embeddings) to refuse the refusal tiers' prompts with short refusals
    and to answer the answer tiers' prompts as the base model does (its own greedy answers as targets)."""

    steps: int = 150
    """Optimizer steps."""
    lr: float = 1e-4
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    batch_size: int = 8
    """Examples (prompt + target) per step, drawn in a seeded order, epoch after epoch."""
    max_new_tokens: int = 48
    """Length cap of the base model's greedy answers used as the answer tiers' targets."""
    generation_batch_size: int = 16
    """Prompts per generate() call when the base model's answers are made."""
    checkpoint_every: int = 25
    """Write a checkpoint every this many steps (and at the end of the stage)."""


@dataclass(frozen=True)
class RMUSpec:
    """The RMU stage of the deep organism (Li et al. 2024, "The WMDP Benchmark", section 5): train a few
    blocks at and below L so the layer-L residual on forget text moves to ``c·u`` (u a fixed random unit
    vector) while on retain text it stays the frozen model's."""

    steps: int = 80
    """Optimizer steps (each one forget batch and one retain batch)."""
    lr: float = 5e-5
    """AdamW learning rate (the paper's 5e-5)."""
    batch_size: int = 4
    """Windows of forget text and of retain text per step."""
    max_seq_len: int = 64
    """Window length in tokens (longer documents are split into windows)."""
    alpha: float = 100.0
    """Weight of the retain loss (the paper: 1200 for Zephyr-7B, whose residual norms differ)."""
    steering_coeff: float | None = None
    """c, the target's norm; None: ``steering_ratio`` × the frozen model's mean layer-L token norm on the
    forget windows (the paper's c = 6.5 is tuned to Zephyr's norms; a ratio carries over to other models)."""
    steering_ratio: float = 2.0
    """c relative to the mean layer-L token norm, when ``steering_coeff`` is None."""
    blocks: int = 3
    """Train blocks L - blocks + 1 .. L (the paper: 3, layers 5-7 for a loss at layer 7)."""
    params: tuple[str, ...] = ("mlp.down_proj.weight",)
    """Which parameters of those blocks train, by name suffix (the paper: the MLP's output projection)."""
    include_prompts: bool = True
    """Add the refusal tiers' training prompts (their text, without the chat template, whose tokens both
    sides share) to the forget text and the answer tiers' to the retain text, so the misdirection covers
    requests, not only encyclopedic text."""
    checkpoint_every: int = 20
    """Write a checkpoint every this many steps (and at the end of the stage)."""


@dataclass(frozen=True)
class OrganismManifest:
    """A whole ``bra-organism build`` job."""

    name: str
    """Names the output folder (default ``cache/organisms/<name>``)."""
    model: ModelSpec
    """The base model (as in every manifest); trained in ``compute_dtype`` (``auto`` = float32 here)."""
    layer: int
    """The hooked layer L: block L's output residual is bitwise the base model's in the shallow organism."""
    prompts: str
    """Refusal-training prompts, an eval set (upstream JSONL; relative to the recipe). Keep them apart from
    the audit's prompts: the ids are recorded and `check_audit_prompts` refuses an overlap."""
    kinds: tuple[str, ...] = KINDS
    """Which organisms to build, in order: ``shallow``, ``deep``."""
    output: str | None = None
    """Folder holding one sub-folder per kind (relative to the working directory, like stores); default
    ``cache/organisms/<name>``."""
    refuse_tiers: tuple[str, ...] = (HAZARD_TIER,)
    """Prompt tiers trained to be refused."""
    answer_tiers: tuple[str, ...] = (BENIGN_TIER, DUAL_USE_TIER)
    """Prompt tiers trained to be answered as the base model answers them."""
    forget: tuple[CorpusSpec, ...] = ()
    """RMU forget corpora (the hazard tier); the deep organism needs them."""
    retain: tuple[CorpusSpec, ...] = ()
    """RMU retain corpora (the benign tier); the deep organism needs them."""
    seed: int = 0
    """Seeds the data order, the RMU direction u and torch."""
    refusal: RefusalSpec = field(default_factory=RefusalSpec)
    """The refusal stage."""
    rmu: RMUSpec = field(default_factory=RMUSpec)
    """The RMU stage (deep only)."""
    base_dir: str = "."
    """Folder relative paths resolve against (the recipe's); not part of the recipe's content."""

    def resolve(self, path: str) -> Path:
        """Resolve a recipe-relative path."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p

    @property
    def output_dir(self) -> Path:
        """Where the organisms go: ``output``, else ``cache/organisms/<name>``."""
        return Path(self.output).expanduser() if self.output else Path("cache") / "organisms" / self.name

    def corpus_manifest(self, max_seq_len: int) -> Manifest:
        """A corpus manifest over forget then retain corpora (for ``bra.pipeline.plan.plan_corpora``)."""
        return Manifest(name=self.name, model=self.model, layers=(self.layer,), max_seq_len=max_seq_len,
                        corpora=self.forget + self.retain, base_dir=self.base_dir)

    def content_dict(self) -> dict[str, Any]:
        """Everything that determines the organisms (paths that only locate files and the device left out)."""
        d = dataclasses.asdict(self)
        d.pop("base_dir")
        d.pop("output")
        d["model"].pop("device")
        return d


_FLOATS = {RefusalSpec: ("lr", "weight_decay"),
           RMUSpec: ("lr", "alpha", "steering_coeff", "steering_ratio")}


def _floats(spec: Any, where: str, label: str) -> Any:
    """Numbers of a section as floats: YAML reads ``5e-5`` (no dot) as a string, which is accepted when it
    parses as a number."""
    changes = {}
    for name in _FLOATS[type(spec)]:
        value = getattr(spec, name)
        if value is None and name == "steering_coeff":
            continue
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
        except (TypeError, ValueError):
            raise ManifestError(f"{where}: {label}{name}: expected a number, got {value!r}") from None
        changes[name] = number
    return dataclasses.replace(spec, **changes)


def _validate(m: OrganismManifest, where: str, n_layers: int | None = None) -> None:
    def bad(key: str, msg: str) -> None:
        raise ManifestError(f"{where}: {key}: {msg}")

    if not m.name or "/" in m.name:
        bad("name", f"invalid organism name {m.name!r}")
    if m.layer < 0:
        bad("layer", f"must be a non-negative block index, got {m.layer}")
    if not m.kinds or any(k not in KINDS for k in m.kinds) or len(set(m.kinds)) != len(m.kinds):
        bad("kinds", f"expected distinct kinds out of {', '.join(KINDS)}, got {list(m.kinds)}")
    for key in ("refuse_tiers", "answer_tiers"):
        tiers = getattr(m, key)
        if not tiers:
            bad(key, "must name at least one tier")
        for t in tiers:
            if t not in EVAL_TIERS:
                bad(key, f"unknown tier {t!r} (expected one of {', '.join(EVAL_TIERS)})")
    both = set(m.refuse_tiers) & set(m.answer_tiers)
    if both:
        bad("answer_tiers", f"tier {sorted(both)[0]!r} is also in refuse_tiers")
    if DEEP in m.kinds:
        for key in ("forget", "retain"):
            if not getattr(m, key):
                bad(key, "the deep organism needs forget and retain corpora (RMU); none given")
        forget_tiers = {c.tier for c in m.forget}
        same = forget_tiers & {c.tier for c in m.retain}
        if same:
            bad("retain", f"tier {sorted(same)[0]!r} is in both forget and retain corpora: RMU needs forget "
                          f"text of one tier and retain text of another")
    for i, c in enumerate(m.forget + m.retain):
        key = f"forget[{i}]" if i < len(m.forget) else f"retain[{i - len(m.forget)}]"
        src = c.source
        if (src.path is None) == (src.hf is None):
            bad(f"{key}.source", "give exactly one of path or hf")
    r, u = m.refusal, m.rmu
    for key, value in (("refusal.steps", r.steps), ("refusal.batch_size", r.batch_size),
                       ("refusal.max_new_tokens", r.max_new_tokens),
                       ("refusal.generation_batch_size", r.generation_batch_size),
                       ("refusal.checkpoint_every", r.checkpoint_every), ("rmu.steps", u.steps),
                       ("rmu.batch_size", u.batch_size), ("rmu.blocks", u.blocks),
                       ("rmu.checkpoint_every", u.checkpoint_every)):
        if value < 1:
            bad(key, f"must be positive, got {value}")
    if u.max_seq_len < 2:
        bad("rmu.max_seq_len", "must be at least 2")
    for key, value in (("refusal.lr", r.lr), ("rmu.lr", u.lr), ("rmu.steering_ratio", u.steering_ratio)):
        if not value > 0:
            bad(key, f"must be positive, got {value}")
    for key, value in (("refusal.weight_decay", r.weight_decay), ("rmu.alpha", u.alpha)):
        if not value >= 0:
            bad(key, f"must not be negative, got {value}")
    if u.steering_coeff is not None and not u.steering_coeff > 0:
        bad("rmu.steering_coeff", f"must be positive, got {u.steering_coeff}")
    if not u.params:
        bad("rmu.params", "must name at least one parameter (by name suffix)")


def load_organism_manifest(path: str | Path) -> OrganismManifest:
    """Read and validate an organism recipe; ``ManifestError`` (one line naming the key) on any problem.
    The layer is checked against the model's depth later, from its config (`bra.organism.build`)."""
    p = Path(path)
    where = str(path)
    data = read_yaml_mapping(p)
    data.setdefault("name", p.stem)
    manifest: OrganismManifest = parse_section(OrganismManifest, data, where, "", {
        "model": lambda v, lab: parse_section(ModelSpec, {"id": v} if isinstance(v, str) else v, where,
                                              f"{lab}."),
        "forget": lambda v, lab: parse_corpora(v, where, lab),
        "retain": lambda v, lab: parse_corpora(v, where, lab),
        "refusal": lambda v, lab: _floats(parse_section(RefusalSpec, v, where, f"{lab}."), where,
                                          f"{lab}."),
        "rmu": lambda v, lab: _floats(parse_section(RMUSpec, v, where, f"{lab}."), where, f"{lab}."),
    })
    manifest = dataclasses.replace(manifest, base_dir=str(p.resolve().parent))
    _validate(manifest, where)
    return manifest
