# nvfp4 workbook. `make test` and `make run-notebooks` each work as the first command on a fresh
# clone: they create the virtual environment they need (see `make setup`).
VENV ?= .venv
PY := $(VENV)/bin/python
SETUP_STAMP := $(VENV)/.setup-stamp
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9]*.ipynb))
# CPU-sized runs by default; on a GPU host: make run-notebooks NB_PARAMS="-p device cuda -p full_size True"
NB_PARAMS ?=

.PHONY: setup test test-vllm run-notebooks lab clean

setup: $(SETUP_STAMP)

$(SETUP_STAMP): pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV)
	touch $@

test: setup
	$(PY) -m pytest -q -rs tests

# vLLM 0.33.0 in its own venv outside the clone (scripts/vllm_env.sh: ~10 GB, ~5 min the first time,
# reused by later runs and other clones); the tests run vLLM's real layers and loaders on the CPU.
test-vllm:
	py=$$(bash scripts/vllm_env.sh) && VLLM_TARGET_DEVICE=cpu $$py -m pytest -q -rs tests_vllm

run-notebooks: setup
	$(PY) scripts/run_notebooks.py --out reports $(NB_PARAMS) $(NOTEBOOKS)

lab: setup
	$(VENV)/bin/jupyter lab notebooks

clean:
	rm -rf reports .pytest_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
