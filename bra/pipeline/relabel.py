"""Surface labels of stored completions, and relabelling an eval store without the model.

The completions are stored text, so a change to the surface rules needs no forward pass: ``relabel_store``
re-runs ``bra.pipeline.surface.classify`` over ``prompts.parquet`` and rewrites that table atomically.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from bra.cache import schema
from bra.cache.location import StoreLocation
from bra.cache.store import open_store
from bra.errors import StoreError
from bra.pipeline.surface import classify

logger = logging.getLogger(__name__)

SURFACE_COLUMNS = ("surface_label", "surface_probs", "surface_matched")


def surface_columns(prompts: Sequence[str], completions: Sequence[str]) -> dict[str, list[Any]]:
    """Rule-based surface label, probabilities (SURFACE_CLASSES order) and fired rules of each completion."""
    labels = [classify(c, p) for p, c in zip(prompts, completions, strict=True)]
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


def relabel_store(path: str | Path) -> pd.DataFrame:
    """Re-classify the stored completions of an eval store and rewrite its prompts table; return the table.

    Needs no model: only the stored prompt and completion text are read.
    """
    df = read_prompts_table(path)
    old = df["surface_label"].tolist() if "surface_label" in df.columns else [None] * len(df)
    new = surface_columns(df["prompt"].astype(str).tolist(), df["completion"].astype(str).tolist())
    for name, values in new.items():
        df[name] = values
    StoreLocation.parse(path).write_table(schema.PROMPTS_TABLE, df)
    changed = sum(a != b for a, b in zip(old, new["surface_label"], strict=True))
    logger.info("relabelled %d completions in %s (%d labels changed)", len(df), path, changed)
    return df
