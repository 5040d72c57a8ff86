"""hrperc.integrations.transformers on Qwen2-VL, Qwen2.5-VL and Qwen3-VL: the attached model against the
unmodified one (logits, ``generate``), the attached processor's ``image_grid_thw`` / ``mm_token_type_ids``
against the original processor's, save / restore, and the refusals.

Tiny random models (``_qwen_tiny.build_qwen``) with the real transformers processors around an offline
word-level tokenizer; nothing is downloaded.
"""

from __future__ import annotations

import pytest
import torch
from _messages import FIX, raises_naming

tf = pytest.importorskip("transformers")

from _hf_tiny import assert_save_and_restore, random_images, reference_then_attach, word_tokenizer  # noqa: E402
from _qwen_tiny import IDS, build_qwen  # noqa: E402

import hrperc  # noqa: E402
from hrperc.integrations.transformers import (  # noqa: E402
    _families,
    attach,
    encoder_from_model,
)

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"  # as the chat template writes an image
SPECIALS = ["<pad>", "<unk>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
WORDS = "what is in the image describe it".split()
PROCESSORS = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}
# one image; several images of different sizes in one text; a ragged batch (other sizes and counts per row,
# padded); sizes the budget grows (20 x 25), shrinks (300 x 260) and keeps thin (40 x 300)
CASES = {
    "one image": ([(150, 230)], [f"{IMAGE} what is in the image"]),
    "several images in one text": ([(150, 230), (97, 61), (20, 25)], [f"{IMAGE} what {IMAGE} is {IMAGE} it"]),
    "ragged batch": (
        [(300, 260), (40, 300), (97, 61)],
        [f"describe {IMAGE} it {IMAGE}", f"{IMAGE} what is in the image"],
    ),
}

OPTIONS = dict(image_mean=[0.3, 0.4, 0.5], image_std=[0.2, 0.25, 0.3])  # honoured at the processor's call


pytestmark = pytest.mark.usefixtures("one_thread")


def _tokenizer():
    assert all(
        SPECIALS.index(t) == IDS[k]
        for t, k in zip(SPECIALS[2:5], ("vision_start_token_id", "vision_end_token_id", "image_token_id"))
    )
    # left padding: generate continues every row from its last real token
    return word_tokenizer(SPECIALS, WORDS, padding_side="left")


def build(family: str, image_processor=None):
    """``(model, processor)``: the tiny model of ``family`` and its real processor."""
    model, ip = build_qwen(family)
    video = tf.Qwen3VLVideoProcessor(patch_size=16) if family == "qwen3_vl" else tf.Qwen2VLVideoProcessor()
    proc = getattr(tf, PROCESSORS[family])(
        image_processor=image_processor or ip, tokenizer=_tokenizer(), video_processor=video
    )
    return model, proc


def _features(model, inputs):
    return model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])


@pytest.fixture(scope="module", params=FAMILIES)
def attached(request):
    """The unmodified model's outputs on every case (image features too), then the model attached to its own
    encoder."""
    family = request.param
    model, proc = build(family)
    model, aproc, encoder, ref, ref_gen = reference_then_attach(model, proc, CASES, OPTIONS, _features)
    return family, model, proc, aproc, encoder, ref, ref_gen


