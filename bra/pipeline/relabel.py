"""Surface labels of stored completions, and relabelling an eval store without the model.

The completions are stored text, so a change to the surface rules needs no forward pass: ``relabel_store``
re-runs ``bra.pipeline.surface.classify`` over ``prompts.parquet`` and rewrites that table atomically. With
judges (``--judge`` specs, else the ``judges:`` of the store's manifest) it adds every judge's vote and the
consensus (`bra.cache.schema.JUDGE_COLUMNS`); the audited model is never loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from bra.cache import schema
from bra.cache.location import StoreLocation
from bra.cache.store import open_store
from bra.errors import StoreError
from bra.pipeline.consensus import DEFAULT_REVIEW_THRESHOLD
from bra.pipeline.judgerun import (
    CACHE_FILENAME,
    JudgeStats,
    VoteCache,
    build_judge,
    consensus_columns,
    judge_cache_dir,
    run_judges,
)
from bra.pipeline.judges import JudgeError, JudgeSpec
from bra.pipeline.surface import classify

logger = logging.getLogger(__name__)

SURFACE_COLUMNS = ("surface_label", "surface_probs", "surface_matched")
PREFILL_COLUMN = schema.VARIANT_COLUMNS[0]


def surface_columns(prompts: Sequence[str], completions: Sequence[str],
                    prefills: Sequence[str] | None = None) -> dict[str, list[Any]]:
    """Rule-based surface label, probabilities (SURFACE_CLASSES order) and fired rules of each completion
    (``prefills``: the forced start of each completion, for a variant store; its words are not evidence)."""
    forced = [str(x or "") for x in prefills] if prefills is not None else [""] * len(completions)
    labels = [classify(c, p, f) for p, c, f in zip(prompts, completions, forced, strict=True)]
    return {
        "surface_label": [lab.label for lab in labels],
        "surface_probs": [[float(x) for x in lab.probs] for lab in labels],
        "surface_matched": [list(lab.matched) for lab in labels],
    }


def read_prompts_table(path: str | Path) -> pd.DataFrame:
    """The prompts table of a complete eval store."""
    store = open_store(path)
    table = store.location.child(schema.PROMPTS_TABLE)
    if not store.location.has_file(schema.PROMPTS_TABLE):
        raise StoreError(f"store {store.path} has no {schema.PROMPTS_TABLE}: only eval stores (built from a "
                         f"manifest with prompt_sets) have completions to label")
    df = store.read_table(schema.PROMPTS_TABLE)
    missing = [c for c in ("prompt", "completion") if c not in df.columns]
    if missing:
        raise StoreError(f"{table}: missing column {missing[0]!r}")
    return df


@dataclass(frozen=True)
class JudgeConfig:
    """How a relabel runs its judges and forms the consensus."""

    judges: tuple[JudgeSpec, ...] | None = None
    """The judges; None = the ``judges:`` of the store's manifest (none: rules only)."""
    cache: str | None = None
    """Vote cache file; None = ``votes.jsonl`` in `bra.pipeline.judgerun.judge_cache_dir`."""
    rules_weight: float = 1.0
    """Weight of the phrase rules' vote in the consensus (0 = judges only)."""
    review_threshold: float = DEFAULT_REVIEW_THRESHOLD
    """A prompt needs review when its disagreement (1 - top share) exceeds this."""

    def __post_init__(self) -> None:
        if not (0 <= self.review_threshold <= 1):
            raise JudgeError(f"review_threshold must be in [0, 1], got {self.review_threshold}")
        if not self.rules_weight >= 0:
            raise JudgeError(f"rules_weight must be >= 0, got {self.rules_weight}")


def store_judges(path: str | Path) -> tuple[JudgeSpec, ...]:
    """The judges recorded in the manifest of the store at ``path`` (none for stores built without)."""
    manifest = open_store(path).meta.manifest or {}
    entries = manifest.get("judges") or ()
    return tuple(JudgeSpec(**dict(e)) for e in entries if isinstance(e, Mapping))


def relabel_store(path: str | Path, config: JudgeConfig | None = None) -> pd.DataFrame:
    """Re-classify the stored completions of an eval store, run the judges, and rewrite its prompts table;
    return the table.

    Needs no model of the audited model: only the stored prompt and completion text are read. Judge
    columns already in the table stay when no judge runs.
    """
    config = config or JudgeConfig()
    df = read_prompts_table(path)
    old = df["surface_label"].tolist() if "surface_label" in df.columns else [None] * len(df)
    prompts, completions = df["prompt"].astype(str).tolist(), df["completion"].astype(str).tolist()
    prefills = df[PREFILL_COLUMN].fillna("").astype(str).tolist() if PREFILL_COLUMN in df.columns else None
    new = surface_columns(prompts, completions, prefills)
    for name, values in new.items():
        df[name] = values
    specs = config.judges if config.judges is not None else store_judges(path)
    if specs:
        judges = [build_judge(s) for s in specs]  # set up (keys, models) before any call
        cache = VoteCache(config.cache or judge_cache_dir() / CACHE_FILENAME)
        votes, stats = run_judges(judges, prompts, completions, cache)
        cols = consensus_columns(votes, new["surface_label"], {s.label: s.weight for s in specs},
                                 config.rules_weight, config.review_threshold)
        for name, values in cols.items():
            df[name] = values
        _log_stats(stats)
    StoreLocation.parse(path).write_table(schema.PROMPTS_TABLE, df)
    changed = sum(a != b for a, b in zip(old, new["surface_label"], strict=True))
    logger.info("relabelled %d completions in %s (%d labels changed)", len(df), path, changed)
    return df


def _log_stats(stats: JudgeStats) -> None:
    for name, reasons in stats.abstained.items():
        for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
            logger.info("judge %s abstained %d times: %s", name, n, reason)
