"""``bra-organism build``: make the shallow and deep model organisms a recipe names, resumably.

Everything that can fail on bad input is checked before any weight is loaded or trained: the hooked layer
against the model's config, the prompt tiers, the corpus files and, once the tokenizer is there, that the
corpora give text. Then, per kind: load the base model fresh, resume its checkpoint if one of the same recipe
is there, run the stages (deep: RMU, then refusal; shallow: refusal), check that nothing outside the stages'
parameters changed (shallow: nothing up to block L, so its layer-L residual is bitwise the base model's),
and publish ``<output>/<kind>/`` whole (`bra.fsutil.atomic_dir`) with its ``provenance.json``.
Work in progress lives in ``<output>/.work/``: the base model's answers (shared by both kinds) and each
kind's checkpoint, removed once that kind is published.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bra import __version__
from bra.errors import CorpusError, OrganismError
from bra.fsutil import atomic_dir, write_text_atomic
from bra.organism.config import DEEP, SHALLOW, OrganismManifest
from bra.organism.data import (
    REFUSALS,
    Example,
    RMUData,
    answer_examples,
    end_of_turn_id,
    refusal_examples,
    rmu_data,
    sha256_file,
    training_prompts,
)
from bra.organism.params import StageParams, changed_params, lm_head_state, refusal_params, rmu_params
from bra.organism.provenance import PROVENANCE_FILE, load_provenance, write_provenance
from bra.organism.train import (
    DONE,
    Checkpoint,
    RefusalStage,
    RMUStage,
    TrainState,
    mean_token_norm,
    rmu_direction,
    run_stage,
)
from bra.pipeline.generate import GenerationResult, generate_completions, stop_token_ids
from bra.pipeline.manifest import GenerationSpec
from bra.pipeline.model import (
    check_layers,
    config_int,
    converted_dir,
    load_config,
    load_model,
    model_path,
    resolve_compute_dtype,
    resolve_device,
)
from bra.pipeline.prompts import EvalPrompt

logger = logging.getLogger(__name__)

WORK_DIR = ".work"
ANSWERS_FILE = "answers.json"
BUILT, RESUMED, ALREADY_BUILT, STOPPED = "built", "resumed", "already-built", "stopped"
_DESCRIPTIONS = {
    SHALLOW: "refusal trained above the hooked layer only; every parameter up to and including block L (and "
             "the embeddings) is the base model's, so the layer-L residual is bitwise the base model's",
    DEEP: "RMU on blocks at and below L (forget: hazard tier -> c*u; retain: benign tier held to the base "
          "model), then the same refusal training above L",
}


@dataclass(frozen=True)
class OrganismResult:
    """What ``build_organisms`` did for one kind."""

    kind: str
    """``shallow`` or ``deep``."""
    path: Path
    """The organism's folder."""
    status: str
    """built, resumed, already-built or stopped (``stop_after_steps`` ran out)."""
    seconds: float
    """Training time of the organism, all its resumes together (0 when stopped)."""


@dataclass
class _Job:
    """What every kind of one call shares."""

    manifest: OrganismManifest
    refuse: list[EvalPrompt]
    answer: list[EvalPrompt]
    digests: dict[str, Any]
    device: torch.device
    dtype: torch.dtype
    examples: list[Example] | None = None
    rmu: RMUData | None = None
    answers_seconds: float = 0.0
    end_id: int = -1


def compute_dtype(manifest: OrganismManifest, device: torch.device) -> torch.dtype:
    """The training dtype: the model's ``compute_dtype``, ``auto`` meaning float32 (AdamW on bf16 weights
    loses small updates; fp32 also keeps the frozen weights exactly the base checkpoint's fp32 values)."""
    name = manifest.model.compute_dtype
    return torch.float32 if name == "auto" else resolve_compute_dtype(name, device)


