"""Which surface labels a score run uses (``--labels``): the phrase rules, the judges alone, or the stored
consensus of rules and judges (`bra.pipeline.relabel`); and the disagreement summary report.json records."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from bra.audit.config import ScoreError
from bra.cache import schema
from bra.pipeline.consensus import RULES_JUDGE, consensus, disagreement_summary, votes_from_json

RULES, JUDGES, CONSENSUS, AUTO = "rules", "judges", "consensus", "auto"


@dataclass(frozen=True)
class LabelChoice:
    """The surface-label source a score run used (report.json ``settings.labels`` and
    ``settings.label_disagreement``)."""

    requested: str = AUTO
    """What was asked (``auto`` = consensus when the store has judge columns, else rules)."""
    source: str = RULES
    """What was used: rules, judges or consensus."""
    disagreement: dict[str, Any] | None = field(default=None)
    """Mean disagreement and share needing review of the labels used (None for rules without judges)."""

    def to_json(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"requested": self.requested, "source": self.source, "disagreement": self.disagreement}


def choose_labels(table: pd.DataFrame, requested: str, where: str) -> tuple[pd.DataFrame, LabelChoice]:
    """``table`` with ``surface_label`` / ``surface_probs`` taken from the requested source (the rule
    columns are kept as ``rules_label`` / ``rules_probs``), and what was chosen.

    Raises ScoreError when judges or consensus are asked of a store no judge has labelled."""
    has_judges = all(c in table.columns for c in schema.JUDGE_COLUMNS)
    source = (CONSENSUS if has_judges else RULES) if requested == AUTO else requested
    if source != RULES and not has_judges:
        raise ScoreError(f"{where}: --labels {source}: the store has no judge votes; run `bra-cache relabel "
                         f"STORE --judge SPEC` first")
    if not has_judges:
        return table, LabelChoice(requested, source)
    out = table.assign(rules_label=table["surface_label"], rules_probs=table["surface_probs"])
    if source == JUDGES:  # the judges' consensus without the rules' vote
        judged = [consensus([v for v in votes_from_json(t) if v.judge != RULES_JUDGE])
                  for t in table[schema.JUDGE_VOTES]]
        labels, probs = [c.label for c in judged], [c.probs for c in judged]
        dis, review = [c.disagreement for c in judged], [c.needs_review for c in judged]
    else:  # the stored consensus; with rules, its disagreement is reported beside the rule labels
        cols = (schema.CONSENSUS_LABEL, schema.CONSENSUS_PROBS) if source == CONSENSUS \
            else ("surface_label", "surface_probs")
        labels, probs = table[cols[0]].tolist(), table[cols[1]].tolist()
        dis, review = table[schema.DISAGREEMENT].tolist(), table[schema.NEEDS_REVIEW].tolist()
    out["surface_label"] = [str(x) for x in labels]
    out["surface_probs"] = [[float(x) for x in p] for p in probs]
    summary = disagreement_summary([float(d) for d in dis], [bool(r) for r in review])
    return out, LabelChoice(requested, source, summary)


__all__ = ["AUTO", "CONSENSUS", "JUDGES", "RULES", "LabelChoice", "choose_labels"]
