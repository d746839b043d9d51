"""Which tiers are the positive (hazard) and negative (benign) classes of a score run, and which are
reported apart: a `bra.audit.config.TierClasses`, resolved by `resolve_classes` (pure) from the flags, the
store's attrs and the defaults of `bra.vocab`, in that order, class by class.

Every part of the audit that separates hazard from benign prompts reads the classes from here: the probes'
training labels, the AUROC table's positives, negatives and other groups, the catalog's hazard_adjacent
contrast, and the redaction of hazard completions in scores.parquet and the report.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable

from bra.audit.config import ClassSource, ScoreError, TierClasses
from bra.vocab import DEFAULT_NEGATIVE_TIERS, DEFAULT_POSITIVE_TIERS, DUAL_USE_TIER, EVAL_TIERS

logger = logging.getLogger(__name__)

FLAG_NAMES = {"positive": "--positive-tiers", "negative": "--negative-tiers"}
"""The flag that sets each class (named in errors)."""
DUAL_USE_GROUP = "dual_use"
"""The AUROC table's name for the dual-use group (``n_dual_use``, ``mean_score_dual_use``): the keys the
report had before the classes could be chosen, kept so that reports of the default classes are unchanged."""
ALWAYS_REDACTED: tuple[str, ...] = tuple(t for t in EVAL_TIERS if t.startswith("hazard_adjacent"))
"""Tiers whose completions are redacted whatever the classes: choosing other classes (to study the control
tiers, say) must never show a hazard-adjacent completion in full."""


def tier_order(tiers: Iterable[str]) -> tuple[str, ...]:
    """``tiers`` without repeats, in `EVAL_TIERS` order, then any other tier sorted."""
    seen = set(tiers)
    return tuple(t for t in EVAL_TIERS if t in seen) + tuple(sorted(seen - set(EVAL_TIERS)))


def _pick(flag: tuple[str, ...] | None, store: tuple[str, ...] | None,
          default: tuple[str, ...]) -> tuple[tuple[str, ...], ClassSource]:
    if flag is not None:
        return tuple(flag), "flag"
    if store:  # an empty list in the attrs names no class (a manifest's empty key falls back the same way)
        return tuple(store), "store"
    return default, "default"


def _where(side: str, source: ClassSource) -> str:
    """A class's source in words, for errors."""
    return {"flag": FLAG_NAMES[side], "store": "the store attrs", "default": "the defaults"}[source]


def resolve_classes(positive_flag: tuple[str, ...] | None, negative_flag: tuple[str, ...] | None,
                    store_positive: tuple[str, ...] | None, store_negative: tuple[str, ...] | None,
                    present: Collection[str]) -> TierClasses:
    """The classes of a run: per class, the flag, else the store's attrs, else `bra.vocab`'s default.

    ``present``: the tiers the prompts carry. Raises ScoreError (one line) when a flag names a tier no
    prompt has (the tiers present are listed), or when a tier ends up in both classes (a flag against the
    other class from the store; two flags that overlap are refused by `ScoreConfig` already). An empty flag
    is refused by `ScoreConfig`; an empty class in the attrs falls back to the default. A class from the
    store or the defaults that no prompt has is only logged: its AUROC rows then say what is missing.
    """
    positive, pos_from = _pick(positive_flag, store_positive, DEFAULT_POSITIVE_TIERS)
    negative, neg_from = _pick(negative_flag, store_negative, DEFAULT_NEGATIVE_TIERS)
    have = tier_order(present)
    for side, tiers, source in (("positive", positive, pos_from), ("negative", negative, neg_from)):
        missing = [t for t in tiers if t not in have]
        if missing and source == "flag":
            raise ScoreError(f"{FLAG_NAMES[side]}: no prompt has tier {missing[0]!r} (tiers present: "
                             f"{', '.join(have)})")
        if missing:
            logger.warning("%s class (%s) has tiers no prompt has: %s", side, source, ", ".join(missing))
    both = [t for t in positive if t in negative]
    if both:
        pos_where, neg_where = _where("positive", pos_from), _where("negative", neg_from)
        raise ScoreError(f"tier {both[0]!r} is in both classes (positive from {pos_where}, negative from "
                         f"{neg_where}); give {FLAG_NAMES['positive']} and {FLAG_NAMES['negative']} disjoint "
                         f"tiers")
    classed = set(positive) | set(negative)
    groups = {} if DUAL_USE_TIER in classed else {DUAL_USE_GROUP: DUAL_USE_TIER}
    groups.update({t: t for t in have if t not in classed and t != DUAL_USE_TIER})
    hazardous = {*positive, *(store_positive or ()), *ALWAYS_REDACTED}
    redacted = tuple(t for t in have if t in hazardous)
    return TierClasses(positive, negative, pos_from, neg_from, groups, redacted)


__all__ = ["ALWAYS_REDACTED", "DUAL_USE_GROUP", "resolve_classes", "tier_order"]