def model_key(manifest: OrganismManifest) -> dict[str, Any]:
    """The base model's identity in fingerprints and provenance."""
    spec = manifest.model
    key: dict[str, Any] = {"id": spec.id, "revision": spec.revision, "gguf": spec.gguf}
    if spec.gguf:
        key["converted"] = converted_dir(spec.gguf).name  # carries the GGUF file's content hash
    return key


def data_digests(manifest: OrganismManifest) -> dict[str, Any]:
    """SHA-256 of the prompt file and of every local corpus file (``CorpusError`` when one is missing);
    hub corpora by name, config, split and revision."""
    out: dict[str, Any] = {"prompts": {"path": manifest.prompts,
                                       "sha256": sha256_file(manifest.resolve(manifest.prompts))}}
    for key in ("forget", "retain"):
        rows = []
        for i, c in enumerate(getattr(manifest, key)):
            src = c.source
            row: dict[str, Any] = {"name": c.name or c.tier, "tier": c.tier, "max_docs": c.max_docs,
                                   "max_tokens": c.max_tokens}
            if src.path is not None:
                local = manifest.resolve(src.path)
                if not local.is_file():
                    raise CorpusError(f"{key}[{i}].source.path: file not found: {local}")
                row.update(path=src.path, sha256=sha256_file(local))
            else:
                row.update(hf=src.hf, config=src.config, split=src.split, revision=src.revision)
            rows.append(row)
        out[key] = rows
    return out


