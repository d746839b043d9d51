"""bra/audit/splits.py: group keys, and the group split on an eval set that repeats categories across
framings (no group in two splits; deterministic; independent of table order)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bra.audit.splits import GROUP_BY_CATEGORY, GROUP_BY_SOURCE, group_keys, split_prompts


def _eval_set() -> pd.DataFrame:
    """Three tiers x 8 categories x 3 framings (a category repeated across framings), and 4 prompts
    sampled from one source."""
    rows = []
    for tier in ("benign_bio", "dual_use_bio", "hazard_adjacent_category"):
        for c in range(8):
            for framing in ("direct", "educational", "roleplay"):
                rows.append({"id": f"{tier[:3]}-{c}-{framing}", "tier": tier, "category": f"cat{c}",
                             "framing": framing, "sampled_from": None})
    for i in range(4):
        rows.append({"id": f"ext-{i}", "tier": "benign_bio", "category": "other", "framing": "direct",
                     "sampled_from": "external-set-7"})
    return pd.DataFrame(rows)


def test_group_keys__source_else_tier_and_category() -> None:
    t = _eval_set()
    keys, how = group_keys(t)
    assert how == f"{GROUP_BY_SOURCE} else {GROUP_BY_CATEGORY}"
    assert keys[0] == "cat:benign_bio/cat0" and keys[-1] == "src:external-set-7"
    bare, how_bare = group_keys(t[["id", "tier"]])
    assert how_bare == "id" and list(bare[:2]) == ["id:ben-0-direct", "id:ben-0-educational"]
    # one category for a whole tier cannot be split by group: that tier falls back to ids, and says so
    one = t.assign(category=np.where(t["tier"] == "dual_use_bio", "same", t["category"]))
    keys1, how1 = group_keys(one)
    assert "by prompt id in dual_use_bio" in how1
    assert all(k.startswith("id:") for k in keys1[one["tier"] == "dual_use_bio"])
    assert keys1[0] == "cat:benign_bio/cat0"


def test_split_prompts__no_group_in_two_splits() -> None:
    t = _eval_set()
    keys, _ = group_keys(t)
    split = split_prompts(t["id"], t["tier"], 0, 0.5, 0.25, keys)
    for g in set(keys):
        assert len(set(split[keys == g])) == 1, g
    for tier in t["tier"].unique():
        assert set(split[t["tier"] == tier]) == {"train", "calibration", "test"}
    # paraphrases (a category across framings) never straddle: the prompt split did put them apart
    by_prompt = split_prompts(t["id"], t["tier"], 0, 0.5, 0.25)
    assert any(len(set(by_prompt[keys == g])) > 1 for g in set(keys))
    assert (split_prompts(t["id"], t["tier"], 0, 0.5, 0.25, keys) == split).all()
    assert not (split_prompts(t["id"], t["tier"], 3, 0.5, 0.25, keys) == split).all()
    order = np.random.default_rng(0).permutation(len(t))
    shuffled = split_prompts(t["id"].iloc[order], t["tier"].iloc[order], 0, 0.5, 0.25, keys[order])
    assert dict(zip(t["id"].iloc[order], shuffled, strict=True)) == dict(zip(t["id"], split, strict=True))


def test_split_prompts__large_groups_still_fill_every_split() -> None:
    ids = pd.Series([f"p{i}" for i in range(12)])
    tiers = pd.Series(["benign_bio"] * 12)
    groups = np.array(["a"] * 8 + ["b"] * 2 + ["c"] * 2, dtype=object)
    split = split_prompts(ids, tiers, 0, 0.5, 0.25, groups)
    assert set(split) == {"train", "calibration", "test"}
    with pytest.raises(ValueError, match="group keys"):
        split_prompts(ids, tiers, 0, 0.5, 0.25, groups[:3])
