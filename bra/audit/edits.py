"""Residual edits as `bra-sae intervene --edit` writes them: the spec grammar, the parsed `EditSpec`, and
the configs of `bra-sae intervene` and `bra-sae effects` (pure Python: the CLI builds its options from
here without loading torch).

Grammar: ``OP[=VALUE]:TARGET=NAME[:random=SEED]``

- SAE latents (``TARGET`` ``category`` = a catalog category, or ``latents`` = ids ``3,17,42``): ``ablate``
  (z_i -> 0), ``scale=S`` (z_i -> S z_i) or ``clamp=V`` (z_i -> V at every position). The SAE's error term
  is kept: x' = x + (z' - z) W_dec, so only the edited latents' share of the residual changes.
- Directions (``TARGET`` ``direction`` = ``refusal``, ``hazard`` or a ``.npy`` / ``.safetensors`` file):
  ``ablate`` (project it out: x' = x - (x.u) u, u = r / |r|), ``scale=S`` (x' = x + (S - 1)(x.u) u) or
  ``add=S`` (x' = x + S r). ``refusal`` is the difference of means of refused minus complied prompts'
  residuals (at the last prompt token) on the train split of a base store, as Arditi et al. (2024) take
  theirs from harmful minus harmless instructions; ``hazard`` is exactly that contrast (hazard minus benign
  tiers), for models that rarely refuse.
- ``:random=SEED``: the control of the same edit: as many random latents, each drawn (seeded) among the
  non-edited latents nearest an edited one in firing rate on the base store (``--base-store``; catalog
  latents fire on most rows, uniformly drawn ones on few), or a random direction of the same norm (seeded).

Examples: ``ablate:category=hazard_adjacent``, ``scale=0.5:latents=3,17``, ``add=4:direction=refusal``,
``ablate:direction=refusal:random=0``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from bra.audit.config import LabelSource
from bra.errors import EditError

ABLATE, SCALE, CLAMP, ADD = "ablate", "scale", "clamp", "add"
CATEGORY, LATENTS, DIRECTION = "category", "latents", "direction"
REFUSAL_DIRECTION, HAZARD_DIRECTION = "refusal", "hazard"
"""Directions computed from a base store: refused minus complied, hazard minus benign tiers."""
NAMED_DIRECTIONS: tuple[str, ...] = (REFUSAL_DIRECTION, HAZARD_DIRECTION)
DIRECTION_FILES: tuple[str, ...] = (".npy", ".safetensors")
OPS_OF: dict[str, tuple[str, ...]] = {CATEGORY: (ABLATE, SCALE, CLAMP), LATENTS: (ABLATE, SCALE, CLAMP),
                                      DIRECTION: (ABLATE, SCALE, ADD)}
"""Target kind -> the ops it takes."""
RANDOM_KEY = "random"

_SLUG_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class EditSpec:
    """One parsed ``--edit``."""

    text: str
    """The spec as given."""
    op: str
    """ablate, scale, clamp or add."""
    value: float | None
    """The op's number (None for ablate)."""
    target: str
    """category, latents or direction."""
    name: str
    """The category, the ids as written, or the direction (refusal, hazard, or a file path)."""
    ids: tuple[int, ...] = ()
    """Latent ids of a ``latents`` target (empty otherwise)."""
    random_seed: int | None = None
    """Seed of the random control; None for the edit itself."""

    @property
    def is_control(self) -> bool:
        """Whether this is a random control."""
        return self.random_seed is not None

    @property
    def edits_latents(self) -> bool:
        """Whether the edit is on SAE latents (needs an SAE)."""
        return self.target in (CATEGORY, LATENTS)

    @property
    def pair(self) -> str:
        """The spec of the edit itself (a control's spec without ``:random=SEED``)."""
        return self.text.rpartition(f":{RANDOM_KEY}=")[0] if self.is_control else self.text

    @property
    def family(self) -> str:
        """Edits that differ only in their number (a dose-response series): target, name, op class
        (ablate is scale 0), control or not."""
        op = SCALE if self.op == ABLATE else self.op
        return f"{op}:{self.target}={self.name}" + (":random" if self.is_control else "")

    @property
    def dose(self) -> float:
        """The number a dose-response plots (ablate = scale 0)."""
        return 0.0 if self.value is None else self.value

    @property
    def slug(self) -> str:
        """A file-name-safe name of the edit (its store is ``<out>/<slug>.zarr``)."""
        head = self.op if self.value is None else f"{self.op}{self.value:g}"
        name = self.name
        if self.target == DIRECTION and name.endswith(DIRECTION_FILES):
            name = re.split(r"[\\/]", name)[-1].rsplit(".", 1)[0]
        elif self.target == LATENTS:
            name = ".".join(str(i) for i in self.ids[:4]) + (f".and{len(self.ids) - 4}" if len(self.ids) > 4
                                                             else "")
        tail = f"-random{self.random_seed}" if self.is_control else ""
        return _SLUG_UNSAFE.sub("_", f"{head}-{self.target}-{name}{tail}")

    def to_json(self) -> dict[str, Any]:
        """The fields a store's ``edit`` attr records (with the resolved latents or direction beside)."""
        return {"spec": self.text, "op": self.op, "value": self.value, "target": self.target,
                "name": self.name, "random_seed": self.random_seed, "control": self.is_control,
                "pair": self.pair, "family": self.family, "dose": self.dose}


