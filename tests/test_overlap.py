"""bra/audit/overlap.py: token n-gram hashing and the train/eval overlap check."""

from __future__ import annotations

import numpy as np

from bra.audit.overlap import ngram_hashes, prompt_ngrams, shared_counts, training_overlap


def test_ngram_hashes__windows_equal_iff_tokens_equal_and_never_cross_documents() -> None:
    a = np.arange(20)
    h = ngram_hashes(a, n=5)
    assert h.size == 16 and np.unique(h).size == 16
    assert ngram_hashes(a[3:8], n=5)[0] == h[3]
    docs = np.r_[np.zeros(10, int), np.ones(10, int)]
    assert ngram_hashes(a, docs, n=5).size == 12  # 4 windows straddle the boundary
    assert ngram_hashes(a[:3], n=5).size == 0


def test_shared_counts__finds_an_embedded_prompt() -> None:
    rng = np.random.default_rng(0)
    corpus = rng.integers(0, 5000, 400)
    inside = corpus[100:130].copy()
    outside = rng.integers(5000, 9000, 30)
    per = prompt_ngrams({"in": inside, "out": outside}, n=13)
    counts = shared_counts(per, ngram_hashes(corpus, n=13))
    assert counts == {"in": 30 - 13 + 1}


def test_training_overlap__says_why_it_did_not_check(tmp_path) -> None:
    from bra.audit.reader import scan_store_ngrams

    def scan(store, wanted, n):
        return scan_store_ngrams(store, "fp", wanted, n)

    out = training_overlap(str(tmp_path), {"a": np.arange(20)}, scan)
    assert not out["checked"] and "run.json" in out["reason"]
    (tmp_path / "run.json").write_text('{"store": "' + str(tmp_path / "gone.zarr") + '"}')
    out = training_overlap(str(tmp_path), {"a": np.arange(20)}, scan)
    assert not out["checked"] and "not reachable" in out["reason"]


def test_training_overlap__reports_the_prompts_found_by_the_scan(tmp_path) -> None:
    corpus = np.arange(100, 200)
    (tmp_path / "run.json").write_text('{"store": "somewhere"}')

    def scan(store, wanted, n):
        assert store == "somewhere"
        return wanted[np.isin(wanted, ngram_hashes(corpus, n=n))], None

    out = training_overlap(str(tmp_path), {"in": np.arange(120, 140), "out": np.arange(500, 520)}, scan)
    assert out["checked"] and out["overlapping"] == [{"id": "in", "shared_ngrams": 8, "ngrams": 8}]
