"""`bra-sae compare`: one table and one plot across score reports (models, SAEs, generation variants).

Reads score report folders alone (report.json and scores.parquet, never a store or a model):
`load_score_report` turns one folder into a typed `ScoreReport`, `summarise` (pure) turns a report into
a `RunSummary` with an interval on every number that has one (types in `bra.audit._compare_types`),
and `compare_reports` writes comparison.md, comparison.json and comparison.png
(`bra.audit._compare_render`) into ``out`` at once (`bra.fsutil.atomic_dir`).

Intervals: a refusal rate or a depth-category share carries its 95% Wilson interval, a D mean its 95%
t-interval, an AUROC the bootstrap CI and permutation p-value that report.json recorded.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd

from bra.audit._compare_render import comparison_json, comparison_markdown, render_comparison_plot
from bra.audit._compare_types import (
    AurocRow,
    CompareError,
    Comparison,
    MeanCI,
    Proportion,
    ReportFacts,
    RunSummary,
    ScoreReport,
)
from bra.audit.classes import tier_order
from bra.audit.config import TEST
from bra.audit.metrics import mean_t_interval
from bra.audit.report import REPORT_JSON, SCORES_FILE
from bra.fsutil import atomic_dir, is_foreign_output
from bra.sae.files import SAELENS_DIR, SEED_WEIGHTS
from bra.vocab import DEPTH_CATEGORIES, REFUSE

logger = logging.getLogger(__name__)

COMPARISON_MD, COMPARISON_JSON, COMPARISON_PNG = "comparison.md", "comparison.json", "comparison.png"
"""The files `compare_reports` writes (comparison.json also marks a folder as a previous comparison)."""
SCORE_COLUMNS = ("tier", "split", "surface_label", "D", "depth_category")
"""scores.parquet columns the comparison reads."""


# ------------------------------------------------------------------------------------------- reading


def _get(doc: Any, where: Path, *keys: str) -> Any:
    """``doc[k1][k2]...``, or a one-line error naming the missing key."""
    for i, key in enumerate(keys):
        if not isinstance(doc, dict) or key not in doc:
            raise CompareError(f"{where} is not a score report: no {'.'.join(keys[:i + 1])}")
        doc = doc[key]
    return doc


def _auroc_row(raw: Any, where: Path) -> AurocRow:
    """One AUROC row; a row without a method name or with a non-numeric AUROC is refused."""
    if not isinstance(raw, dict) or not isinstance(raw.get("method"), str):
        raise CompareError(f"{where} is not a score report: an auroc row without a method")

    def num(key: str) -> float | None:
        value = raw.get(key)
        if value is not None and not isinstance(value, (int, float)):
            raise CompareError(f"{where} is not a score report: auroc {raw['method']}.{key} is not a number")
        return None if value is None else float(value)

    return AurocRow(raw["method"], raw.get("kind"), num("auroc"), num("ci_low"), num("ci_high"),
                    num("p_value"), raw.get("reason"))


def _read_scores(folder: Path, n_prompts: int) -> pd.DataFrame:
    """scores.parquet's `SCORE_COLUMNS`, checked against report.json's prompt count."""
    path = folder / SCORES_FILE
    if not path.is_file():
        raise CompareError(f"{folder} is not a score report: no {SCORES_FILE}")
    try:
        table = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError or others on a damaged file
        raise CompareError(f"{path} is unreadable ({type(exc).__name__}: {exc})") from None
    missing = [c for c in SCORE_COLUMNS if c not in table.columns]
    if missing:
        raise CompareError(f"{path} is not a scores table: no column {missing[0]!r}")
    if len(table) != n_prompts:
        raise CompareError(f"{path} has {len(table)} rows but {folder / REPORT_JSON} counts {n_prompts} "
                           f"prompts: the two files come from different runs")
    return table.loc[:, list(SCORE_COLUMNS)]


def _parse_report(doc: Any, path: Path, folder: Path) -> tuple[ReportFacts, tuple[AurocRow, ...],
                                                             dict[str, int]]:
    """(facts, AUROC rows, depth counts) of report.json's contents; raises on a missing key or wrong type."""
    sae = _get(doc, path, "settings", "sae")
    settings = _get(doc, path, "settings")
    by_split = _get(doc, path, "counts", "by_split_and_tier")
    n_prompts = _get(doc, path, "counts", "prompts")
    rows = _get(doc, path, "auroc")
    depth = _get(doc, path, "depth_categories")
    if not isinstance(rows, list) or not isinstance(depth, dict) or not isinstance(n_prompts, int):
        raise CompareError(f"{path} is not a score report: auroc, depth_categories or counts.prompts has "
                           f"the wrong type")
    variant = settings.get("variant")
    facts = ReportFacts(path=str(folder), model_id=settings.get("model_id"), sae=str(sae),
                        layer=settings.get("layer"), store=settings.get("store"), n_prompts=n_prompts,
                        n_test=int(sum((by_split.get(TEST) or {}).values())),
                        variant=str(variant["name"]) if isinstance(variant, dict) and "name" in variant
                        else None)
    # runs are compared on the rows of each report's own probe input; reports from before the input was
    # recorded per row have one row per method
    segment = settings.get("probe_segment")
    rows = [r for r in rows if not isinstance(r, dict) or r.get("segment", segment) == segment]
    return facts, tuple(_auroc_row(r, path) for r in rows), {str(k): int(v) for k, v in depth.items()}


