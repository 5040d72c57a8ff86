"""The vLLM tests' shared steps: the requests, vLLM in a fresh process, transformers' ``generate``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import _tiny
import pytest
import torch

HERE = Path(__file__).parent
MAX_TOKENS = 8
# One batch: images of different sizes (wide, tall, two in one prompt) and a prompt without an image.
REQUESTS = [
    {"prompt": "<image> what is in the image", "images": [[40, 90, 1]]},
    {"prompt": "describe it <image>", "images": [[130, 70, 2]]},
    {"prompt": "<image> a <image> what is in the image", "images": [[60, 60, 3], [100, 150, 4]]},
    {"prompt": "what is in the image", "images": []},
]


def vllm_generate(jobs, plugins: str, tmp_path, requests=REQUESTS) -> list[dict]:
    """Greedy tokens and prompt ids of each ``(model_dir, dtype)`` job, from vLLM in a fresh process
    (``plugins``: ``VLLM_PLUGINS``, "" for none)."""
    spec, out = tmp_path / f"spec-{plugins}.json", tmp_path / f"out-{plugins}.json"
    payload = {
        "jobs": [{"model": str(d), "dtype": dtype} for d, dtype in jobs],
        "max_tokens": MAX_TOKENS,
        "requests": requests,
    }
    spec.write_text(json.dumps(payload))
    run = subprocess.run(
        [sys.executable, str(HERE / "_generate.py"), str(spec), str(out)],
        env=dict(os.environ, VLLM_PLUGINS=plugins),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if run.returncode != 0:
        pytest.fail(f"vLLM failed (VLLM_PLUGINS={plugins!r}, {jobs}):\n{run.stderr[-4000:]}")
    return json.loads(out.read_text())["results"]


def hf_generate(model, processor, dtype=torch.float32, requests=REQUESTS) -> dict:
    """The same requests through transformers' ``generate``, one at a time."""
    model = model.to(dtype)
    model.generation_config.eos_token_id = None  # vLLM runs with ignore_eos
    tokens, prompt_ids = [], []
    for r in requests:
        images = [_tiny.image(h, w, s) for h, w, s in r["images"]] or None
        inputs = processor(images=images, text=r["prompt"], return_tensors="pt")
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)
        n = inputs["input_ids"].shape[1]
        tokens.append(out[0, n:].tolist())
        prompt_ids.append(inputs["input_ids"][0].tolist())
    return {"tokens": tokens, "prompt_ids": prompt_ids}


def load_hf(directory, attached: bool, dtype=torch.float32):
    """The saved model with transformers (its config's class), attached from the front-end files if asked."""
    import transformers as tf

    config = tf.AutoConfig.from_pretrained(directory)
    model = getattr(tf, config.architectures[0]).from_pretrained(directory, dtype=dtype).eval()
    processor = tf.AutoProcessor.from_pretrained(directory)
    if attached:
        from hrperc.integrations.transformers import load_front_end

        model, processor = load_front_end(model, processor, directory)
    return model, processor
