# The two commands a newcomer needs: `make demo` and `make test`. Both do all set-up.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
WORKERS ?= 1

.PHONY: demo test test-all lint bench clean

$(STAMP): pyproject.toml requirements.lock
	@set -e; base=$$(scripts/find_python.sh); \
	if [ ! -x $(PY) ]; then echo "creating $(VENV) with $$base"; "$$base" -m venv $(VENV); fi
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements.lock -e ".[dev,slurm]"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/memx sweep experiments/demo/ablation.py --workers $(WORKERS) --workdir runs

test: $(STAMP)
	$(PY) -m pytest -n 2 -q

test-all: $(STAMP)
	$(PY) -m pytest -n 2 -q -m "not gpu and not tpu"

lint: $(STAMP)
	$(VENV)/bin/ruff check memx tests scripts experiments

clean:
	rm -rf $(VENV) runs .pytest_cache
