"""bra/audit/contexts.py: the tokenizer that decodes top-activating contexts, or why there is none."""

from __future__ import annotations

from pathlib import Path


def test_load_tokenizer__decodes_when_local_and_falls_back(tiny_gemma_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from bra.audit.bundle import StoreFacts
    from bra.audit.contexts import load_tokenizer
    from bra.pipeline.model import tokenizer_fingerprint

    fp = tokenizer_fingerprint(AutoTokenizer.from_pretrained(str(tiny_gemma_dir)))

    def facts(model_id: str, fingerprint: str) -> StoreFacts:
        return StoreFacts(path="store", kind="eval", model_id=model_id, model={"id": model_id},
                          tokenizer_fingerprint=fingerprint, d_model=64, n_tokens=0)

    tok, status = load_tokenizer(facts(str(tiny_gemma_dir), fp))
    assert tok is not None and status.startswith("decoded")
    tok, status = load_tokenizer(facts(str(tiny_gemma_dir), "0" * 16))
    assert tok is None and "differs" in status
    tok, status = load_tokenizer(facts(str(tmp_path / "gone"), fp))
    assert tok is None and "gone" in status
