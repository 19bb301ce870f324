# One venv in .venv; every target creates it if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv demo test docs notebooks bench clean

$(BIN)/imex-deq: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/imex-deq

# The main job: a short real reproduction of the paper's MNIST-dense table on scikit-learn's
# bundled digits (no download), printing the table.
demo: venv
	$(BIN)/imex-deq reproduce mnist-dense --dataset digits --seeds 1 --epochs 4 \
		--solvers continuous,anderson --no-progress --out results

# The test suite (executes the notebooks and builds the docs too).
test: venv
	$(BIN)/pytest -q -n 2 --durations=15

docs: venv
	$(BIN)/mkdocs build --strict

# Execute every tutorial notebook's source (notebooks/*.py) in a fresh kernel and store it,
# outputs and figures included, as notebooks/*.ipynb (see notebooks/README.md).
notebooks: venv
	$(BIN)/python scripts/execute_notebooks.py

bench: venv
	$(BIN)/python scripts/bench_solvers.py

clean:
	rm -rf $(VENV) results site