def load_score_report(folder: str | os.PathLike[str]) -> ScoreReport:
    """Read a `bra-sae score` output folder (report.json and scores.parquet); one-line errors name the
    file that is missing or damaged."""
    folder = Path(folder)
    path = folder / REPORT_JSON
    if not path.is_file():
        what = "no such folder" if not folder.exists() else f"no {REPORT_JSON}"
        raise CompareError(f"{folder} is not a score report ({what}); pass folders `bra-sae score` wrote")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CompareError(f"{path} is unreadable ({type(exc).__name__}: {exc})") from None
    try:
        facts, rows, depth = _parse_report(doc, path, folder)
    except (AttributeError, TypeError, ValueError) as exc:  # a value of the wrong type somewhere inside
        raise CompareError(f"{path} is not a score report ({type(exc).__name__}: {exc})") from None
    return ScoreReport(facts, rows, depth, _read_scores(folder, facts.n_prompts))


# ------------------------------------------------------------------------------------------ summaries


def _tiers(tables: Sequence[pd.DataFrame]) -> tuple[str, ...]:
    """The tiers present in any table: bundled, then control tiers (`bra.vocab.EVAL_TIERS` order), then any
    other tier sorted."""
    return tier_order(t for table in tables for t in table["tier"].astype(str))


def summarise(report: ScoreReport, label: str) -> RunSummary:
    """The comparison's numbers for one report (pure: reads nothing)."""
    s = report.scores
    tier = s["tier"].astype(str)
    refused = s["surface_label"].astype(str) == REFUSE
    refusal = {t: Proportion.of(int((refused & (tier == t)).sum()), int((tier == t).sum()))
               for t in _tiers([s])}
    test = s[s["split"] == TEST]
    d_by_tier = {}
    for t in _tiers([test]):
        d = test.loc[test["tier"].astype(str) == t, "D"].dropna().to_numpy(dtype=np.float64)
        d_by_tier[t] = MeanCI(int(d.size), float(d.mean()) if d.size else None, mean_t_interval(d))
    categories = list(DEPTH_CATEGORIES) + sorted(set(report.depth_counts) - set(DEPTH_CATEGORIES))
    n_depth = sum(report.depth_counts.values())
    depth = {c: Proportion.of(report.depth_counts.get(c, 0), n_depth) for c in categories}
    return RunSummary(label, report.facts, refusal, {r.method: r for r in report.auroc}, depth, d_by_tier)


def _short(name: str | None, fallback: str) -> str:
    """Last path component of a model id or path (``google/gemma-2-2b-it`` -> ``gemma-2-2b-it``)."""
    short = PurePosixPath(str(name or "").replace("\\", "/")).name
    return short or fallback


def _sae_name(sae: str) -> str:
    """The SAE's folder or file name; for the files `bra-sae fit` writes inside its run folder (``sae/``,
    ``sae_weights.pt``) the run folder's name, since those inner names are the same in every run."""
    path = PurePosixPath(sae.replace("\\", "/"))
    if path.name in (SAELENS_DIR, SEED_WEIGHTS) and path.parent.name:
        return path.parent.name
    return path.name.removesuffix(".pt") or sae


