"""bra.audit: refusal-depth scoring of an eval store from stored activations (no model).

The store is read once (`reader.read_eval_bundle` -> `bundle.EvalBundle`); the catalog, probes, divergence
and metrics are pure functions over that bundle (`score.analyse` -> `config.ScoreResult`); the report is
written from the result alone (`report.write_outputs`: JSON, parquet, `plots`, and report.html from
`templates/report.html.j2`).
"""

from bra.audit.bundle import EvalBundle, StoreFacts
from bra.audit.config import ScoreConfig, ScoreError, ScoreResult
from bra.audit.reader import read_eval_bundle
from bra.audit.report import write_outputs
from bra.audit.score import analyse, compute_scores, score

__all__ = ["EvalBundle", "ScoreConfig", "ScoreError", "ScoreResult", "StoreFacts", "analyse",
           "compute_scores", "read_eval_bundle", "score", "write_outputs"]