def fingerprint(manifest: OrganismManifest, kind: str, digests: dict[str, Any]) -> str:
    """What determines one organism: its recipe (the shallow one ignores RMU and its corpora), data and base
    model. A checkpoint or an organism of another fingerprint is never reused."""
    recipe = manifest.content_dict()
    recipe.pop("kinds")
    data = dict(digests)
    if kind == SHALLOW:
        for key in ("rmu", "forget", "retain"):
            recipe.pop(key)
            data.pop(key, None)
    payload = json.dumps({"kind": kind, "recipe": recipe, "data": data, "model": model_key(manifest)},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _preflight(manifest: OrganismManifest) -> tuple[list[EvalPrompt], list[EvalPrompt], dict[str, Any]]:
    """The checks that need no weights: layer vs the config's depth, prompt tiers, data files."""
    config = load_config(manifest.model)
    n_layers = config_int(config, "num_hidden_layers", manifest.model.id)
    check_layers([manifest.layer], n_layers, manifest.model.id)
    if manifest.layer >= n_layers - 1:
        raise OrganismError(f"layer: {manifest.layer} is the last block of {manifest.model.id} "
                            f"(0..{n_layers - 1}): nothing above it to train the refusal into; hook a lower "
                            f"layer")
    refuse, answer = training_prompts(manifest)
    return refuse, answer, data_digests(manifest)


def _existing(target: Path, fp: str, overwrite: bool) -> bool:
    """True when ``target`` is already this organism; refuse anything else there unless ``overwrite``."""
    if not target.exists():
        return False
    if overwrite:
        return False
    if not (target / PROVENANCE_FILE).is_file():
        raise OrganismError(f"{target} exists and is not an organism folder; move it away or pass "
                            f"--overwrite")
    if load_provenance(target).get("fingerprint") == fp:
        return True
    raise OrganismError(f"{target} holds an organism of another recipe, data or base model; pass --overwrite "
                        f"to rebuild it")


def build_organisms(manifest: OrganismManifest, out: str | Path | None = None,
                    kinds: tuple[str, ...] | None = None, overwrite: bool = False,
                    stop_after_steps: int | None = None) -> list[OrganismResult]:
    """Build (or resume, or skip when built) each organism of ``kinds`` (default the recipe's) under ``out``
    (default ``manifest.output_dir``). ``stop_after_steps``: end the call after that many training steps, as
    a kill would (no checkpoint), leaving the rest for a resumed call; for tests."""
    kinds = kinds or manifest.kinds
    bad = [k for k in kinds if k not in (SHALLOW, DEEP)]
    if bad:
        raise OrganismError(f"kind {bad[0]!r}: expected {SHALLOW} or {DEEP}")
    if DEEP in kinds and not (manifest.forget and manifest.retain):
        raise OrganismError("forget/retain: the deep organism needs forget and retain corpora (RMU)")
    out_dir = Path(out) if out is not None else manifest.output_dir
    refuse, answer, digests = _preflight(manifest)
    results: list[OrganismResult] = []
    pending = []
    for kind in kinds:
        target = out_dir / kind
        if _existing(target, fingerprint(manifest, kind, digests), overwrite):
            logger.info("%s is already built; nothing to do", target)
            seconds = float(load_provenance(target).get("seconds", {}).get("total", 0.0))
            results.append(OrganismResult(kind, target, ALREADY_BUILT, seconds))
        else:
            pending.append(kind)
    if not pending:
        return results
    if overwrite:
        for kind in pending:
            shutil.rmtree(out_dir / WORK_DIR / kind, ignore_errors=True)
    device = resolve_device(manifest.model.device)
    job = _Job(manifest, refuse, answer, digests, device, compute_dtype(manifest, device))
    budget = [stop_after_steps] if stop_after_steps is not None else None
    for kind in pending:
        model, tokenizer = load_model(manifest.model, device, job.dtype)
        plain_weights(model)
        _stage_params(model, manifest, pending)  # bad rmu.params or layer: before anything runs
        _prepare(job, model, tokenizer, out_dir / WORK_DIR, DEEP in pending)
        results.append(_build_kind(job, kind, model, tokenizer, out_dir, budget))
        if results[-1].status == STOPPED:
            break
    return results


def plain_weights(model: nn.Module) -> None:
    """Make a model loaded from a GGUF conversion savable: `bra.pipeline.model.materialize_gguf` stores
    dequantised fp32 weights, but the folder's config keeps GGUF's ``quantization_config``, so transformers
    marks the model quantized and ``save_pretrained`` refuses it. The weights are plain tensors: drop the
    marker (the organism is saved as an ordinary fp32 checkpoint). Any other quantizer is refused, before
    training: its weights are not the plain tensors the stages train."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    method = getattr(quantizer.quantization_config, "quant_method", None)
    if str(getattr(method, "value", method)) != "gguf":
        raise OrganismError(f"the base model is quantized ({method}); organisms train plain weights: give an "
                            f"unquantized checkpoint")
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)
    logger.debug("dropped the GGUF quantization marker (the weights were dequantised at conversion)")


def _prepare(job: _Job, model: nn.Module, tokenizer: Any, work: Path, need_rmu: bool) -> None:
    """Once per call, with the base model: the RMU windows (the corpora's emptiness is checked here, before
    any generation), the base model's answers and the refusal-stage examples."""
    if need_rmu and job.rmu is None:
        job.rmu = rmu_data(job.manifest, tokenizer, job.refuse, job.answer)
    if job.examples is not None:
        return
    answers, job.answers_seconds = base_answers(job, model, tokenizer, work)
    job.end_id = end_of_turn_id(answers, stop_token_ids(model, tokenizer), tokenizer)
    job.examples = refusal_examples(job.refuse, tokenizer, job.end_id) + answer_examples(job.answer, answers)


def base_answers(job: _Job, model: nn.Module, tokenizer: Any, work: Path) -> tuple[list[GenerationResult],
                                                                                   float]:
    """The base model's greedy answers to the answer tiers' prompts and the seconds they took, read from
    ``<work>/answers.json`` when an earlier call of the same model, prompts and settings made them."""
    m, r = job.manifest, job.manifest.refusal
    spec = GenerationSpec(max_new_tokens=r.max_new_tokens, seed=m.seed, batch_size=r.generation_batch_size)
    payload = {"model": model_key(m), "prompts": job.digests["prompts"], "ids": [p.id for p in job.answer],
               "generation": dataclasses.asdict(spec), "dtype": str(job.dtype)}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    cache = work / ANSWERS_FILE
    if cache.is_file():
        saved = json.loads(cache.read_text(encoding="utf-8"))
        if saved.get("key") == key:
            logger.info("reusing the base model's %d answers from %s", len(saved["results"]), cache)
            return [GenerationResult(**row) for row in saved["results"]], float(saved["seconds"])
    t0 = time.perf_counter()
    answers = generate_completions(model, tokenizer, [p.prompt for p in job.answer], spec, job.device)
    seconds = time.perf_counter() - t0
    work.mkdir(parents=True, exist_ok=True)
    write_text_atomic(cache, json.dumps({"key": key, "seconds": seconds,
                                         "results": [dataclasses.asdict(a) for a in answers]}))
    return answers, seconds


def _stage_params(model: nn.Module, m: OrganismManifest, kinds: list[str]) -> dict[str, StageParams]:
    """The parameters of each stage the ``kinds`` run (RMU only for the deep organism)."""
    out = {"refusal": refusal_params(model, m.layer)}
    if DEEP in kinds:
        out["rmu"] = rmu_params(model, m.layer, m.rmu.blocks, m.rmu.params)
    return out


def _build_kind(job: _Job, kind: str, model: nn.Module, tokenizer: Any, out_dir: Path,
                budget: list[int] | None) -> OrganismResult:
    m = job.manifest
    fp = fingerprint(m, kind, job.digests)
    work = out_dir / WORK_DIR / kind
    checkpoint = Checkpoint(work / "checkpoint")
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = checkpoint.load(model)
    if state is not None and state.fingerprint != fp:
        raise OrganismError(f"{work}: a checkpoint of another recipe, data or base model; pass --overwrite "
                            f"to start again")
    status = RESUMED if state is not None else BUILT
    order = ["rmu", "refusal"] if kind == DEEP else ["refusal"]
    state = state or TrainState(stage=order[0], fingerprint=fp)
    params = _stage_params(model, m, [kind])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else job.end_id
    logger.info("%s organism (%s): %s", kind, "resuming" if status == RESUMED else "starting",
                "; ".join(f"{s}: {params[s].summary}" for s in order))
    kept: set[str] = set()
    for i, name in enumerate(order):
        if state.stage == DONE or order.index(state.stage) > i:
            kept |= set(params[name].names)
            continue
        stage = _make_stage(name, job, model, reference, params[name], state, pad_id)
        if not run_stage(model, stage, checkpoint, state, kept, budget):
            return OrganismResult(kind, out_dir / kind, STOPPED, 0.0)
        kept |= set(params[name].names)
        state.stage, state.step, state.optimizer = (order[i + 1] if i + 1 < len(order) else DONE), 0, None
        checkpoint.save(model, kept, state)
    frozen = _frozen_check(model, reference, params, kind)
    provenance = _provenance(job, kind, fp, model, params, state, frozen)
    target = out_dir / kind
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)  # type: ignore[operator]
        tokenizer.save_pretrained(tmp)
        write_provenance(tmp, provenance)
    shutil.rmtree(work, ignore_errors=True)
    seconds = provenance["seconds"]["total"]
    logger.info("%s organism written to %s (%.0f s of training)", kind, target, seconds)
    return OrganismResult(kind, target, status, seconds)


