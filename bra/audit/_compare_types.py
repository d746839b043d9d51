"""The typed values of `bra-sae compare` (`bra.audit.compare`): what a score report folder holds once read
(`ScoreReport`), one run's numbers with their intervals (`RunSummary`) and the whole `Comparison`, which
the renderers (`bra.audit._compare_render`) turn into markdown, JSON and a plot."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import pandas as pd

from bra.audit.metrics import wilson_interval
from bra.errors import BraError


class CompareError(BraError):
    """A report folder cannot be compared, or the comparison cannot be written (one-line message)."""


@dataclass(frozen=True)
class Proportion:
    """k of n, with its 95% Wilson interval (None when n == 0)."""

    k: int
    """Prompts counted."""
    n: int
    """Prompts in the denominator."""
    interval: tuple[float, float] | None
    """95% Wilson score interval of k/n."""

    @property
    def share(self) -> float | None:
        """k / n, None when n == 0."""
        return self.k / self.n if self.n else None

    @classmethod
    def of(cls, k: int, n: int) -> Proportion:
        """k of n with its interval."""
        return cls(int(k), int(n), wilson_interval(int(k), int(n)))


@dataclass(frozen=True)
class MeanCI:
    """A mean of n values with its 95% t-interval (None with fewer than 2 values)."""

    n: int
    """Values averaged (defined D values)."""
    mean: float | None
    """Their mean, None when n == 0."""
    interval: tuple[float, float] | None
    """95% Student-t interval of the mean."""


@dataclass(frozen=True)
class AurocRow:
    """One method's row of report.json's AUROC table, as recorded there."""

    method: str
    """Method name (``sae`` is the audited SAE)."""
    kind: str | None
    """sae, sae_baseline, text or activations."""
    auroc: float | None
    """Test-split AUROC, hazard-adjacent vs benign (None when the method could not be scored)."""
    ci_low: float | None
    """Lower end of its 95% bootstrap CI."""
    ci_high: float | None
    """Upper end of its 95% bootstrap CI."""
    p_value: float | None
    """Permutation p-value."""
    reason: str | None
    """Why ``auroc`` is None, if it is."""


@dataclass(frozen=True)
class ReportFacts:
    """What a report says about its run (report.json's settings and counts)."""

    path: str
    """The report folder, as given."""
    model_id: str | None
    """Model the eval store's completions and activations came from."""
    sae: str
    """The audited SAE's path, as given to `bra-sae score`."""
    layer: int | None
    """Store layer scored."""
    store: str | None
    """The eval store scored (its name tells generation variants apart)."""
    n_prompts: int
    """Prompts scored (all splits)."""
    n_test: int
    """Prompts in the test split."""
    variant: str | None = None
    """Name of the store's generation variant (report.json ``settings.variant.name``); None without."""


@dataclass(frozen=True)
class ScoreReport:
    """One score report folder as read: its facts, AUROC rows, depth counts and scores table."""

    facts: ReportFacts
    """Settings and counts."""
    auroc: tuple[AurocRow, ...]
    """The AUROC table, in report order."""
    depth_counts: Mapping[str, int]
    """Depth category -> test prompts in it."""
    scores: pd.DataFrame
    """scores.parquet, the `SCORE_COLUMNS` only."""


@dataclass(frozen=True)
class RunSummary:
    """One column of the comparison."""

    label: str
    """The run's name in the table and the plot."""
    facts: ReportFacts
    """Settings and counts of its report."""
    refusal_by_tier: Mapping[str, Proportion]
    """Tier -> prompts labelled ``refuse`` of all the tier's prompts (every split: the surface label does
    not depend on the SAE or the split; ``unknown`` labels count in the denominator)."""
    auroc: Mapping[str, AurocRow]
    """Method -> its AUROC row; a method the report lacks is absent, never zero."""
    depth: Mapping[str, Proportion]
    """Depth category -> test prompts in it of all categorised test prompts."""
    d_by_tier: Mapping[str, MeanCI]
    """Tier -> mean D over its test prompts where D is defined."""


@dataclass(frozen=True)
class Comparison:
    """Every run's summary, plus the row names of the tables (unions over the runs)."""

    runs: tuple[RunSummary, ...]
    """In the order given."""
    tiers: tuple[str, ...]
    """Tiers of any run (bundled tiers first)."""
    methods: tuple[str, ...]
    """AUROC methods of any run, in order of first appearance."""
