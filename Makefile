# Both targets create or reuse .venv and install hrperc with its dev extras into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hrperc-installed

.PHONY: demo test test-all bench install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## The main job: the high-resolution front end on the generated sample image; pictures go to outputs/.
demo: $(STAMP)
	$(BIN)/hrperc demo --out outputs

## Lint + the whole CPU test suite (Triton kernels run in the interpreter; slow/cuda tests deselected).
test: $(STAMP)
	$(BIN)/ruff check .
	HYPOTHESIS_PROFILE=ci TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m "not slow and not cuda" -n 2

## Everything, including the slow interpreter tests at INF-LLaVA size.
test-all: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_crop.py
	$(BIN)/python benchmarks/bench_dem.py
	$(BIN)/python benchmarks/bench_window_attention.py
	$(BIN)/python benchmarks/bench_encoder.py

clean:
	rm -rf $(VENV) outputs .pytest_cache .hypothesis
