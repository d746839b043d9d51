"""bra/audit/tables.py: per-group means with intervals, rates with Wilson intervals, the expected-surface
confusion and truncation counts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bra.audit.tables import expected_confusion, mean_by, rate_by, truncation


def test_tables__means_rates_confusion_truncation() -> None:
    f = pd.DataFrame({"tier": ["a", "a", "a", "b", "b"], "framing": ["x", "y", "x", "x", "x"],
                      "D": [0.1, 0.3, np.nan, 1.0, 1.2]})
    rows = {r["tier"]: r for r in mean_by(f, "D", ["tier"], 200, 0)}
    assert rows["a"]["n"] == 3 and rows["a"]["n_defined"] == 2 and rows["a"]["mean"] == pytest.approx(0.2)
    assert rows["a"]["ci_low"] <= 0.2 <= rows["a"]["ci_high"]
    rates = {(r["tier"], r["framing"]): r for r in rate_by(f, np.array([1, 0, 1, 0, 0], bool),
                                                          ["tier", "framing"], "n_refused")}
    assert rates[("a", "x")]["n_refused"] == 2 and rates[("a", "x")]["rate"] == 1.0
    assert rates[("b", "x")]["ci_low"] == 0.0 and rates[("b", "x")]["ci_high"] < 1.0
    conf = expected_confusion(pd.Series(["refuse", "comply", "hedge"]),
                              pd.Series(["refuse_or_hedge", "refuse", "comply_or_hedge"]))
    assert conf["n_as_expected"] == 2 and conf["n"] == 3
    assert truncation(pd.Series([True, False, False]), pd.Series(["a", "a", "b"])) == {
        "known": True, "n_truncated": 2, "n": 3, "by_tier": {"a": 1, "b": 1}}
    assert truncation(None, pd.Series(["a"]))["known"] is False
