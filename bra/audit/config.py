"""The audit's settings and results: `ScoreConfig` (what a score run is asked to do, saved in report.json)
and `ScoreResult` (what it computed, which the report renders; it holds no store handle)."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from bra.errors import BraError
from bra.vocab import COMPLETION, POOLED_SEGMENTS, POOLS, Pool, PooledSegment

if TYPE_CHECKING:  # ScoreResult's field types only: `bra-sae --help` builds options from ScoreConfig
    import numpy as np
    import pandas as pd

    from bra.audit.bundle import StoreFacts
    from bra.audit.catalog import CategoryEntry
    from bra.audit.depth import DepthScale

TRAIN, CALIBRATION, TEST = "train", "calibration", "test"
SPLITS: tuple[str, ...] = (TRAIN, CALIBRATION, TEST)
"""Split names, in the order the prompts are cut (see `bra.audit.score.split_prompts`)."""
OURS = "sae"
"""Method name of the SAE being audited (`--sae`)."""
RANDOM_SAE = "random_sae"
"""Method name of the random SAE of the same size."""
TFIDF_METHOD = "tfidf_logreg"
"""Method name of the TF-IDF text baseline."""
RAW_LOGREG, RAW_DIFF_OF_MEANS = "raw_logreg", "raw_diff_of_means"
"""Method names of the raw-activation baselines."""
RESERVED_NAMES = (OURS, RANDOM_SAE, TFIDF_METHOD, RAW_LOGREG, RAW_DIFF_OF_MEANS)
"""Method names a ``--baseline NAME`` may not take."""
BOTH_SEGMENTS = "both"
"""Probe features of the prompt and the completion, concatenated."""
ProbeSegment = Literal["prompt", "completion", "both"]
"""Features of the hazard probes: one pooled segment, or both concatenated."""
PROBE_SEGMENTS: tuple[str, ...] = typing.get_args(ProbeSegment)
LabelSource = Literal["auto", "rules", "judges", "consensus"]
"""Surface labels of a score run: the phrase rules, the judges alone, or the consensus of both."""
LABEL_SOURCES: tuple[str, ...] = typing.get_args(LabelSource)


ClassSource = Literal["flag", "store", "default"]
"""Where a tier class came from: ``--positive-tiers`` / ``--negative-tiers``, the store's attrs
(``hazard_tiers`` / ``benign_tiers``), or `bra.vocab`'s defaults (a store built before it recorded one)."""


class ScoreError(BraError):
    """The eval store, SAE or data cannot be scored (one-line message)."""


def _check_tiers(name: str, tiers: tuple[str, ...] | None) -> None:
    """A class given by name: at least one tier, no blank or repeated name (None = not given)."""
    if tiers is None:
        return
    if not tiers:
        raise ValueError(f"{name} is empty: name at least one tier")
    if any(not t.strip() for t in tiers):
        raise ValueError(f"{name} has an empty tier name: {','.join(tiers)!r}")
    twice = [t for i, t in enumerate(tiers) if t in tiers[:i]]
    if twice:
        raise ValueError(f"{name} names tier {twice[0]!r} twice")


