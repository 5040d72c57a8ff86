"""The vLLM plugin on a tiny random LLaVA-OneVision (SigLIP tower, ``anyres_max_9``): vLLM with the plugin
against vLLM without it and against transformers (plain, and attached with an upgraded front end: ``dcm=True``
and a random DEM). One batch of images past and under the shrink, two images in one prompt, no image;
greedy tokens and prompt ids compared exactly, float32 (the upgraded model in bfloat16 too)."""

from __future__ import annotations

import pytest
import torch
from _harness import MAX_TOKENS, hf_generate, load_hf
from _tiny import ONEVISION_REQUESTS, image

FAMILY = "llava_onevision"


def attached_generate(model, attached, requests=ONEVISION_REQUESTS) -> dict:
    """transformers' ``generate`` on the attached model, each image's placeholders the attached processor's
    text for that image (``replacement``) and its packed pixels: the processor itself refuses OneVision texts
    with several images, vLLM (and the plugin) encode every image of a prompt on its own."""
    model.generation_config.eos_token_id = None  # vLLM runs with ignore_eos
    tokens, prompt_ids = [], []
    for r in requests:
        text, data = r["prompt"], {}
        if r["images"]:
            parts = text.split(attached.image_token)
            assert len(parts) == len(r["images"]) + 1
            text = parts[0] + "".join(attached.replacement((h, w)) + p for (h, w, _), p in zip(r["images"], parts[1:]))
            data = dict(attached(images=[image(h, w, s) for h, w, s in r["images"]], return_tensors="pt"))
        ids = attached.processor.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, **data, max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)
        n = ids["input_ids"].shape[1]
        tokens.append(out[0, n:].tolist())
        prompt_ids.append(ids["input_ids"][0].tolist())
    return {"tokens": tokens, "prompt_ids": prompt_ids}


def test_identity_front_end_serves_as_vllm_and_transformers(dirs, served):
    plain, identity = served[FAMILY]["plain"], served[FAMILY]["identity"]
    # transformers with a flat list of images: every image of a prompt with anyres_max_9, as vLLM does
    reference = hf_generate(*load_hf(dirs[FAMILY][None], attached=False), requests=ONEVISION_REQUESTS)
    assert plain == reference
    assert identity["prompt_ids"] == plain["prompt_ids"]  # the same placeholders, two images in a prompt too
    assert identity["tokens"] == plain["tokens"]


def test_directory_without_front_end_is_served_by_vllm_itself(served):
    assert served[FAMILY]["base"] == served[FAMILY]["plain"]


def test_upgraded_front_end_serves_as_the_attached_model(dirs, served):
    upgraded, plain = served[FAMILY]["upgraded"], served[FAMILY]["plain"]
    model, attached = load_hf(dirs[FAMILY]["upgraded"], attached=True)
    reference = attached_generate(model, attached)
    assert upgraded == reference
    # the helper is the attached processor's own path where that takes the prompt (one image or none)
    single = [r for r in ONEVISION_REQUESTS if len(r["images"]) < 2]
    assert hf_generate(model, attached, requests=single) == attached_generate(model, attached, single)
    # dcm=True adds no token (the same layout) but changes the tokens the LLM reads
    assert upgraded["prompt_ids"] == plain["prompt_ids"]
    assert upgraded["tokens"] != plain["tokens"]


def test_bfloat16_serves_as_the_attached_model(dirs, served):
    bf16 = torch.bfloat16
    model, attached = load_hf(dirs[FAMILY]["upgraded"], attached=True, dtype=bf16)
    assert served[FAMILY]["upgraded_bf16"] == attached_generate(model, attached)


def test_the_batch_reaches_past_the_shrink_and_the_most_tokens(dirs):
    """The batch holds an image OneVision shrinks and the image of the most tokens (not a pinpoint)."""
    import transformers as tf

    from hrperc.integrations.transformers import load_front_end

    d = dirs[FAMILY]["identity"]
    model = tf.LlavaOnevisionForConditionalGeneration.from_pretrained(d)
    _, attached = load_front_end(model, tf.AutoProcessor.from_pretrained(d), d)
    plans = [attached.encoder.plan((h, w)).anyres for r in ONEVISION_REQUESTS for h, w, _ in r["images"]]
    assert any(p.shape != p.unpadded for p in plans)  # shrunk
    counts = [p.num_tokens for p in plans]
    pinpoints = model.config.image_grid_pinpoints
    assert max(counts) > max(attached.encoder.num_tokens(tuple(p)) for p in pinpoints)


@pytest.mark.parametrize("kind", ["identity", "upgraded"])
def test_the_front_end_files_pick_the_plugin_class(dirs, kind):
    from vllm.config import ModelConfig
    from vllm.model_executor.models.llava_onevision import LlavaOnevisionProcessingInfo
    from vllm.multimodal import MULTIMODAL_REGISTRY

    from hrperc.integrations.vllm import register
    from hrperc.integrations.vllm._llava_onevision import HrpercLlavaOnevisionProcessingInfo

    register()
    info = MULTIMODAL_REGISTRY.create_processor(ModelConfig(model=str(dirs[FAMILY][kind]))).info
    assert isinstance(info, HrpercLlavaOnevisionProcessingInfo)
    assert dict(info.get_supported_mm_limits()) == {"image": None}  # images only: no video modality
    plain = MULTIMODAL_REGISTRY.create_processor(ModelConfig(model=str(dirs[FAMILY][None]))).info
    assert type(plain) is LlavaOnevisionProcessingInfo
    assert "video" in plain.get_supported_mm_limits()
