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

# pytest-xdist workers share the machine's cores: torch's default (one intra-op thread per core in every
# worker) oversubscribes them, and the tests' tiny ops only wait on each other's threads.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    their ops are too small to gain from threads, and on a loaded machine the wake-ups cost 10-50x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
