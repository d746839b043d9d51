"""The change in D and in the depth score that `bra-sae effects` reports: ONE fit of the audit on the base
store (`bra.audit.fixed_fit.fit_audit`: its catalog on the training split; T, the magnitude floor, the D
threshold and the depth scale on calibration, split as `bra-sae score` splits), applied unchanged
(`bra.audit.fixed_fit.apply_fit`) to the base store's rows and to every edited store's rows of the same
prompts. A refit per store would move the catalog and the scale with the edit, and the change would be
partly the refit's.

Per edited store and tier: mean depth score and mean D before and after, and the mean paired change with
a bootstrap CI (`bra.audit.metrics.bootstrap_mean_ci` over the prompts where both sides are finite); the
transitions of each prompt's depth category and of the D rule's verdict of a refusal (counts). The rows
of the fit's own splits are reported with every tier; the test split (which the fit never read) has a row
of its own.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from bra.audit.config import OURS, TEST, ScoreConfig
from bra.audit.fixed_fit import Applied, AuditFit, AuditRows, apply_fit, fit_audit
from bra.audit.metrics import bootstrap_mean_ci
from bra.audit.reader import read_eval_bundle
from bra.audit.score import tier_classes
from bra.audit.splits import group_keys, split_prompts
from bra.vocab import HAZARD_ADJACENT

logger = logging.getLogger(__name__)

TEST_ROW = "all (test split)"
"""The row of the test split's prompts: nothing of the fit was read from them."""
NOT_REFUSED = "not refused"
"""The D-rule 'verdict' of a prompt that was not refused (the rule judges refusals only)."""
MEASURES = ("depth_score", "D")


def fit_json(fit: AuditFit, split: np.ndarray, cfg: ScoreConfig) -> dict[str, Any]:
    """What the one fit is, as effects.json states it."""
    hazard = fit.catalog[HAZARD_ADJACENT]
    return {"split_seed": cfg.seed, "train_fraction": cfg.train_fraction,
            "calibration_fraction": cfg.calibration_fraction,
            "n_per_split": {s: int((split == s).sum()) for s in dict.fromkeys(split.tolist())},
            "hazard_latents": list(hazard.latents), "hazard_reason": hazard.reason,
            "f_segment": fit.f_segment, "magnitude_floor": fit.magnitude_floor,
            "d_threshold": fit.d_threshold, "n_threshold_fit": fit.n_threshold_fit,
            "depth_scale": fit.scale.to_json()}


def _ci_row(before: np.ndarray, after: np.ndarray, n_boot: int, seed: int) -> dict[str, Any]:
    """Means and the mean paired change (bootstrap CI) over the prompts finite on both sides."""
    both = np.isfinite(before) & np.isfinite(after)
    ci = bootstrap_mean_ci(after[both] - before[both], n_boot, seed)
    return {"n_paired": int(both.sum()),
            "before": float(before[both].mean()) if both.any() else None,
            "after": float(after[both].mean()) if both.any() else None,
            "delta": None if ci is None else ci[0],
            "ci": None if ci is None else [ci[1], ci[2]]}


def _transitions(before: Sequence[Any], after: Sequence[Any]) -> dict[str, int]:
    """'a -> b': count, for the prompts whose value changed (most common first)."""
    pairs = Counter(f"{a} -> {b}" for a, b in zip(before, after, strict=True) if a != b)
    return dict(pairs.most_common())


def _rows(before: Applied, after: Applied, tiers: np.ndarray, test: np.ndarray, order: Sequence[str],
          n_boot: int, seed: int) -> list[dict[str, Any]]:
    """One row per tier, ``all`` and the test split."""
    d_b = [NOT_REFUSED if v is None else v for v in before.d_verdicts]
    d_a = [NOT_REFUSED if v is None else v for v in after.d_verdicts]
    out = []
    for tier in [*order, "all", TEST_ROW]:
        sel = (np.ones(len(tiers), bool) if tier == "all" else test if tier == TEST_ROW else tiers == tier)
        idx = np.flatnonzero(sel)
        out.append({"tier": tier, "n": int(sel.sum()),
                    "depth_score": _ci_row(before.depth_score[sel], after.depth_score[sel], n_boot, seed),
                    "D": _ci_row(before.D[sel], after.D[sel], n_boot, seed),
                    "category_transitions": _transitions([before.categories[i] for i in idx],
                                                         [after.categories[i] for i in idx]),
                    "d_verdict_transitions": _transitions([d_b[i] for i in idx], [d_a[i] for i in idx])})
    return out


class FixedAudit:
    """The base store's fit, applied to the base and to each edited store (`audit_effects`)."""

    def __init__(self, base_path: str | os.PathLike[str], sae: str, cfg: ScoreConfig) -> None:
        self.cfg, self.sae = cfg, sae
        self.layer: int | None = None  # the SAE's own, read off the base store's bundle
        bundle = self.read(base_path)
        table = bundle.table
        self.classes = tier_classes(self.cfg, bundle.facts, table)
        self.ids = table["id"].astype(str).to_numpy()
        self.tiers = table["tier"].astype(str).to_numpy()
        self.split = split_prompts(table["id"], table["tier"], self.cfg.seed, self.cfg.train_fraction,
                                   self.cfg.calibration_fraction, group_keys(table)[0])
        rows = AuditRows.of(bundle, self.classes)
        self.fit = fit_audit(rows, self.split, self.cfg, self.classes, table, self.cfg.seed)
        self.before = apply_fit(self.fit, rows)
        self.layer = bundle.layer
        self.bundle = bundle  # the base store's rows, for callers that also fit on them (validate)

    def read(self, path: str | os.PathLike[str]) -> Any:
        """A store's bundle under the fit's SAE, layer, pooling and labels."""
        return read_eval_bundle(path, {OURS: self.sae}, self.layer, self.cfg.pool, self.cfg.seed,
                                labels=self.cfg.labels)

    def apply(self, path: str | os.PathLike[str]) -> Applied:
        """The fit applied to an edited store's rows, reordered to the base store's prompts."""
        bundle = self.read(path)
        where = {pid: i for i, pid in enumerate(bundle.table["id"].astype(str))}
        index = np.array([where[pid] for pid in self.ids], dtype=np.int64)
        return apply_fit(self.fit, AuditRows.of(bundle, self.classes).take(index))

    def rows(self, after: Applied, order: Sequence[str], n_boot: int, seed: int) -> list[dict[str, Any]]:
        """The per-tier rows of one edited store (``order``: the tiers in table order)."""
        return _rows(self.before, after, self.tiers, self.split == TEST, order, n_boot, seed)

    def to_json(self) -> dict[str, Any]:
        """What the fit is."""
        return fit_json(self.fit, self.split, self.cfg)


__all__ = ["MEASURES", "NOT_REFUSED", "TEST_ROW", "FixedAudit", "fit_json"]
