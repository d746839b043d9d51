"""Iterate (doc_id, text) documents of a corpus from a local file or a Hugging Face dataset."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bra.errors import CorpusError
from bra.pipeline.manifest import CorpusSpec, Manifest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Document:
    """One text document of a tier."""

    doc_id: str
    """Stable id: the source's id field, or ``<corpus>:<row>``."""
    text: str
    """The document text."""
    source: str
    """Where it came from (file path or dataset name)."""


def corpus_name(spec: CorpusSpec) -> str:
    """Short name of a corpus, used in doc ids."""
    return spec.name or spec.tier


def iter_documents(spec: CorpusSpec, manifest: Manifest) -> Iterator[Document]:
    """Yield the non-empty documents of one corpus in source order (limits are applied by the caller)."""
    src = spec.source
    if src.path is not None:
        path = manifest.resolve(src.path)
        if not path.is_file():
            raise CorpusError(f"corpus {corpus_name(spec)!r}: file not found: {path}")
        rows = _iter_local(path, src.text_field)
        source = str(src.path)
    else:
        rows = ((f"dataset {src.hf}: row {i}", row) for i, row in enumerate(_iter_hf(spec)))
        source = f"hf:{src.hf}" + (f"/{src.config}" if src.config else "") + f":{src.split}"
    for i, (where, row) in enumerate(rows):
        text = row.get(src.text_field)
        if text is None:
            raise CorpusError(f"corpus {corpus_name(spec)!r}: row {i} has no field {src.text_field!r}")
        if not isinstance(text, str):
            raise CorpusError(f"corpus {corpus_name(spec)!r}: row {i}: field {src.text_field!r} is not text")
        raw_id = row.get(src.id_field) if src.id_field else None
        _check_unicode(where, src.text_field, text)
        if isinstance(raw_id, str):
            _check_unicode(where, src.id_field or "", raw_id)
        if not text.strip():
            continue
        doc_id = f"{corpus_name(spec)}:{raw_id if raw_id is not None else i}"
        yield Document(doc_id=doc_id, text=text, source=source)


def _check_unicode(where: str, name: str, text: str) -> None:
    """Refuse text with no UTF-8 form (a lone surrogate such as JSON's ``"\\ud800"``): the tokenizer would
    fail on it with a TypeError that names neither file nor line."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise CorpusError(f"{where}: field {name!r} holds invalid Unicode (lone surrogate "
                          f"{text[exc.start]!r} at character {exc.start + 1})") from None


def _not_utf8(path: Path, lineno: int, line: str) -> CorpusError:
    """The error for a line read with ``surrogateescape`` that holds bytes which are not UTF-8."""
    bad = next(i for i, ch in enumerate(line) if "\udc80" <= ch <= "\udcff")
    byte = len(line[:bad].encode("utf-8", "surrogateescape")) + 1
    return CorpusError(f"{path}:{lineno}: not valid UTF-8 (byte {byte})")


def _iter_local(path: Path, text_field: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(location, row) per row of a local file; the location (``PATH:LINENO`` for JSONL) leads errors."""
    suffix = path.suffix
    if suffix == ".jsonl":
        # surrogateescape: a bad byte is reported with its line instead of failing the decode of a chunk
        with open(path, encoding="utf-8", errors="surrogateescape") as fh:
            for lineno, line in enumerate(fh, 1):
                try:
                    line.encode("utf-8")  # only an escaped bad byte has no UTF-8 form here
                except UnicodeEncodeError:
                    raise _not_utf8(path, lineno, line) from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CorpusError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from None
                if not isinstance(row, dict):
                    raise CorpusError(f"{path}:{lineno}: expected a JSON object")
                yield f"{path}:{lineno}", row
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise CorpusError(f"{path}: not a readable parquet file: {exc}") from None
        if text_field not in table.schema_arrow.names:
            raise CorpusError(f"{path}: no column {text_field!r} "
                              f"(columns: {', '.join(table.schema_arrow.names)})")
        row = 0
        for batch in table.iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                yield f"{path}: row {row}", record
                row += 1
    else:  # .txt: documents separated by blank lines
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            lineno, line_start = data.count(b"\n", 0, exc.start) + 1, data.rfind(b"\n", 0, exc.start) + 1
            raise CorpusError(f"{path}:{lineno}: not valid UTF-8 (byte {exc.start - line_start + 1})") \
                from None
        text = text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as read_text reads
        for i, para in enumerate(text.split("\n\n")):
            yield f"{path}: document {i}", {text_field: para.strip()}


def _iter_hf(spec: CorpusSpec) -> Iterator[dict[str, Any]]:
    src = spec.source
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise CorpusError(f"the 'datasets' package is needed for hf:{src.hf}") from exc
    try:
        ds = datasets.load_dataset(src.hf, src.config, split=src.split, revision=src.revision, streaming=True)
    except Exception as exc:  # datasets wraps hub errors in many types; classify by message
        raise CorpusError(_explain_hf_error(src.hf or "", exc)) from None
    try:
        yield from ds
    except Exception as exc:
        raise CorpusError(_explain_hf_error(src.hf or "", exc)) from None


def _explain_hf_error(name: str, exc: Exception) -> str:
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    low = str(exc).lower()
    if "gated" in low or "401" in low or "403" in low or "authenticat" in low:
        return (f"dataset {name} is gated: request access at https://huggingface.co/datasets/{name}, "
                f"then log in with `hf auth login` or set HF_TOKEN")
    if os.environ.get("HF_HUB_OFFLINE") == "1" or "offline" in low or "connect" in low or "resolve" in low:
        return (f"dataset {name} is not reachable (offline or no network) and not in the local cache; "
                f"run once with network access or point the corpus at a local file ({msg})")
    return f"dataset {name} could not be loaded: {msg}"


def dataset_revision(spec: CorpusSpec) -> str | None:
    """The revision recorded for a corpus: the requested revision, or ``local`` for files."""
    if spec.source.path is not None:
        return "local"
    return spec.source.revision or "default"
