"""The docstring examples of the library run and print what they say (``doctest``)."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch

# Imported by name: ``hrperc.crop`` as an attribute is the ``crop`` function, not the module.
MODULES = {
    "hrperc.crop": (),
    "hrperc.modules.dual_crop": (),
    "hrperc.cli.sample": ("PIL", "numpy"),
    "hrperc.cli.plots": ("matplotlib",),  # examples draw a figure
    "hrperc._cache": (),
    "hrperc.attention": (),
    "hrperc.dem": (),
    "hrperc.fusion": (),
    "hrperc.reduction": (),
    "hrperc.projector": (),
    "hrperc.pretrained._io": ("safetensors",),
    "hrperc.encoder": ("timm",),
    "hrperc.backbones.base": ("timm",),
    "hrperc.backbones.factory": ("timm",),
    "hrperc.attention.kernels.window_attention": ("cuda",),  # its examples run the kernel on a GPU
}


@pytest.mark.parametrize("name", list(MODULES))
def test_docstring_examples_pass(name):
    for needed in MODULES[name]:
        if needed == "cuda":
            if not torch.cuda.is_available():
                pytest.skip("examples need a CUDA GPU")
            continue
        pytest.importorskip(needed)
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0, f"{name} has no doctest examples"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name} (see output above)"
