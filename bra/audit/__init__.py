"""bra.audit: refusal-depth scoring of an eval store from stored activations (no model).

The store is read once (`reader.read_eval_bundle` -> `bundle.EvalBundle`); the catalog, probes, divergence
and metrics are pure functions over that bundle (`score.analyse` -> `config.ScoreResult`); the report is
written from the result alone (`report.write_outputs`: JSON, parquet, `plots`, and report.html from
`templates/report.html.j2`). `compare.compare_reports` tables several score reports (`bra-sae compare`).
Which tiers are the hazard and benign classes is decided once, by `classes.resolve_classes`.
`intervene.intervene` builds eval stores under residual edits (`edits`: the specs, `steering`: the math) and
`effects.effects` compares them with their unedited store (`bra-sae intervene`, `bra-sae effects`); the
change in D and depth there is read under one fit of the base store (`fixed_fit`: score's fit split from
its apply; `effects_audit`).
"""

import importlib
from typing import Any

# Public name -> submodule. Resolved on first use (PEP 562), so importing one light module such as
# bra.audit.config (the CLI builds `score`'s options from it at start-up) does not load torch, zarr,
# matplotlib and jinja2 through this package's __init__.
_EXPORTS = {
    "CompareError": "compare", "Comparison": "compare", "compare_reports": "compare",
    "load_score_report": "compare", "EvalBundle": "bundle", "StoreFacts": "bundle", "ScoreConfig": "config",
    "ScoreError": "config", "ScoreResult": "config", "TierClasses": "config", "resolve_classes": "classes",
    "read_eval_bundle": "reader", "write_outputs": "report",
    "analyse": "score", "compute_scores": "score", "score": "score",
    "EditSpec": "edits", "EffectsConfig": "edits", "InterveneConfig": "edits", "parse_edit": "edits",
    "prepare_edits": "intervene", "compute_effects": "effects", "AuditFit": "fixed_fit",
    "apply_fit": "fixed_fit", "fit_audit": "fixed_fit",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bra.audit' has no attribute {name!r}")
    return getattr(importlib.import_module(f"bra.audit.{_EXPORTS[name]}"), name)
