# Both targets create or reuse .venv and install hrperc with its dev extras into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hrperc-installed

.PHONY: demo test test-all typecheck bench install clean

# _version.py too: the installed metadata (importlib.metadata.version) is built from it.
$(STAMP): pyproject.toml src/hrperc/_version.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## The main job: the high-resolution front end on the generated sample image; pictures go to outputs/.
demo: $(STAMP)
	$(BIN)/hrperc demo --out outputs

## Lint, format check, type check + the whole CPU test suite (Triton kernels run in the interpreter; slow/cuda tests deselected).
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	@# the type check (about a minute cold) runs beside the tests; either failing fails the target
	$(BIN)/mypy src/hrperc > .mypy.log 2>&1 & mypy=$$!; \
	HYPOTHESIS_PROFILE=ci TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m "not slow and not cuda" -n 2; tests=$$?; \
	if wait $$mypy; then tail -1 .mypy.log; else cat .mypy.log; exit 1; fi; exit $$tests

## Everything, including the slow interpreter tests at INF-LLaVA size.
test-all: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q

## Static types of the package (mypy; settings in pyproject.toml's [tool.mypy]).
typecheck: $(STAMP)
	$(BIN)/mypy src/hrperc

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_crop.py
	$(BIN)/python benchmarks/bench_dem.py
	$(BIN)/python benchmarks/bench_window_attention.py
	$(BIN)/python benchmarks/bench_encoder.py

clean:
	rm -rf $(VENV) outputs .pytest_cache .hypothesis
