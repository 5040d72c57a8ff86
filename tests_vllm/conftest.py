"""The vLLM tests' environment: vLLM's caches and temporary files in one temporary directory (removed at the
end), vLLM's engine in the calling process, offline, a small KV cache."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

_ROOT = tempfile.mkdtemp(prefix="hrperc-vllm-")
for _var, _sub in (("VLLM_CACHE_ROOT", "vllm"), ("TMPDIR", "tmp"), ("TORCHINDUCTOR_CACHE_DIR", "inductor")):
    os.makedirs(os.path.join(_ROOT, _sub))
    os.environ[_var] = os.path.join(_ROOT, _sub)
tempfile.tempdir = None  # read TMPDIR again
os.environ.update(
    VLLM_ENABLE_V1_MULTIPROCESSING="0",
    VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
    VLLM_NO_USAGE_STATS="1",
    DO_NOT_TRACK="1",
    HF_HUB_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    TOKENIZERS_PARALLELISM="false",
)
atexit.register(shutil.rmtree, _ROOT, True)


@pytest.fixture(scope="session")
def dirs(tmp_path_factory):
    """The tiny LLaVA-NeXT saved three ways: plain (``None``), with its own front end as front-end files
    (``"identity"``), with an upgraded front end (``"upgraded"``)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import _tiny

    root = tmp_path_factory.mktemp("models")
    return {kind: _tiny.save(root / str(kind), kind) for kind in (None, "identity", "upgraded")}
