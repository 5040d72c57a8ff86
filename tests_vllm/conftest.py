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

FAMILIES = ("llava_next", "llava", "llava_onevision")
KINDS = (None, "identity", "upgraded")


def requests_of(family: str) -> list[dict]:
    """The batch the ``served`` fixture sends to ``family``'s engines."""
    from _harness import REQUESTS
    from _tiny import ONEVISION_REQUESTS

    return ONEVISION_REQUESTS if family == "llava_onevision" else REQUESTS


@pytest.fixture(scope="session")
def dirs(tmp_path_factory):
    """``dirs[family][kind]``: the tiny model of each family saved plain (``None``), with its own front end as
    front-end files (``"identity"``), with an upgraded front end (``"upgraded"``)."""
    import _tiny

    root = tmp_path_factory.mktemp("models")
    return {f: {k: _tiny.save(root / f / str(k), k, family=f) for k in KINDS} for f in FAMILIES}


def vllm_jobs(jobs: list[dict], plugins: str, tmp_path) -> list[dict]:
    """``_generate.py``'s results for ``jobs`` (``{"model", "dtype", "requests", "limits"?}`` each) in one fresh
    process (``plugins``: ``VLLM_PLUGINS``, "" for none)."""
    import json
    import subprocess

    from _harness import HERE, MAX_TOKENS, REQUESTS

    spec, out = tmp_path / f"spec-{plugins}.json", tmp_path / f"out-{plugins}.json"
    spec.write_text(json.dumps({"jobs": jobs, "max_tokens": MAX_TOKENS, "requests": REQUESTS}))
    run = subprocess.run(
        [sys.executable, str(HERE / "_generate.py"), str(spec), str(out)],
        env=dict(os.environ, VLLM_PLUGINS=plugins),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if run.returncode != 0:
        pytest.fail(f"vLLM failed (VLLM_PLUGINS={plugins!r}, {[j['model'] for j in jobs]}):\n{run.stderr[-4000:]}")
    return json.loads(out.read_text())["results"]


def _job(directory, dtype: str, family: str, **extra) -> dict:
    return {"model": str(directory), "dtype": dtype, "requests": requests_of(family), **extra}


@pytest.fixture(scope="session")
def served(dirs, tmp_path_factory):
    """vLLM's answers, ``served[family][name]``: ``"plain"`` without the plugin (the plain directory); with it
    ``"identity"``, ``"base"`` (the plain directory), ``"upgraded"``, LLaVA-NeXT's ``"identity_bf16"`` /
    ``"upgraded_bf16"`` and OneVision's ``"upgraded_bf16"``. Two processes in all, one engine after the other in
    each; each family its own batch (:func:`requests_of`)."""
    tmp = tmp_path_factory.mktemp("vllm")
    # plain OneVision is profiled without videos (its video profiling costs time and the tests send none)
    video = {"llava_onevision": {"limits": {"video": 0}}}
    plain = vllm_jobs([_job(dirs[f][None], "float32", f, **video.get(f, {})) for f in FAMILIES], "", tmp)
    jobs = {
        (f, name): _job(dirs[f][kind], "float32", f, **(video.get(f, {}) if kind is None else {}))
        for f in FAMILIES
        for name, kind in (("identity", "identity"), ("base", None), ("upgraded", "upgraded"))
    }
    jobs[("llava_next", "identity_bf16")] = _job(dirs["llava_next"]["identity"], "bfloat16", "llava_next")
    jobs[("llava_next", "upgraded_bf16")] = _job(dirs["llava_next"]["upgraded"], "bfloat16", "llava_next")
    jobs[("llava_onevision", "upgraded_bf16")] = _job(
        dirs["llava_onevision"]["upgraded"], "bfloat16", "llava_onevision"
    )
    results = vllm_jobs(list(jobs.values()), "hrperc", tmp)
    out: dict = {f: {"plain": p} for f, p in zip(FAMILIES, plain)}
    for (f, name), result in zip(jobs, results):
        out[f][name] = result
    return out


def pytest_configure(config):
    config.addinivalue_line("markers", "server: starts vLLM's OpenAI-compatible server (select with -m server)")