def _make_stage(name: str, job: _Job, model: nn.Module, reference: dict[str, torch.Tensor],
                params: StageParams, state: TrainState, pad_id: int) -> RefusalStage | RMUStage:
    m = job.manifest
    if name == "refusal":
        assert job.examples is not None
        return RefusalStage(model, job.examples, m.refusal, params, m.seed, pad_id, job.device)
    assert job.rmu is not None
    frozen = copy.deepcopy(model)  # the base model: RMU's retain targets; at step 0 this model is the base
    with torch.no_grad():
        for n, p in frozen.named_parameters():
            p.copy_(reference[n])
            p.requires_grad_(False)
    if state.steering_coeff is None:
        c = m.rmu.steering_coeff
        if c is None:
            c = m.rmu.steering_ratio * mean_token_norm(frozen, job.rmu.forget, m.layer, pad_id, job.device)
        state.steering_coeff = float(c)
    d_model = int(model.get_input_embeddings().weight.shape[1])  # type: ignore[operator, union-attr]
    target = state.steering_coeff * rmu_direction(d_model, m.seed)
    logger.info("RMU: c = %.4g, %d forget and %d retain windows", state.steering_coeff, len(job.rmu.forget),
                len(job.rmu.retain))
    return RMUStage(model, frozen, job.rmu, m.rmu, params, m.layer, target, m.seed, pad_id, job.device)


