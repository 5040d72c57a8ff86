"""The docstring examples of every library module run and print what they say (``doctest``)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest
import torch

import hrperc

# Every module of the package, found by walking it (a new module is tested without being listed).
MODULES = sorted(m.name for m in pkgutil.walk_packages(hrperc.__path__, "hrperc.") if m.name != "hrperc.__main__")
# What a module's examples need beyond the core dependencies.
NEEDS = {
    "hrperc.cli.plots": ("matplotlib",),  # examples draw a figure
    "hrperc.attention.kernels.window_attention": ("cuda",),  # its examples run the kernel on a GPU
}
# Modules whose job is not shown by an example (argument parsing, the command's flow).
NO_EXAMPLES = {
    "hrperc.cli",
    "hrperc.cli.args",
    "hrperc.cli.demo",
    "hrperc.cli.encode",
    "hrperc._validation",
    "hrperc.recipes._common",
    "hrperc.integrations",
}


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_pass(name):
    for needed in NEEDS.get(name, ()):
        if needed == "cuda":
            if not torch.cuda.is_available():
                pytest.skip("examples need a CUDA GPU")
            continue
        pytest.importorskip(needed)
    if name.startswith("hrperc.integrations.vllm."):  # the plugin's parts import vLLM (its own environment)
        pytest.importorskip("vllm")
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    if name not in NO_EXAMPLES:
        assert result.attempted > 0, f"{name} has no doctest examples"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name} (see output above)"