def _number(text: str, what: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise EditError(f"{where}: {what} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise EditError(f"{where}: {what} {text!r} is not finite")
    return value


def _ids(text: str, where: str) -> tuple[int, ...]:
    items = [t.strip() for t in text.split(",")]
    if not text.strip() or not all(re.fullmatch(r"\d+", t) for t in items):
        raise EditError(f"{where}: latents= takes latent ids (non-negative integers, comma-separated), got "
                        f"{text!r}")
    ids = tuple(int(t) for t in items)
    if len(set(ids)) != len(ids):
        raise EditError(f"{where}: latents= names a latent twice")
    return ids


def parse_edit(text: str) -> EditSpec:
    """Parse one ``--edit`` (grammar in the module doc); a malformed one is a one-line `EditError`."""
    where = f"--edit {text!r}"
    usage = "expected OP[=VALUE]:TARGET=NAME[:random=SEED], e.g. ablate:category=hazard_adjacent"
    head, sep, rest = text.strip().partition(":")
    if not sep or not rest:
        raise EditError(f"{where}: {usage}")
    seed = None
    body, rsep, tail = rest.rpartition(":")
    if rsep and tail.startswith(f"{RANDOM_KEY}="):
        raw = tail[len(RANDOM_KEY) + 1:]
        if not re.fullmatch(r"\d+", raw):
            raise EditError(f"{where}: random= takes a non-negative integer seed, got {raw!r}")
        seed, rest = int(raw), body
    target, tsep, name = rest.partition("=")
    if not tsep or target not in OPS_OF or not name.strip():
        raise EditError(f"{where}: the target must be category=NAME, latents=IDS or direction=NAME|FILE "
                        f"({usage})")
    op, vsep, raw_value = head.partition("=")
    if op not in OPS_OF[target]:
        raise EditError(f"{where}: {target} edits take {', '.join(OPS_OF[target])}, not {op!r}")
    if op == ABLATE and vsep:
        raise EditError(f"{where}: ablate takes no value")
    if op != ABLATE and not vsep:
        raise EditError(f"{where}: {op} needs a value ({op}=NUMBER)")
    value = _number(raw_value, op, where) if op != ABLATE else None
    ids = _ids(name, where) if target == LATENTS else ()
    if target == DIRECTION and name not in NAMED_DIRECTIONS and not name.endswith(DIRECTION_FILES):
        raise EditError(f"{where}: direction= takes {', '.join(NAMED_DIRECTIONS)} or a "
                        f"{' / '.join(DIRECTION_FILES)} file, got {name!r}")
    return EditSpec(text=text.strip(), op=op, value=value, target=target, name=name.strip(), ids=ids,
                    random_seed=seed)


def parse_edits(texts: tuple[str, ...]) -> list[EditSpec]:
    """Every ``--edit``, parsed; refuses none at all and two edits that would share a store name."""
    if not texts:
        raise EditError("no --edit given: say what to edit, e.g. --edit ablate:category=hazard_adjacent")
    specs = [parse_edit(t) for t in texts]
    seen: dict[str, str] = {}
    for spec in specs:
        if spec.slug in seen:
            raise EditError(f"--edit {spec.text!r} and --edit {seen[spec.slug]!r} would write the same store "
                            f"({spec.slug}.zarr)")
        seen[spec.slug] = spec.text
    return specs


@dataclass(frozen=True)
class InterveneConfig:
    """What `bra-sae intervene` edits and what the edits are read from (the manifest gives the model and
    prompts)."""

    edits: tuple[str, ...] = ()
    """The edits (``--edit``, repeatable; grammar in `bra.audit.edits`): one edited store each."""
    sae: str | None = None
    """SAE whose latents latent edits change (a fit run, a SAELens folder, ...); needed by latent edits."""
    catalog: str | None = None
    """catalog.json of a `bra-sae score` run of the same SAE (or its report folder); needed by
    category= edits."""
    base_store: str | None = None
    """Unedited eval store of the same manifest: the refusal and hazard directions are computed from its
    residuals, and random latent controls are matched on its firing rates; needed by
    direction=refusal|hazard and by latent edits with :random=SEED."""
    layer: int | None = None
    """Block whose output is edited; default: the SAE's layer, else the manifest's only layer."""
    seed: int = 0
    """Split seed of the direction's train split (as `bra-sae score --seed`)."""
    train_fraction: float = 0.5
    """Train share of each tier (as `bra-sae score --train-fraction`)."""
    calibration_fraction: float = 0.25
    """Calibration share of each tier (as `bra-sae score --calibration-fraction`)."""

    def __post_init__(self) -> None:
        fr, fc = self.train_fraction, self.calibration_fraction
        if not (0 < fr < 1 and 0 < fc < 1 and fr + fc < 1):
            raise ValueError(f"train_fraction ({fr}) and calibration_fraction ({fc}) must be in (0, 1) "
                             f"and sum to less than 1")


@dataclass(frozen=True)
class EffectsConfig:
    """How `bra-sae effects` compares edited stores with their base store."""

    n_boot: int = 2000
    """Bootstrap resamples of the paired CI of each refusal-rate change."""
    seed: int = 0
    """Seed of the bootstrap."""
    labels: LabelSource = "auto"
    """Surface labels compared: rules, judges, consensus, or auto (consensus when judged, else rules)."""
    sae: str | None = None
    """SAE of the audit (as `bra-sae score --sae`): with it, the change in D and in the depth score under
    one fit of the base store (its catalog, T, D threshold and depth scale) applied to every edited store;
    without it, surface labels only."""
    split_seed: int = 0
    """Split seed of that fit (as `bra-sae score --seed`); the fractions are score's defaults."""

    def __post_init__(self) -> None:
        if self.n_boot < 1:
            raise ValueError(f"n_boot must be >= 1, got {self.n_boot}")


__all__ = ["ABLATE", "ADD", "CATEGORY", "CLAMP", "DIRECTION", "DIRECTION_FILES", "EditSpec", "EffectsConfig",
           "HAZARD_DIRECTION", "InterveneConfig", "LATENTS", "NAMED_DIRECTIONS", "OPS_OF",
           "REFUSAL_DIRECTION", "SCALE", "parse_edit", "parse_edits"]
