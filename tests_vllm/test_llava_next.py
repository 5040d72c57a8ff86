"""The vLLM plugin on a tiny random LLaVA-NeXT: vLLM with the plugin against vLLM without it and against
transformers (plain, and attached with an upgraded front end). Greedy tokens compared exactly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import _tiny  # noqa: E402

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


@pytest.fixture(scope="module")
def served(dirs, tmp_path_factory):
    """vLLM's answers: without the plugin (the plain directory), and with it (the model's own front end as
    front-end files, the plain directory, the upgraded front end); float32. Two processes in all."""
    tmp = tmp_path_factory.mktemp("vllm")
    (plain,) = vllm_generate([(dirs[None], "float32")], "", tmp)
    identity, base, upgraded = vllm_generate(
        [(dirs["identity"], "float32"), (dirs[None], "float32"), (dirs["upgraded"], "float32")], "hrperc", tmp
    )
    return {"plain": plain, "identity": identity, "base": base, "upgraded": upgraded}


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


def load_hf(directory, attached: bool):
    import transformers as tf

    model = tf.LlavaNextForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()
    processor = tf.AutoProcessor.from_pretrained(directory)
    if attached:
        from hrperc.integrations.transformers import load_front_end

        model, processor = load_front_end(model, processor, directory)
    return model, processor


def test_identity_front_end_serves_as_vllm_and_transformers(dirs, served):
    plain, identity = served["plain"], served["identity"]
    reference = hf_generate(*load_hf(dirs[None], attached=False))
    assert plain["tokens"] == reference["tokens"]
    assert plain["prompt_ids"] == reference["prompt_ids"]
    # the model's own front end through the plugin: the same placeholders and the same tokens
    assert identity["prompt_ids"] == plain["prompt_ids"]
    assert identity["tokens"] == plain["tokens"]


def test_directory_without_front_end_is_served_by_vllm_itself(served):
    assert served["base"] == served["plain"]


def test_upgraded_front_end_serves_as_the_attached_model(dirs, served):
    upgraded = served["upgraded"]
    reference = hf_generate(*load_hf(dirs["upgraded"], attached=True))
    assert upgraded["prompt_ids"] == reference["prompt_ids"]  # the attached processor's placeholders
    assert upgraded["tokens"] == reference["tokens"]
    # the upgrade shows: INF-LLaVA's views add no token here (the same layout), but the tokens differ
    assert upgraded["prompt_ids"] == served["plain"]["prompt_ids"]
    assert upgraded["tokens"] != served["plain"]["tokens"]


def test_front_end_files_are_checked_when_the_model_is_built(dirs, tmp_path):
    import transformers as tf

    from hrperc.integrations.vllm._shell import restore

    broken = tmp_path / "broken"
    shutil.copytree(dirs["upgraded"], broken)
    (broken / "hrperc_front_end.safetensors").unlink()
    config = tf.AutoConfig.from_pretrained(broken)
    with pytest.raises(FileNotFoundError, match="hrperc_front_end.safetensors"):
        restore(config, None, broken, real=False)
    (broken / "hrperc_front_end.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="hrperc_front_end.safetensors"):
        restore(config, None, broken, real=False)