@pytest.mark.parametrize("case", list(CASES))
def test_attached_logits_equal_the_unmodified_model_s(attached, case):
    family, model, _, aproc, encoder, ref, _ = attached
    ref_in, ref_logits, ref_features = ref[case]
    sizes, texts = CASES[case]
    inputs = aproc(images=random_images(sizes), text=texts, return_tensors="pt", padding=True)
    # the text, the grid the model's M-RoPE reads and the image-token types are the original processor's
    assert sorted(inputs) == sorted(ref_in)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        assert torch.equal(inputs[key], ref_in[key]), key
    grids = [[1, *(s // encoder.backbone.qwen.patch_size for s in encoder.plan(size).resized)] for size in sizes]
    assert inputs["image_grid_thw"].tolist() == grids  # the encoder's own plans
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        logits = model(**inputs).logits
    assert type(features) is type(ref_features)
    for got, want in zip(features.pooler_output, ref_features.pooler_output, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    if family == "qwen3_vl":  # the deepstack levels the LLM adds to its first layers' outputs
        assert len(features.deepstack_features) == len(ref_features.deepstack_features) == 2
        for got_level, want_level in zip(features.deepstack_features, ref_features.deepstack_features, strict=True):
            for got, want in zip(got_level, want_level, strict=True):
                torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)


def test_generate_gives_the_unmodified_model_s_tokens(attached):
    _, model, _, aproc, _, _, ref_gen = attached
    sizes, texts = CASES["ragged batch"]
    inputs = aproc(images=random_images(sizes), text=texts, return_tensors="pt", padding=True)
    gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 4 and torch.equal(gen, ref_gen)


def test_a_grid_that_is_not_the_encoder_s_is_refused(attached):
    _, model, proc, aproc, _, _, _ = attached
    sizes, texts = CASES["ragged batch"]
    inputs = aproc(images=random_images(sizes), text=texts, return_tensors="pt", padding=True)
    wrong = inputs["image_grid_thw"].flip(0)
    with raises_naming(ValueError, "image_grid_thw", str(wrong.tolist()), FIX):
        model(**{**inputs, "image_grid_thw": wrong})
    original = proc(images=random_images(sizes), text=texts, return_tensors="pt", padding=True)
    with raises_naming(ValueError, "pixel_values", FIX):  # the original processor's patches
        model(**original)


def test_the_family_entries_match_the_transformers_classes():
    import inspect
    import sys

    for family in FAMILIES:
        model, _ = build_qwen(family)
        entry = _families.family_of(family)
        assert entry.model_type == model.config.model_type and entry.model_class == type(model).__name__
        params = list(inspect.signature(type(model.model).get_image_features).parameters)
        assert params[1:3] == ["pixel_values", "image_grid_thw"] and entry.grid_thw
        assert isinstance(getattr(model.model, entry.tower), torch.nn.Module)
        assert entry.projector is None and not hasattr(model.model, "multi_modal_projector")
        assert hasattr(sys.modules[type(model.model).__module__], entry.features_output)
        assert hrperc.integrations.transformers.FAMILIES[family] == entry.recipe in hrperc.list_recipes()


def test_the_processor_s_budget_and_normalization_are_read():
    model, proc = build("qwen2_vl")
    ip = proc.image_processor
    enc = encoder_from_model(model, proc)
    assert enc.recipe_options["min_pixels"] == ip.size["shortest_edge"] == 56 * 56
    assert enc.recipe_options["max_pixels"] == ip.size["longest_edge"] == 28 * 28 * 64
    assert enc.num_tokens((1000, 1000)) == 64 and enc.backbone.mean == tuple(ip.image_mean)
    assert encoder_from_model(model).num_tokens((1000, 1000)) > 64  # no processor: the checkpoints' budget
    model3, proc3 = build("qwen3_vl")
    assert encoder_from_model(model3, proc3).backbone.std == (0.5, 0.5, 0.5)


def test_image_options_are_honoured_like_the_original_or_refused(attached):
    _, model, proc, aproc, _, ref, _ = attached
    sizes, texts = CASES["one image"]
    ref_in, ref_logits = ref["with options"]
    inputs = aproc(images=random_images(sizes), text=texts, return_tensors="pt", **OPTIONS)
    assert torch.equal(inputs["input_ids"], ref_in["input_ids"])
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert not torch.allclose(logits, ref["one image"][1], atol=1e-3)  # the option did change the pixels
    budget = proc.image_processor.size["shortest_edge"]
    same = aproc(images=random_images(sizes), text=texts, return_tensors="pt", min_pixels=budget)  # the processor's own
    assert torch.equal(same["input_ids"], ref["one image"][0]["input_ids"])
    for option, value in (("min_pixels", budget * 4), ("size", {"shortest_edge": budget, "longest_edge": budget})):
        with raises_naming(ValueError, option, FIX):
            aproc(images=random_images(sizes), text=texts, **{option: value})


def test_processor_model_mismatches_are_refused():
    model, _ = build("qwen2_vl")
    for option, value in (("patch_size", 16), ("merge_size", 1), ("temporal_patch_size", 1)):
        _, proc = build("qwen2_vl", tf.Qwen2VLImageProcessor(**{option: value}))
        with raises_naming(ValueError, f"{option}={value}", FIX):
            encoder_from_model(model, proc)
    _, proc = build("qwen2_vl", tf.Qwen2VLImageProcessor(do_resize=False))
    with raises_naming(ValueError, "do_resize=False", FIX):
        encoder_from_model(model, proc)
    model3, proc3 = build("qwen3_vl")
    with raises_naming(ValueError, "Qwen3VLVisionModel", "model.model.visual", FIX):  # another model's tower
        attach(model, proc3, encoder_from_model(model3, proc3))


def test_an_encoder_without_a_native_grid_is_refused():
    model, proc = build("qwen2_vl")
    clip = tf.CLIPVisionModel(
        tf.CLIPVisionConfig(
            image_size=56,
            patch_size=14,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
        )
    )
    tiled = hrperc.create_encoder("llava_next", clip, layer=-1, pinpoints=[(56, 112)])
    with raises_naming(ValueError, "image_grid_thw", "llava_next", FIX):
        attach(model, proc, tiled, foreign_tower=True)
    assert getattr(model.model, "_hrperc_attachment", None) is None  # refused before anything changed


def test_save_and_restore_give_the_same_logits(tmp_path):
    model, restored = assert_save_and_restore(*build("qwen3_vl"), *CASES["ragged batch"], tmp_path)
    assert restored.model._hrperc_encoder.recipe_options == model.model._hrperc_encoder.recipe_options


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_dcm_keeps_the_prompt_and_grid_and_trains_only_the_dem(family):
    """INF-LLaVA's front end on a Qwen model: the attached processor writes the original text and grid (the
    count is the model's), the tokens change, and a training step's gradients reach only the DEM."""
    model, proc = build(family)
    sizes, texts = CASES["ragged batch"]
    with torch.no_grad():
        ref_in = proc(images=random_images(sizes), text=texts, return_tensors="pt", padding=True)
        ref_logits = model(**ref_in).logits
    encoder = encoder_from_model(model, proc, dcm=True)
    model, aproc = attach(model, proc, encoder)
    inputs = aproc(images=random_images(sizes), text=texts, return_tensors="pt", padding=True)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        assert torch.equal(inputs[key], ref_in[key]), key
    model.requires_grad_(False)
    encoder.dem.requires_grad_(True)
    logits = model(**inputs).logits
    assert not torch.allclose(logits, ref_logits, atol=1e-3)  # the DEM's tokens reach the LLM
    logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.dem.parameters())
    assert all(p.grad is None for n, p in model.named_parameters() if "hrperc_front_end" not in n)