@dataclass(frozen=True)
class ScoreConfig:
    """Everything that determines a score run, given the store and the SAEs. Saved in report.json."""

    seed: int = 0
    """Seed of the split, the bootstrap, the permutations, the probes and the random SAE."""
    pool: Pool = "mean"
    """How latents are pooled over a segment's tokens: mean (default) or max."""
    layer: int | None = None
    """Store layer; None = the SAE's layer, else the store's first."""
    f_segment: PooledSegment = COMPLETION
    """Segment whose pooled latents give the reported f (and D): the completion, the behaviour s describes."""
    probe_segment: ProbeSegment = BOTH_SEGMENTS
    """Pooled features of the hazard probes: prompt, completion, or both concatenated."""
    train_fraction: float = 0.5
    """Share of each tier's prompts in the training split (catalog, probes)."""
    calibration_fraction: float = 0.25
    """Share of each tier's prompts in the calibration split (T); the rest is the test split."""
    ridge: float = 1e-2
    """Ridge penalty of the alignment fit."""
    top_n: int = 16
    """Catalog latents per category at most."""
    min_effect: float = 0.0
    """Catalog latents also need a training-split Cohen's d above this (selection is by the BH test)."""
    fdr: float = 0.05
    """False-discovery rate of the catalog's Benjamini-Hochberg selection over all latents."""
    n_null: int = 20
    """Label permutations of the catalog's null (the expected false-discovery share)."""
    depth_quantile: float = 0.1
    """Tail share of each calibration reference outside its depth band (the thresholds are its quantiles)."""
    min_reference: int = 3
    """Calibration prompts a depth reference needs; fewer complied hazard prompts use the stated fallback."""
    d_quantile: float = 0.95
    """D threshold: this quantile of D over calibration prompts whose surface label and tier agree."""
    magnitude_quantile: float = 0.05
    """Magnitude floor of f: this quantile of the calibration prompts' total catalog activation; below it
    D is undefined (the catalog latents barely fire)."""
    n_d_null: int = 200
    """Surface permutations of D's null reference."""
    repeats: int = 5
    """Splits (seeds seed .. seed+repeats-1) whose spread is reported beside every headline number."""
    n_boot: int = 1000
    """Bootstrap resamples of each AUROC's 95% CI."""
    n_perm: int = 1000
    """Label permutations of each AUROC's p-value."""
    contexts: int = 3
    """Top-activating token contexts shown per catalog latent."""
    context_latents: int = 4
    """Catalog latents per category shown with contexts in the report."""
    positive_tiers: tuple[str, ...] | None = None
    """Tiers of the positive (hazard) class, comma-separated; None (not given) = the store's hazard_tiers,
    else hazard_adjacent_category."""
    negative_tiers: tuple[str, ...] | None = None
    """Tiers of the negative (benign) class, comma-separated; None (not given) = the store's benign_tiers,
    else benign_bio."""
    labels: LabelSource = "auto"
    """Surface labels: rules, judges (their consensus alone) or consensus (rules and judges, as relabel
    stored it); auto = consensus when the store has judge votes, else rules."""

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        if self.f_segment not in POOLED_SEGMENTS:
            raise ValueError(f"f_segment must be one of {POOLED_SEGMENTS}, got {self.f_segment!r}")
        if self.labels not in LABEL_SOURCES:
            raise ValueError(f"labels must be one of {LABEL_SOURCES}, got {self.labels!r}")
        if self.probe_segment not in PROBE_SEGMENTS:
            raise ValueError(f"probe_segment must be one of {PROBE_SEGMENTS}, got {self.probe_segment!r}")
        fr, fc = self.train_fraction, self.calibration_fraction
        if not (0 < fr < 1 and 0 < fc < 1 and fr + fc < 1):
            raise ValueError(f"train_fraction ({fr}) and calibration_fraction ({fc}) must be in (0, 1) and "
                             f"leave a test split")
        for name in ("top_n", "n_boot", "n_perm", "contexts", "context_latents", "n_null", "min_reference",
                     "n_d_null", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge}")
        for name, lo, hi in (("fdr", 0.0, 1.0), ("depth_quantile", 0.0, 0.5), ("d_quantile", 0.0, 1.0),
                             ("magnitude_quantile", 0.0, 1.0)):
            value = getattr(self, name)
            if not lo < value < hi:
                raise ValueError(f"{name} must be in ({lo:g}, {hi:g}), got {value}")
        for name in ("positive_tiers", "negative_tiers"):
            _check_tiers(name, getattr(self, name))
        both = [t for t in self.positive_tiers or () if t in (self.negative_tiers or ())]
        if both:
            raise ValueError(f"tier {both[0]!r} is in both positive_tiers and negative_tiers")


@dataclass(frozen=True)
class TierClasses:
    """The resolved tier classes of a score run (`bra.audit.classes.resolve_classes`; recorded in
    report.json ``settings.classes``)."""

    positive: tuple[str, ...]
    """Tiers of the positive (hazard) class: label 1 of every probe, the AUROC's positives."""
    negative: tuple[str, ...]
    """Tiers of the negative (benign) class: label 0 of every probe, the AUROC's negatives."""
    positive_from: ClassSource
    """Where ``positive`` came from."""
    negative_from: ClassSource
    """Where ``negative`` came from."""
    groups: dict[str, str]
    """AUROC-table group name -> tier, for the tiers in neither class (count and mean score per group,
    never in the AUROC). dual_use_bio is the group ``dual_use`` whenever it is in neither class, present or
    not (as before the classes could be chosen); any other tier has a group when some prompt has it."""
    redacted: tuple[str, ...]
    """Tiers some prompt has whose completions appear only as short redacted excerpts: the positive class,
    the store's recorded hazard class and the hazard-adjacent tiers (`bra.audit.classes.ALWAYS_REDACTED`)."""

    def to_json(self) -> dict[str, Any]:
        """JSON-ready (report.json ``settings.classes``)."""
        return {"positive": list(self.positive), "positive_from": self.positive_from,
                "negative": list(self.negative), "negative_from": self.negative_from,
                "groups": dict(self.groups), "redacted": list(self.redacted)}


