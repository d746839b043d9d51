"""The train / calibration / test split of an eval set's prompts, by group.

Eval sets repeat a request across framings (direct, roleplay, ...) and sample near-duplicates from one
source, so a split by prompt puts paraphrases of one request on both sides, and a probe that memorised the
training paraphrase scores its test twin. The split is therefore made over **groups**: a prompt's group is
its ``sampled_from`` when it has one, else its tier and category (`group_keys`), and a whole group goes to
one split. Groups are stratified by tier (a group's tier is its most common one), ordered by
sha256(seed:group) and cut where the running prompt count reaches the fractions, so membership depends only
on (seed, the groups), never on table order.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pandas as pd

from bra.audit.config import CALIBRATION, SPLITS, TEST, TRAIN

GROUP_BY_SOURCE, GROUP_BY_CATEGORY, GROUP_BY_ID = "sampled_from", "tier+category", "id"
"""How a prompt's group was formed (`group_keys`), as report.json states it."""


def _present(value: object) -> bool:
    return value is not None and not (isinstance(value, float) and np.isnan(value)) and str(value) != ""


MIN_GROUPS = 3
"""Groups a tier needs to be split by group (one per split); a tier with fewer is split by prompt id."""


def group_keys(table: pd.DataFrame) -> tuple[np.ndarray, str]:
    """([n] group key per prompt, how it was formed): ``sampled_from`` where a prompt has one, else
    ``tier/category``; with neither column, the prompt id (every prompt its own group, as before).

    A tier whose prompts fall in fewer than `MIN_GROUPS` groups (one category for a whole tier) cannot be
    split by group: its prompts become their own groups, and ``how`` names the tier, since its paraphrases
    may then straddle the splits."""
    n = len(table)
    ids = table["id"].astype(str).to_numpy()
    source = table["sampled_from"].to_numpy() if "sampled_from" in table else np.full(n, None)
    category = table["category"].to_numpy() if "category" in table else np.full(n, None)
    tiers = table["tier"].astype(str).to_numpy()
    keys, kinds = [], set()
    for i in range(n):
        if _present(source[i]):
            keys.append(f"src:{source[i]}")
            kinds.add(GROUP_BY_SOURCE)
        elif _present(category[i]):
            keys.append(f"cat:{tiers[i]}/{category[i]}")
            kinds.add(GROUP_BY_CATEGORY)
        else:
            keys.append(f"id:{ids[i]}")
            kinds.add(GROUP_BY_ID)
    out = np.array(keys, dtype=object)
    fallback = []
    for tier in sorted(set(tiers)):
        mine = tiers == tier
        if len(set(out[mine])) < MIN_GROUPS <= int(mine.sum()):
            out[mine] = [f"id:{i}" for i in ids[mine]]
            fallback.append(tier)
    how = " else ".join(k for k in (GROUP_BY_SOURCE, GROUP_BY_CATEGORY, GROUP_BY_ID) if k in kinds)
    if fallback:
        how += (f"; by prompt id in {', '.join(fallback)} (fewer than {MIN_GROUPS} groups: paraphrases may "
                f"straddle the splits there)")
    return out, how


def split_prompts(ids: pd.Series, tiers: pd.Series, seed: int, train_fraction: float,
                  calibration_fraction: float, groups: np.ndarray | None = None) -> np.ndarray:
    """[n] split name per prompt: train / calibration / test, whole groups at a time.

    ``groups`` ([n] keys, default: every prompt its own group). Within each tier, groups are ordered by
    sha256(seed:group); a group goes to train while the tier's train count is below round(n·train_fraction),
    then to calibration up to round(n·(train + calibration fraction)), then to test. A tier with >= 3 groups
    gets at least one group in each split. Asserted: the splits are disjoint, cover every prompt, and no
    group is in two of them.
    """
    ids = pd.Series(ids).reset_index(drop=True)
    tiers = pd.Series(tiers).astype(str).reset_index(drop=True)
    groups = np.asarray(ids.astype(str), dtype=object) if groups is None else np.asarray(groups, dtype=object)
    if len(groups) != len(ids):
        raise ValueError(f"{len(groups)} group keys for {len(ids)} prompts")
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(str(g), []).append(i)
    group_tier = {g: Counter(tiers[idx]).most_common(1)[0][0] for g, idx in members.items()}
    out = np.full(len(ids), "", dtype=object)
    for tier in sorted(set(group_tier.values())):
        names = sorted((g for g in members if group_tier[g] == tier),
                       key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
        sizes = [len(members[g]) for g in names]
        n = sum(sizes)
        cuts = [round(n * train_fraction), round(n * (train_fraction + calibration_fraction))]
        assigned = _assign(sizes, cuts)
        for g, s in zip(names, assigned, strict=True):
            out[members[g]] = s
    _check(ids, groups, out)
    return out


def _assign(sizes: list[int], cuts: list[int]) -> list[str]:
    """Split name of each group (in order) from the running prompt count. With >= 3 groups every split gets
    one: large groups can starve a split, and then a boundary group moves into it (order is kept)."""
    names, running = [], 0
    for size in sizes:
        names.append(TRAIN if running < cuts[0] else CALIBRATION if running < cuts[1] else TEST)
        running += size
    if len(sizes) >= 3:
        if TRAIN not in names:
            names[0] = TRAIN
        if TEST not in names:
            names[-1] = TEST
        if CALIBRATION not in names:
            donor = (max(i for i, s in enumerate(names) if s == TRAIN) if names.count(TRAIN) > 1
                     else names.index(TEST))
            names[donor] = CALIBRATION
    return names


def _check(ids: pd.Series, groups: np.ndarray, split: np.ndarray) -> None:
    members = [set(ids[split == s]) for s in SPLITS]
    assert all(not (a & b) for i, a in enumerate(members) for b in members[i + 1:]), "splits overlap"
    assert sum(map(len, members)) == len(set(ids)) == len(ids), "a prompt is in no split"
    per_group: dict[str, set[str]] = {}
    for g, s in zip(groups, split, strict=True):
        per_group.setdefault(str(g), set()).add(str(s))
    straddling = [g for g, s in per_group.items() if len(s) > 1]
    assert not straddling, f"group {straddling[0]!r} is in two splits"


__all__ = ["GROUP_BY_CATEGORY", "GROUP_BY_ID", "GROUP_BY_SOURCE", "MIN_GROUPS", "group_keys", "split_prompts"]