def _frozen_check(model: nn.Module, reference: dict[str, torch.Tensor], params: dict[str, StageParams],
                  kind: str) -> dict[str, Any]:
    """Which parameters changed, checked against what the stages may change: the shallow organism changes
    nothing at or below L; the deep one only RMU's parameters there."""
    changed = changed_params(model, reference)
    above = set(params["refusal"].names)
    allowed = above | (set(params["rmu"].names) if kind == DEEP else set())
    outside = [n for n in changed if n not in allowed]
    if outside:
        raise OrganismError(f"parameter {outside[0]} changed though no stage trains it (a bug; nothing "
                            f"written)")
    below = [n for n in changed if n not in above]
    return {"changed_tensors": len(changed), "changed_at_or_below_layer": below,
            "layer_residual_is_base": not below}


def _provenance(job: _Job, kind: str, fp: str, model: nn.Module, params: dict[str, StageParams],
                state: TrainState, frozen: dict[str, Any]) -> dict[str, Any]:
    import transformers

    m = job.manifest
    data = dict(job.digests)
    if kind == SHALLOW:
        data.pop("forget", None)
        data.pop("retain", None)
    seconds = {"base_answers": round(job.answers_seconds, 2),
               **{k: round(v, 2) for k, v in state.seconds.items()}}
    seconds["total"] = round(sum(seconds.values()), 2)
    prov: dict[str, Any] = {
        "kind": kind, "description": _DESCRIPTIONS[kind], "fingerprint": fp,
        "base_model": {**model_key(m), "loaded_from": model_path(m.model)},
        "layer": m.layer, "hook_name": f"blocks.{m.layer}.hook_resid_post", "seed": m.seed,
        "recipe": m.content_dict(), "data": data,
        "trained_prompt_ids": sorted(p.id for p in job.refuse + job.answer),
        "refused_prompt_ids": [p.id for p in job.refuse], "answered_prompt_ids": [p.id for p in job.answer],
        "refusal_targets": list(REFUSALS), "end_of_turn_id": job.end_id,
        "trainable": {s: params[s].summary for s in (["rmu", "refusal"] if kind == DEEP else ["refusal"])},
        "lm_head": lm_head_state(model), "frozen_check": frozen,
        "losses": {s: {"first": v[0], "last": v[-1], "all": [round(x, 5) for x in v]}
                   for s, v in state.losses.items() if v},
        "metrics": {s: {"first": v[0], "last": v[-1]} for s, v in state.metrics.items() if v},
        "seconds": seconds,
        "compute": {"device": str(job.device), "dtype": str(job.dtype).removeprefix("torch."),
                    "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "transformers": transformers.__version__},
        "package_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if kind == DEEP and job.rmu is not None:
        prov["rmu"] = {"steering_coeff": state.steering_coeff, "direction": "uniform [0,1)^d normalised, "
                       f"seed {m.seed}", "forget_windows": len(job.rmu.forget),
                       "retain_windows": len(job.rmu.retain), "corpora": job.rmu.corpora}
    return prov