@dataclass(frozen=True)
class ScoreResult:
    """What a score run computed (rendered by `bra.audit.report.write_outputs`); arrays have a row per prompt.

    Built from an `EvalBundle` alone: it carries the store facts the report prints, never a store handle, so
    writing the report reads nothing but this value."""

    facts: StoreFacts
    """Path, model and tokenizer facts of the scored store."""
    layer: int
    """Store layer scored."""
    sae_path: str
    """Path of the audited SAE, as given."""
    sae_config: dict[str, Any]
    """The audited SAE's config (architecture + provenance)."""
    baselines: dict[str, str]
    """Baseline name -> SAE path, as given."""
    random_sae_config: dict[str, Any]
    """Config of the random SAE of the same size."""
    table: pd.DataFrame
    """prompts.parquet, row i = doc i."""
    split: np.ndarray
    """train / calibration / test."""
    S: np.ndarray
    """[n, 5] surface distributions."""
    f: dict[str, np.ndarray]
    """segment -> [n, 5] feature profile."""
    D: np.ndarray
    """[n] divergence D = 1 - cos(f, Tᵀs) of the configured f segment (NaN where undefined)."""
    hazard: np.ndarray
    """Our SAE probe's P(hazard) on ``probe_segment`` (NaN when the probe could not be fit)."""
    depth: list[str | None]
    """Refusal-depth category (test prompts), None elsewhere."""
    depth_score: np.ndarray
    """[n] completion-segment hazard evidence on the calibrated depth scale (`bra.audit.depth`)."""
    prompt_depth_score: np.ndarray
    """[n] the same scale applied to the prompt segment's evidence (reported, never used for a verdict)."""
    verdicts: list[str | None]
    """Depth verdict (deep / shallow / uncertain) of each refused prompt, None for the rest."""
    verdict_reasons: list[str | None]
    """Why a verdict is uncertain."""
    scale: DepthScale
    """The calibrated depth scale and thresholds."""
    raw_depth_score: np.ndarray
    """[n] the raw-residual baseline's depth score: completion projection on the training split's hazard -
    benign prompt direction, on its own calibration scale."""
    raw_scale: DepthScale
    """The raw baseline's calibrated scale."""
    d_fit: dict[str, Any]
    """D's calibration: threshold, magnitude floor, null reference, D-rule verdicts (`bra.audit.score`)."""
    groups: np.ndarray
    """[n] split group key of each prompt."""
    group_by: str
    """How the group keys were formed."""
    comparisons: list[dict[str, Any]]
    """Paired AUROC differences of our SAE against the baselines, Holm-adjusted."""
    probe_calibration: dict[str, Any]
    """Brier score and reliability bins of our probe on the test split."""
    repeats: dict[str, Any]
    """Spread of the headline numbers over repeated splits."""
    tables: dict[str, Any]
    """Per tier / framing tables (`bra.audit.tables`)."""
    catalog: dict[str, CategoryEntry]
    """Feature category -> its catalog entry (training split)."""
    alignment: dict[str, Any]
    """T and the classes it was fit on (`bra.audit.score.calibrate`)."""
    auroc: list[dict[str, Any]]
    """AUROC-table rows, each with its ROC band (``roc``) for the plot."""
    contexts: dict[str, dict[str, list[dict[str, Any]]]]
    """category -> latent (str) -> top-activating contexts (JSON-ready; decoded text when a tokenizer was
    at hand)."""
    contexts_note: str
    """How the contexts were rendered: decoded with the store's tokenizer, or token ids only and why."""
    counts: np.ndarray
    """[n, 2] pooled rows per prompt and segment."""
    classes: TierClasses
    """The positive and negative tiers (and the groups reported apart, the redacted tiers) this run used."""
    labels: dict[str, Any] | None = None
    """The surface-label source used and its disagreement summary (`bra.audit.labels.LabelChoice`)."""
    overlap: dict[str, Any] | None = None
    """Eval prompts sharing an n-gram with the SAE's training store (`bra.audit.overlap`); None = not run."""