def derive_labels(facts: Sequence[ReportFacts]) -> list[str]:
    """``MODEL/SAE`` per report (short names); when the reports were scored on different eval stores,
    ``@VARIANT`` (the store's generation variant) or, for a store without one, ``@STORE`` is appended, since
    a store is one generation variant of a model. Store names replace variants when variants alone would
    leave two labels the same (the same variant of two manifests)."""
    stores = {f.store for f in facts}
    bases = [f"{_short(f.model_id, 'unknown-model')}/{_sae_name(f.sae)}" for f in facts]
    if len(stores) <= 1:
        return bases
    by_store = [f"@{PurePosixPath(_short(f.store, 'unknown-store')).stem}" for f in facts]
    by_variant = [f"@{f.variant}" if f.variant else s for f, s in zip(facts, by_store, strict=True)]
    for suffixes in (by_variant, by_store):
        labels = [b + s for b, s in zip(bases, suffixes, strict=True)]
        if len(set(labels)) == len(labels):
            break
    return labels


def build_comparison(reports: Sequence[ScoreReport], labels: Sequence[str]) -> Comparison:
    """The comparison of ``reports`` under ``labels`` (pure); labels must be unique."""
    if not reports:
        raise CompareError("nothing to compare: give at least one score report folder")
    seen: dict[str, str] = {}
    for label, report in zip(labels, reports, strict=True):
        if label in seen:
            raise CompareError(f"duplicate label {label!r} ({seen[label]} and {report.facts.path}); name "
                               f"the runs with --name NAME=REPORT_DIR")
        seen[label] = report.facts.path
    methods = list(dict.fromkeys(r.method for rep in reports for r in rep.auroc))
    return Comparison(tuple(summarise(r, lab) for r, lab in zip(reports, labels, strict=True)),
                      _tiers([r.scores for r in reports]), tuple(methods))


# ------------------------------------------------------------------------------------------- writing


def _runs(report_dirs: Sequence[str | os.PathLike[str]],
          names: Sequence[tuple[str, str | os.PathLike[str]]]) -> tuple[list[Path], dict[int, str]]:
    """(folders, position -> given label): the positional folders, then --name folders not among them."""
    folders = [Path(p) for p in report_dirs]
    given: dict[int, str] = {}
    for name, folder in names:
        if not name.strip():
            raise CompareError(f"an empty label for {folder} in --name")
        key = os.path.realpath(folder)
        pos = next((i for i, f in enumerate(folders) if os.path.realpath(f) == key), None)
        if pos is None:
            folders.append(Path(folder))
            pos = len(folders) - 1
        if pos in given:
            raise CompareError(f"{folder} is named twice ({given[pos]!r} and {name!r}) in --name")
        given[pos] = name
    return folders, given


def _refuse_foreign_out(out: Path) -> None:
    """Refuse an ``out`` that is a file, or a folder holding anything but a previous comparison: it is
    replaced whole (the rule of `bra-sae score`'s --out)."""
    if is_foreign_output(out, COMPARISON_JSON):
        raise CompareError(f"{out} exists and is not a comparison output directory; pick an empty or new "
                           f"--out")


def compare_reports(report_dirs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str],
                    names: Sequence[tuple[str, str | os.PathLike[str]]] = ()) -> Comparison:
    """Compare score report folders and write comparison.md, .json and .png to ``out`` at once.

    ``names``: (label, folder) pairs; a named folder not among ``report_dirs`` is added after them. The
    other folders get `derive_labels`'s labels. Returns the comparison written."""
    out = Path(out)
    folders, given = _runs(report_dirs, names)
    if not folders:
        raise CompareError("nothing to compare: give at least one score report folder")
    _refuse_foreign_out(out)
    reports = [load_score_report(f) for f in folders]
    derived = derive_labels([r.facts for r in reports])
    comparison = build_comparison(reports, [given.get(i, d) for i, d in enumerate(derived)])
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        (tmp / COMPARISON_JSON).write_text(json.dumps(comparison_json(comparison), indent=2,
                                                      allow_nan=False) + "\n", encoding="utf-8")
        (tmp / COMPARISON_MD).write_text(comparison_markdown(comparison), encoding="utf-8")
        render_comparison_plot(comparison).savefig(tmp / COMPARISON_PNG, dpi=110)
    logger.info("wrote %s (%d runs)", out, len(comparison.runs))
    return comparison


__all__ = ["AurocRow", "CompareError", "Comparison", "MeanCI", "Proportion", "ReportFacts", "RunSummary",
           "ScoreReport", "build_comparison", "compare_reports", "derive_labels", "load_score_report",
           "summarise"]
