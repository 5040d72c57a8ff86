"""The vLLM tests' environment: vLLM's caches and temporary files in one temporary directory (removed at the
end), vLLM's engine in the calling process, offline, a small KV cache. The fixtures save the tiny models and
run vLLM on them once for all the tests (two processes: without the plugin, with it)."""

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
sys.path.insert(0, str(Path(__file__).parent))

FAMILIES = ("llava_next", "llava")
KINDS = (None, "identity", "upgraded")


@pytest.fixture(scope="session")
def dirs(tmp_path_factory):
    """``dirs[family][kind]``: the tiny model of each family saved plain (``None``), with its own front end as
    front-end files (``"identity"``), with an upgraded front end (``"upgraded"``)."""
    import _tiny

    root = tmp_path_factory.mktemp("models")
    return {f: {k: _tiny.save(root / f / str(k), k, family=f) for k in KINDS} for f in FAMILIES}


@pytest.fixture(scope="session")
def served(dirs, tmp_path_factory):
    """vLLM's answers, ``served[family][name]``: ``"plain"`` without the plugin (the plain directory); with it
    ``"identity"``, ``"base"`` (the plain directory), ``"upgraded"``, and LLaVA-NeXT's ``"identity_bf16"`` /
    ``"upgraded_bf16"``. Two processes in all, one engine after the other in each."""
    from _harness import vllm_generate

    tmp = tmp_path_factory.mktemp("vllm")
    plain = vllm_generate([(dirs[f][None], "float32") for f in FAMILIES], "", tmp)
    jobs = {
        (f, name): (dirs[f][kind], "float32")
        for f in FAMILIES
        for name, kind in (("identity", "identity"), ("base", None), ("upgraded", "upgraded"))
    }
    jobs[("llava_next", "identity_bf16")] = (dirs["llava_next"]["identity"], "bfloat16")
    jobs[("llava_next", "upgraded_bf16")] = (dirs["llava_next"]["upgraded"], "bfloat16")
    results = vllm_generate(list(jobs.values()), "hrperc", tmp)
    out: dict = {f: {"plain": p} for f, p in zip(FAMILIES, plain)}
    for (f, name), result in zip(jobs, results):
        out[f][name] = result
    return out


def pytest_configure(config):
    config.addinivalue_line("markers", "server: starts vLLM's OpenAI-compatible server (select with -m server)")
