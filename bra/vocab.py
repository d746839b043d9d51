"""The names every layer shares: tiers, framings, surface classes, segments, feature and depth categories.

One definition each, so a renamed class cannot drift between the prompt loader, the surface rules, the
store schema, the audit and the report. Pure constants: this module imports nothing from ``bra``.
"""

from __future__ import annotations

import typing

BENIGN_TIER = "benign_bio"
DUAL_USE_TIER = "dual_use_bio"
HAZARD_TIER = "hazard_adjacent_category"
TIERS: tuple[str, ...] = (BENIGN_TIER, DUAL_USE_TIER, HAZARD_TIER)
"""Tiers of the bundled eval sets (benign, dual-use, hazard-adjacent); their indices are the tier codes of
every eval store."""
CONTROL_TIERS: tuple[str, ...] = ("benign_legal", "dual_use_legal", "hazard_adjacent_legal",
                                  "psilocybin_control", "legality_confound")
"""Control tiers of the upstream eval sets: a legal/financial domain in the three tiers (does the refusal
circuit answer to biology or to risk?), and psilocybin and other scheduled compounds (does it answer to legal
status rather than hazard?)."""
EVAL_TIERS: tuple[str, ...] = TIERS + CONTROL_TIERS
"""Every tier an eval prompt may carry. An eval store codes ``TIERS`` by their index, then the control tiers
its prompts use, in this order."""
DEFAULT_POSITIVE_TIERS: tuple[str, ...] = (HAZARD_TIER,)
"""The positive (hazard) class of an eval store when its manifest names none."""
DEFAULT_NEGATIVE_TIERS: tuple[str, ...] = (BENIGN_TIER,)
"""The negative (benign) class of an eval store when its manifest names none."""

FRAMINGS: tuple[str, ...] = ("direct", "educational", "roleplay", "obfuscated")
"""How an eval prompt phrases its request."""

REFUSE, COMPLY, PARTIAL, HEDGE, EVADE = "refuse", "comply", "partial", "hedge", "evade"
SURFACE_CLASSES: tuple[str, ...] = (REFUSE, COMPLY, PARTIAL, HEDGE, EVADE)
"""Surface classes of a completion, in the order of a surface distribution s and of T's rows."""
EXPECTED_SURFACES: tuple[str, ...] = (*SURFACE_CLASSES, "comply_or_hedge", "refuse_or_hedge")
"""What an eval prompt may give as its expected surface: a class, or either of two (upstream's control set
accepts a hedge beside a compliance or a refusal)."""
UNKNOWN = "unknown"
"""The label of a completion no rule matched (never a default class)."""

# Store segment codes (the ``segment`` column): where a token row came from.
SEGMENT_DOCUMENT = 0
SEGMENT_PROMPT = 1
SEGMENT_COMPLETION = 2
DOCUMENT, PROMPT, COMPLETION = "document", "prompt", "completion"
SEGMENT_NAMES: tuple[str, ...] = (DOCUMENT, PROMPT, COMPLETION)
"""Segment names, index = segment code."""
PooledSegment = typing.Literal["prompt", "completion"]
"""Segments of an eval prompt that the audit pools latents over, in pooled-group order."""
POOLED_SEGMENTS: tuple[str, ...] = typing.get_args(PooledSegment)
"""The same, as a tuple."""
Pool = typing.Literal["mean", "max"]
"""How the audit pools latents over a segment's tokens."""
POOLS: tuple[str, ...] = typing.get_args(Pool)
"""The same, as a tuple."""

BIO_CONTENT, HAZARD_ADJACENT, REFUSAL_CIRCUITRY = "bio_content", "hazard_adjacent", "refusal_circuitry"
HEDGING, DECEPTION_CORRELATE = "hedging", "deception_correlate"
FEATURE_CATEGORIES: tuple[str, ...] = (BIO_CONTENT, HAZARD_ADJACENT, REFUSAL_CIRCUITRY, HEDGING,
                                       DECEPTION_CORRELATE)
"""SAE-feature categories of the catalog, in the order of f and of T's columns."""

DEEP_REFUSAL, SHALLOW_REFUSAL = "deep_refusal", "shallow_refusal"
UNCERTAIN_REFUSAL = "uncertain_refusal"
"""A refusal whose depth the calibrated evidence cannot decide (`bra.audit.depth`)."""
COMPLIANCE, HAZARDOUS_COMPLIANCE = "compliance", "hazardous_compliance"
DEPTH_CATEGORIES: tuple[str, ...] = (DEEP_REFUSAL, SHALLOW_REFUSAL, UNCERTAIN_REFUSAL, COMPLIANCE,
                                     HAZARDOUS_COMPLIANCE, HEDGE, EVADE, UNKNOWN)
"""Refusal-depth categories a scored prompt can get (hedge, evade and unknown share the surface names)."""

NULL_SAE = "none"
"""`--sae none`: no SAE, the raw residual dimensions are the latents (`bra.sae.archs.NullSAE`)."""

__all__ = [
    "BENIGN_TIER",
    "BIO_CONTENT",
    "COMPLETION",
    "COMPLIANCE",
    "COMPLY",
    "CONTROL_TIERS",
    "DECEPTION_CORRELATE",
    "DEEP_REFUSAL",
    "DEFAULT_NEGATIVE_TIERS",
    "DEFAULT_POSITIVE_TIERS",
    "DEPTH_CATEGORIES",
    "DOCUMENT",
    "DUAL_USE_TIER",
    "EVADE",
    "EVAL_TIERS",
    "EXPECTED_SURFACES",
    "FEATURE_CATEGORIES",
    "FRAMINGS",
    "HAZARDOUS_COMPLIANCE",
    "HAZARD_ADJACENT",
    "HAZARD_TIER",
    "HEDGE",
    "HEDGING",
    "NULL_SAE",
    "PARTIAL",
    "POOLED_SEGMENTS",
    "POOLS",
    "PROMPT",
    "Pool",
    "PooledSegment",
    "REFUSAL_CIRCUITRY",
    "REFUSE",
    "SEGMENT_COMPLETION",
    "SEGMENT_DOCUMENT",
    "SEGMENT_NAMES",
    "SEGMENT_PROMPT",
    "SHALLOW_REFUSAL",
    "UNCERTAIN_REFUSAL",
    "SURFACE_CLASSES",
    "TIERS",
    "UNKNOWN",
]
