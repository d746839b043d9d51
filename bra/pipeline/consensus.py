"""Judge votes and their consensus: pure functions, no model and no I/O.

A `Vote` is one labeller's verdict on one completion: a surface class with a confidence and a rationale, or
an abstention with its reason (never a default class). `consensus` turns weighted votes into a soft
distribution over ``SURFACE_CLASSES``; abstentions carry no mass and are counted.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from bra.vocab import SURFACE_CLASSES, UNKNOWN

DEFAULT_REVIEW_THRESHOLD = 0.34
"""A prompt needs review when its disagreement (1 - the top class's share) exceeds this: with the default,
any split of two equal voters (0.5), or three voters who do not all agree (≥ 1/3 + ε), is flagged."""
RULES_JUDGE = "rules"
"""Name of the phrase rules' vote among a prompt's votes (`bra.pipeline.surface.classify`)."""


@dataclass(frozen=True)
class Vote:
    """One judge's verdict on one (prompt, completion)."""

    judge: str
    """Name of the judge that voted."""
    label: str | None
    """A class of ``SURFACE_CLASSES``, or None when the judge abstained."""
    confidence: float = 1.0
    """The judge's confidence in ``label``, in (0, 1] (1 when the judge gives none); 0 for abstentions."""
    rationale: str = ""
    """The judge's short reason (or its raw output), for a reviewer."""
    abstained: str | None = None
    """Why the judge abstained (endpoint down, timeout, HTTP 429 after retries, malformed output, a label
    outside the classes, an empty completion); None when it voted."""

    def __post_init__(self) -> None:
        if (self.label is None) == (self.abstained is None):
            raise ValueError("a vote has exactly one of a label and an abstention reason")
        if self.label is not None and self.label not in SURFACE_CLASSES:
            raise ValueError(f"vote label {self.label!r} is not one of {SURFACE_CLASSES}")
        if self.label is not None and not 0 < self.confidence <= 1:
            raise ValueError(f"vote confidence must be in (0, 1], got {self.confidence}")

    @classmethod
    def abstain(cls, judge: str, reason: str, rationale: str = "") -> Vote:
        """An abstention of ``judge`` with its reason."""
        return cls(judge, None, 0.0, rationale, reason)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Vote:
        """Inverse of `to_json`."""
        return cls(str(data["judge"]), data.get("label"), float(data.get("confidence", 1.0)),
                   str(data.get("rationale", "")), data.get("abstained"))


@dataclass(frozen=True)
class Consensus:
    """The weighted consensus of one prompt's votes."""

    label: str
    """Top class (ties go to the first in ``SURFACE_CLASSES``), or `unknown` when no vote carried mass."""
    probs: tuple[float, ...]
    """Share of the vote mass per class, ``SURFACE_CLASSES`` order (all zeros when `unknown`)."""
    disagreement: float
    """1 - the top share (0 = unanimous); NaN when no vote carried mass."""
    needs_review: bool
    """Disagreement above the threshold, or no vote at all."""
    n_votes: int
    """Votes that carried mass."""
    n_abstained: int
    """Abstentions (excluded from the distribution)."""


def consensus(votes: Sequence[Vote], weights: Mapping[str, float] | None = None,
              threshold: float = DEFAULT_REVIEW_THRESHOLD) -> Consensus:
    """Weighted consensus of ``votes``: each vote adds ``weights[judge] * confidence`` (weight 1 for a judge
    not in ``weights``) to its class; the distribution is the normalised mass.

    Abstentions and zero-weight votes carry no mass; abstentions are counted in ``n_abstained``.
    """
    if not 0 <= threshold <= 1:
        raise ValueError(f"review threshold must be in [0, 1], got {threshold}")
    weights = weights or {}
    mass = [0.0] * len(SURFACE_CLASSES)
    n_votes = n_abstained = 0
    for vote in votes:
        if vote.label is None:
            n_abstained += 1
            continue
        w = float(weights.get(vote.judge, 1.0))
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"weight of judge {vote.judge!r} must be finite and >= 0, got {w}")
        if w == 0:
            continue
        mass[SURFACE_CLASSES.index(vote.label)] += w * vote.confidence
        n_votes += 1
    total = sum(mass)
    if total <= 0:
        return Consensus(UNKNOWN, (0.0,) * len(SURFACE_CLASSES), math.nan, True, 0, n_abstained)
    probs = tuple(m / total for m in mass)
    top = max(range(len(probs)), key=lambda i: (probs[i], -i))
    disagreement = 1.0 - probs[top]
    return Consensus(SURFACE_CLASSES[top], probs, disagreement, disagreement > threshold, n_votes,
                     n_abstained)


def votes_to_json(votes: Sequence[Vote]) -> str:
    """A prompt's votes as one JSON string (the ``judge_votes`` column)."""
    return json.dumps([v.to_json() for v in votes], sort_keys=True)


def votes_from_json(text: str) -> list[Vote]:
    """Inverse of `votes_to_json`."""
    return [Vote.from_json(d) for d in json.loads(text)]


def disagreement_summary(disagreement: Sequence[float], needs_review: Sequence[bool]) -> dict[str, Any]:
    """Mean disagreement (prompts with any vote), share of prompts needing review, and counts."""
    finite = [d for d in disagreement if math.isfinite(d)]
    n = len(needs_review)
    return {"n": n, "n_with_votes": len(finite),
            "mean_disagreement": sum(finite) / len(finite) if finite else None,
            "needs_review_share": sum(bool(x) for x in needs_review) / n if n else None,
            "n_needs_review": sum(bool(x) for x in needs_review)}


__all__ = ["DEFAULT_REVIEW_THRESHOLD", "RULES_JUDGE", "Consensus", "Vote", "consensus",
           "disagreement_summary", "votes_from_json", "votes_to_json"]
