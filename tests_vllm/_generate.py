"""Greedy generation with vLLM in a process of its own: the tests' worker.

    python tests_vllm/_generate.py SPEC.json OUT.json

``SPEC``: ``{"jobs": [{"model": dir, "dtype": "float32" | "bfloat16"}, ...], "max_tokens": n, "requests":
[{"prompt": text, "images": [[h, w, seed], ...]}, ...]}`` (images made by ``_tiny.image``); a job may hold
its own ``"requests"`` and ``"limits"`` (``limit_mm_per_prompt`` entries added to the images'). Each job is one
engine (one after the other in this process) and one ``LLM.generate`` call with all its requests (one
batch). ``OUT``: ``{"results": [{"tokens": [[ids], ...], "prompt_ids": [[ids], ...]}, ...]}``, one per job.
Which plugins load is the caller's ``VLLM_PLUGINS``.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path


def _prompts(requests, image) -> list[dict]:
    prompts = []
    for r in requests:
        entry: dict = {"prompt": r["prompt"]}
        if r["images"]:
            images = [image(h, w, seed) for h, w, seed in r["images"]]
            entry["multi_modal_data"] = {"image": images if len(images) > 1 else images[0]}
        prompts.append(entry)
    return prompts


def main(spec_path: str, out_path: str) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    import torch
    from _tiny import image

    spec = json.loads(Path(spec_path).read_text())
    if any(job["dtype"] == "bfloat16" for job in spec["jobs"]):
        # vLLM's CPU attention picks an AMX kernel without asking the OS for AMX first ("Illegal instruction")
        torch._C._cpu._init_amx()
    from vllm import LLM, SamplingParams
    from vllm.distributed import cleanup_dist_env_and_memory

    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True)
    results = []
    for job in spec["jobs"]:
        requests = job.get("requests", spec["requests"])
        most = max(len(r["images"]) for r in requests)
        llm = LLM(
            model=job["model"],
            dtype=job["dtype"],
            max_model_len=2048,
            max_num_seqs=8,
            enforce_eager=True,
            seed=0,
            limit_mm_per_prompt={"image": max(most, 1), **job.get("limits", {})},
            disable_log_stats=True,
        )
        outs = llm.generate(_prompts(requests, image), params, use_tqdm=False)
        results.append(
            {
                "tokens": [list(o.outputs[0].token_ids) for o in outs],
                "prompt_ids": [list(o.prompt_token_ids) for o in outs],
            }
        )
        del llm, outs
        gc.collect()
        cleanup_dist_env_and_memory()
    Path(out_path).write_text(json.dumps({"results": results}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
