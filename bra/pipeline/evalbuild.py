"""Stage one for eval prompts: generate greedy completions, then plan one window per prompt.

Each window is the chat-templated prompt followed by the model's own completion; its ``segment`` column
marks which rows are prompt (``SEGMENT_PROMPT``) and which are completion (``SEGMENT_COMPLETION``). The
build then runs the usual teacher-forced forward over these windows, so a completion row's activation
is the residual stream at that token given everything before it. The text, token counts and surface
labels go to ``prompts.parquet`` (one row per prompt, linked by ``doc_index``); the exact token ids to
``generation.parquet``, which a resumed build reads back instead of generating again.

A generation variant (``Manifest.variant``) builds its own store the same way; its prompt ids are put as the
variant says (``bra.pipeline.generate.format_prompt_ids``), its prefill's ids open the completion segment,
and both tables gain ``schema.VARIANT_COLUMNS`` (the prefill and its token count).

Under torchrun each rank generates a contiguous run of the generation batches a single process would form
(so the completions are the same) and every rank receives all of them.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from bra.cache import schema
from bra.dist import SINGLE, Dist
from bra.errors import ManifestError
from bra.pipeline.generate import (
    GenerationResult,
    check_prompt_format,
    format_prompt_ids,
    generate_completions,
    prefill_ids,
    stop_token_ids,
)
from bra.pipeline.manifest import CANONICAL_FORMAT, Manifest
from bra.pipeline.plan import TokenPlan, Window
from bra.pipeline.prompts import EvalPrompt, load_eval_set_files, metadata_columns
from bra.pipeline.relabel import surface_columns
from bra.vocab import EVAL_TIERS, TIERS

logger = logging.getLogger(__name__)

GENERATION_COUNTS_KEY = "generation"


def _load_sets(manifest: Manifest) -> list[tuple[str, str, list[EvalPrompt]]]:
    """(set name, source path as written in the manifest, prompts) per prompt set, in manifest order."""
    paths = [manifest.resolve(spec.path) for spec in manifest.prompt_sets]
    # validates every file and rejects ids repeated across sets, with file:line
    loaded = load_eval_set_files(paths)
    out: list[tuple[str, str, list[EvalPrompt]]] = []
    names: set[str] = {GENERATION_COUNTS_KEY}
    for spec, prompts in zip(manifest.prompt_sets, loaded, strict=True):
        name, n = Path(spec.path).stem, 1
        while name in names:  # two sets with the same file name in different folders
            n += 1
            name = f"{Path(spec.path).stem}-{n}"
        names.add(name)
        out.append((name, spec.path, prompts))
    return out


def eval_tier_names(manifest: Manifest, prompts: list[EvalPrompt]) -> tuple[str, ...]:
    """The store's tier names (index = tier code): ``TIERS``, then the control tiers the prompts use, in
    ``EVAL_TIERS`` order (so stores of the bundled sets keep their codes). Raises ``ManifestError`` when
    ``hazard_tiers`` or ``benign_tiers`` names a tier no prompt has."""
    present = {p.tier for p in prompts}
    for key in ("hazard_tiers", "benign_tiers"):
        missing = [t for t in getattr(manifest, key) if t not in present]
        if missing:
            raise ManifestError(f"{key}: no prompt has tier {missing[0]!r} (the prompt sets have "
                                f"{', '.join(t for t in EVAL_TIERS if t in present)})")
    return TIERS + tuple(t for t in EVAL_TIERS if t not in TIERS and t in present)


def _check_room(manifest: Manifest, prompts: list[EvalPrompt], tokenizer: Any) -> None:
    """Fail before generating if the longest prompt plus prefill and max_new_tokens could overflow
    max_seq_len."""
    fmt = manifest.prompt_format
    lengths = [len(format_prompt_ids(tokenizer, p.prompt, fmt)) for p in prompts]
    longest = int(np.argmax(lengths))
    n_prefill = len(prefill_ids(tokenizer, fmt))
    need = lengths[longest] + n_prefill + manifest.generation.max_new_tokens
    if need > manifest.max_seq_len:
        what = "chat-template" if fmt.chat_template else "raw prompt"
        prefill = f", the prefill {n_prefill}" if n_prefill else ""
        variant = f" (variant {manifest.variant.name!r})" if manifest.variant is not None else ""
        raise ManifestError(
            f"max_seq_len: {manifest.max_seq_len} is too short for eval windows{variant}: prompt "
            f"{prompts[longest].id!r} has {lengths[longest]} {what} tokens{prefill} and "
            f"generation.max_new_tokens is {manifest.generation.max_new_tokens}; raise max_seq_len to at "
            f"least {need} (prompt + completion windows are never truncated)"
        )


def preflight(manifest: Manifest, tokenizer: Any,
              key: str | None = None) -> list[tuple[str, str, list[EvalPrompt]]]:
    """Everything that can fail before generating, checked without the model: the prompt files, the class
    tiers, whether the tokenizer can put the prompts as the variant asks (errors name ``key``, by default
    the variant), and whether every window fits. Returns the prompt sets (``_load_sets``)."""
    sets = _load_sets(manifest)
    prompts = [p for _, _, ps in sets for p in ps]
    eval_tier_names(manifest, prompts)
    if manifest.variant is not None:
        check_prompt_format(tokenizer, manifest.variant,
                            key or f"generation.variants[{manifest.variant.name}]")
    _check_room(manifest, prompts, tokenizer)
    return sets


def _window(doc_index: int, result: GenerationResult) -> Window:
    ids = np.asarray(result.prompt_ids + result.completion_ids, dtype=np.int32)
    segment = np.concatenate([np.full(len(result.prompt_ids), schema.SEGMENT_PROMPT, np.int8),
                              np.full(len(result.completion_ids), schema.SEGMENT_COMPLETION, np.int8)])
    return Window(doc_index, ids, segment)


def _variant_columns(manifest: Manifest, results: list[GenerationResult]) -> dict[str, Any]:
    """``schema.VARIANT_COLUMNS`` of a variant store (the prefill, empty when none, and its token count);
    nothing for a manifest without variants, whose tables keep their columns."""
    if manifest.variant is None:
        return {}
    prefill, n_prefill = schema.VARIANT_COLUMNS
    return {prefill: [manifest.variant.prefill or ""] * len(results),
            n_prefill: np.asarray([r.n_prefill_tokens for r in results], dtype=np.int32)}


def generation_table(results: list[GenerationResult], manifest: Manifest | None = None) -> pd.DataFrame:
    """The generation results as a table (``GENERATION_TABLE``), one row per prompt in plan order; a variant
    ``manifest`` adds ``schema.VARIANT_COLUMNS``."""
    table = pd.DataFrame({
        "doc_index": np.arange(len(results), dtype=np.int32),
        "prompt_ids": [np.asarray(r.prompt_ids, dtype=np.int32) for r in results],
        "completion_ids": [np.asarray(r.completion_ids, dtype=np.int32) for r in results],
        "text": [r.text for r in results],
        "finished": np.asarray([r.finished for r in results], dtype=bool),
    })[list(schema.GENERATION_COLUMNS)]
    return table.assign(**_variant_columns(manifest, results)) if manifest is not None else table


def results_from_table(table: pd.DataFrame) -> list[GenerationResult]:
    """Inverse of ``generation_table``."""
    rows = table.sort_values("doc_index")
    key = schema.VARIANT_COLUMNS[1]
    n_prefill = rows[key] if key in rows.columns else [0] * len(rows)
    return [GenerationResult([int(i) for i in p], [int(i) for i in c], str(t), bool(f), int(n))
            for p, c, t, f, n in zip(rows["prompt_ids"], rows["completion_ids"], rows["text"],
                                     rows["finished"], n_prefill, strict=True)]


def _saved_results(saved: pd.DataFrame | None, prompts: list[EvalPrompt], tokenizer: Any,
                   manifest: Manifest | None = None) -> list[GenerationResult] | None:
    """The saved results when they belong to exactly these prompts as this tokenizer puts them (the
    variant's format and prefill, by default the canonical chat template)."""
    if saved is None:
        return None
    try:
        results = results_from_table(saved)
    except (KeyError, TypeError, ValueError):
        logger.warning("the saved completions are unreadable; generating them again")
        return None
    fmt = manifest.prompt_format if manifest is not None else CANONICAL_FORMAT
    opening = prefill_ids(tokenizer, fmt)
    if len(results) != len(prompts) or any(
            r.prompt_ids != format_prompt_ids(tokenizer, p.prompt, fmt)
            or r.completion_ids[:r.n_prefill_tokens] != opening or r.n_prefill_tokens != len(opening)
            for r, p in zip(results, prompts, strict=True)):
        logger.warning("the saved completions belong to other prompts; generating them again")
        return None
    logger.info("reusing the %d completions saved by the interrupted build", len(results))
    return results


def _generate_shared(model: nn.Module, tokenizer: Any, prompts: list[str], manifest: Manifest,
                     device: torch.device, dist: Dist) -> list[GenerationResult]:
    """Every prompt's completion, each rank generating a contiguous run of whole batches (see module doc)."""
    spec = manifest.generation
    n_batches = -(-len(prompts) // spec.batch_size)
    mine = np.array_split(np.arange(n_batches), dist.world)[dist.rank]
    lo = int(mine[0]) * spec.batch_size if len(mine) else 0
    hi = min(len(prompts), (int(mine[-1]) + 1) * spec.batch_size) if len(mine) else 0
    local: list[GenerationResult] = []
    error = None
    try:
        if hi > lo:
            local = generate_completions(model, tokenizer, prompts[lo:hi], spec, device,
                                         manifest.prompt_format)
    except Exception as exc:  # every rank must learn of it, or the others wait at the gather
        error = exc
    dist.check(error)
    return [r for part in dist.gather(local) for r in part]


def plan_prompts(manifest: Manifest, model: nn.Module, tokenizer: Any, device: torch.device,
                 dist: Dist = SINGLE, saved: pd.DataFrame | None = None,
                 ) -> tuple[TokenPlan, dict[str, pd.DataFrame]]:
    """Generate completions for the manifest's prompt sets (or reuse ``saved``, an interrupted build's
    ``GENERATION_TABLE``); return the plan and ``{PROMPTS_TABLE: ..., GENERATION_TABLE: ...}``."""
    sets = preflight(manifest, tokenizer)
    prompts = [p for _, _, ps in sets for p in ps]
    tier_names = eval_tier_names(manifest, prompts)
    results = _saved_results(saved, prompts, tokenizer, manifest)
    if results is None:
        t0 = time.perf_counter()
        results = _generate_shared(model, tokenizer, [p.prompt for p in prompts], manifest, device, dist)
        seconds = time.perf_counter() - t0
        n_new = sum(len(r.completion_ids) - r.n_prefill_tokens for r in results)  # a prefill is not new
        logger.info("generation: %d new tokens in %.1fs (%.0f tok/s)", n_new, seconds,
                    n_new / max(seconds, 1e-9))

    plan = TokenPlan(tier_names=tier_names)
    rows: list[dict[str, Any]] = []
    offset = 0
    it = iter(zip(prompts, results, strict=True))
    for name, source, set_prompts in sets:
        counts = {"docs": 0, "tokens": 0, "windows": 0, "completion_tokens": 0, "finished": 0}
        for _ in set_prompts:
            prompt, result = next(it)
            window = _window(len(plan.docs), result)
            n = len(window.ids)
            if n > manifest.max_seq_len:  # _check_room makes this unreachable unless the template changed
                raise ManifestError(f"max_seq_len: prompt {prompt.id!r} with its completion is {n} tokens, "
                                    f"longer than max_seq_len {manifest.max_seq_len}; raise max_seq_len")
            tier_code = tier_names.index(prompt.tier)
            plan.docs.append({
                "doc_index": window.doc_index, "doc_id": prompt.id, "tier": prompt.tier,
                "tier_code": tier_code, "corpus": name, "source": source, "n_tokens": n,
                "token_offset": offset, "n_windows": 1, "n_text_tokens": n,
            })
            plan.tier_codes[window.doc_index] = tier_code
            plan.windows.append(window)
            rows.append(_prompt_row(prompt, result, window.doc_index))
            offset += n
            counts["docs"] += 1
            counts["windows"] += 1
            counts["tokens"] += n
            counts["completion_tokens"] += len(result.completion_ids)
            counts["finished"] += int(result.finished)
        plan.counts[name] = counts
    plan.counts[GENERATION_COUNTS_KEY] = _generation_record(manifest, model, tokenizer, results)
    table = pd.DataFrame(rows)
    # The prompt sets' own extra fields follow the schema's columns (none for files in the upstream format).
    # A variant's prefill columns come next (none without variants), then the prompt sets' own fields.
    variant = _variant_columns(manifest, results)
    forced = variant.get(schema.VARIANT_COLUMNS[0])  # a prefill is the audit's words, not the model's
    surface = surface_columns(table["prompt"].tolist(), table["completion"].tolist(), forced)
    for key, values in surface.items():
        table[key] = values
    extra = metadata_columns(prompts, taken=schema.PROMPT_COLUMNS + tuple(variant))
    return plan, {schema.PROMPTS_TABLE: table[list(schema.PROMPT_COLUMNS)].assign(**variant).assign(**extra),
                  schema.GENERATION_TABLE: generation_table(results, manifest)}


def _prompt_row(prompt: EvalPrompt, result: GenerationResult, doc_index: int) -> dict[str, Any]:
    return {
        "id": prompt.id, "tier": prompt.tier, "framing": prompt.framing, "category": prompt.category,
        "domain": prompt.domain, "expected_surface": prompt.expected_surface, "prompt": prompt.prompt,
        "completion": result.text, "n_prompt_tokens": len(result.prompt_ids),
        "n_completion_tokens": len(result.completion_ids), "doc_index": doc_index,
        "finished": result.finished,
        "rationale": prompt.rationale, "sampled_from": prompt.sampled_from,
    }


def _generation_record(manifest: Manifest, model: nn.Module, tokenizer: Any,
                       results: list[GenerationResult]) -> dict[str, Any]:
    """How the completions were made (stored in the store's attrs under corpus_counts)."""
    g, fmt = manifest.generation, manifest.prompt_format
    record = {
        "decoding": "greedy", "max_new_tokens": g.max_new_tokens, "seed": g.seed, "batch_size": g.batch_size,
        "padding": "left", "chat_template": fmt.chat_template,
        "stop_token_ids": stop_token_ids(model, tokenizer),
        "prompts": len(results), "finished": sum(int(r.finished) for r in results),
        "completion_tokens": sum(len(r.completion_ids) for r in results),
    }
    if manifest.variant is not None:  # a store without variants keeps the record it always had
        record.update(variant=fmt.name, system_prompt=fmt.system_prompt, prefill=fmt.prefill,
                      prefill_tokens=sum(r.n_prefill_tokens for r in results))
    return record
