"""Test configuration shared by the whole suite.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at the top, when no
CUDA GPU is visible: that is how every Triton kernel is tested on the CPU.
"""

import os
import shutil

if "TRITON_INTERPRET" not in os.environ and shutil.which("nvidia-smi") is None:
    os.environ["TRITON_INTERPRET"] = "1"
# On a GPU, one fixed kernel configuration per (dtype, head dim) instead of autotuning every shape the
# tests use (hundreds of compiles); set HRPERC_TRITON_AUTOTUNE=1 to test the autotuned path.
os.environ.setdefault("HRPERC_TRITON_AUTOTUNE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# CI profile: derandomized so a failure reproduces, >= 200 examples per property.
settings.register_profile(
    "ci", derandomize=True, max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=50, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
