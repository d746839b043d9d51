"""bra/audit/report.py: report.html escapes what the model wrote (the eval_env / no_model fixtures are in
conftest.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from bra.audit.score import ScoreConfig
from bra.cache import schema
from bra.cache.writer import write_table_atomic


def test_report__escapes_html_in_completions(eval_env, no_model, tmp_path: Path) -> None:
    """A completion holding markup shows as text in report.html (jinja2 autoescape), unchanged in the
    scores table."""
    from bra.audit.score import score

    _, store, sae, _, _ = eval_env
    copy = Path(shutil.copytree(store, tmp_path / "eval.zarr"))
    evil = '<script>alert("x")</script> & <b>bold</b>'
    table = pd.read_parquet(copy / schema.PROMPTS_TABLE)
    table["completion"] = evil
    write_table_atomic(table, copy / schema.PROMPTS_TABLE)
    score(copy, sae, tmp_path / "out", ScoreConfig(n_boot=10, n_perm=10, repeats=1, n_d_null=10, top_n=4))
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    scores = pd.read_parquet(tmp_path / "out" / "scores.parquet")
    flagged = ["shallow_refusal", "uncertain_refusal", "hazardous_compliance"]
    assert (scores["depth_category"].isin(flagged)).any()  # rows shown
    assert scores["completion_excerpt"].str.startswith(evil).all()
    assert "<script>" not in page and "<b>bold" not in page
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in page
