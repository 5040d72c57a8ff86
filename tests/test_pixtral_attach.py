"""hrperc.integrations.transformers on Pixtral-12B (LLaVA with a Pixtral tower) and Mistral 3: the attached model
against the unmodified one (logits, ``generate``), the attached processor's ``input_ids`` against
``PixtralProcessor``'s, the family lookup, and the refusals.

Tiny random models (``_pixtral_tiny.build_pixtral``) with the real ``PixtralProcessor`` around an offline
word-level tokenizer; nothing is downloaded.
"""

from __future__ import annotations

import pytest
import torch
from _messages import FIX, raises_naming

tf = pytest.importorskip("transformers")

from _hf_tiny import assert_save_and_restore, random_images, reference_then_attach  # noqa: E402
from _pixtral_tiny import build_pixtral  # noqa: E402

import hrperc  # noqa: E402
from hrperc.integrations.transformers import _families, encoder_from_model  # noqa: E402

FAMILIES = ["llava", "mistral3"]
KEYS = {"llava": "llava_pixtral", "mistral3": "mistral3"}
# one image; several images of different sizes in one text; a ragged batch (other sizes and counts per row,
# padded); sizes above the longest edge (300 x 260, 40 x 300), under one merged patch (20 x 25) and thin
CASES = {
    "one image": ([(150, 230)], ["[IMG] what is in the image"]),
    "several images in one text": ([(150, 230), (97, 61), (20, 25)], ["[IMG] what [IMG] is [IMG] it"]),
    "ragged batch": ([(300, 260), (40, 300), (97, 61)], ["describe [IMG] it [IMG]", "[IMG] what is in the image"]),
}
OPTIONS = dict(image_mean=[0.3, 0.4, 0.5], image_std=[0.2, 0.25, 0.3])  # honoured at the processor's call


pytestmark = pytest.mark.usefixtures("one_thread")


def build(family: str):
    model, proc = build_pixtral(family)
    proc.tokenizer.padding_side = "left"  # generate continues every row from its last real token
    return model, proc


@pytest.fixture(scope="module", params=FAMILIES)
def attached(request):
    """The unmodified model's outputs on every case, then the same model attached to its own encoder."""
    family = request.param
    model, proc = build(family)
    model, aproc, encoder, ref, ref_gen = reference_then_attach(model, proc, CASES, OPTIONS)
    return family, model, proc, aproc, encoder, ref, ref_gen


@pytest.mark.parametrize("case", list(CASES))
def test_attached_logits_equal_the_unmodified_model_s(attached, case):
    family, model, _, aproc, encoder, ref, _ = attached
    ref_in, ref_logits = ref[case]
    sizes, texts = CASES[case]
    inputs = aproc(images=random_images(sizes), text=texts, return_tensors="pt", padding=True)
    for key in ("input_ids", "attention_mask"):  # PixtralProcessor's [IMG] / [IMG_BREAK] / [IMG_END] text
        assert torch.equal(inputs[key], ref_in[key]), key
    assert inputs["image_sizes"].tolist() == [list(s) for s in sizes]  # the images' own sizes, in the header too
    with torch.no_grad():
        features = model.model.get_image_features(
            inputs["pixel_values"], image_sizes=inputs["image_sizes"], vision_feature_layer=-1
        )
        logits = model(**inputs).logits
    img = aproc.processor.image_token_id
    counts = (inputs["input_ids"] == img).sum().item()
    assert sum(f.shape[0] for f in features.pooler_output) == counts  # [IMG] features only, no row-end slots
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    other = aproc(images=random_images(sizes, seed=1), text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        assert not torch.allclose(model(**other).logits, ref_logits, atol=1e-3)  # the images do reach the LLM


def test_generate_gives_the_unmodified_model_s_tokens(attached):
    _, model, _, aproc, _, _, ref_gen = attached
    sizes, texts = CASES["ragged batch"]
    inputs = aproc(images=random_images(sizes), text=texts, return_tensors="pt", padding=True)
    gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 4 and torch.equal(gen, ref_gen)


def test_the_family_lookup_tells_pixtral_in_llava_from_llava_15():
    for family in FAMILIES:
        model, proc = build(family)
        entry = _families.family_of(model.config.model_type, model.config.vision_config.model_type)
        assert entry.key == KEYS[family] and entry.recipe == "pixtral" in hrperc.list_recipes()
        assert entry.model_type == model.config.model_type and entry.model_class == type(model).__name__
        assert hrperc.integrations.transformers.FAMILIES[KEYS[family]] == "pixtral"
        enc = encoder_from_model(model, proc)
        assert enc.recipe == "pixtral" and enc.front_end.merge_size == proc.spatial_merge_size
        assert enc.front_end.longest_edge == proc.image_processor.size["longest_edge"]
    assert _families.family_of("llava", "clip_vision_model").recipe == "llava15"
    assert _families.family_of("llava").recipe == "llava15"


def test_processor_model_mismatches_are_refused():
    model, proc = build("mistral3")
    proc.spatial_merge_size = 1
    with raises_naming(ValueError, "spatial_merge_size=1", FIX):
        encoder_from_model(model, proc)
    model, proc = build("llava")
    proc.patch_size = 14
    with raises_naming(ValueError, "patch_size=14", FIX):
        encoder_from_model(model, proc)
    model, proc = build("llava")
    model.config.vision_feature_select_strategy = "default"  # would drop the first patch of a tower with no CLS
    with raises_naming(ValueError, "vision_feature_select_strategy='default'", FIX):
        encoder_from_model(model, proc)
    model, proc = build("llava")
    model.config.vision_feature_layer = [-1, -2]
    with raises_naming(ValueError, "vision_feature_layer=[-1, -2]", FIX):
        encoder_from_model(model, proc)


def test_mistral3_s_projector_is_applied_per_merged_cell():
    model, proc = build("mistral3")
    encoder = encoder_from_model(model, proc)
    sizes = [(150, 230), (40, 300)]
    ref_in = proc(images=random_images(sizes), text=["[IMG] [IMG]"], return_tensors="pt")
    with torch.no_grad():
        ref = model.model.get_image_features(
            ref_in["pixel_values"], ref_in["image_sizes"], vision_feature_layer=-1
        ).pooler_output
        out = encoder(random_images(sizes), project=model.model.multi_modal_projector)
    for i, want in enumerate(ref):
        n = out.num_tokens[i]
        got = out.tokens[i, :n][~out.slot_mask[i, :n]]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_image_mean_and_std_at_the_call_are_honoured_like_the_original(attached):
    _, model, _, aproc, _, ref, _ = attached
    sizes, texts = CASES["one image"]
    ref_in, ref_logits = ref["with options"]
    inputs = aproc(images=random_images(sizes), text=texts, return_tensors="pt", **OPTIONS)
    assert torch.equal(inputs["input_ids"], ref_in["input_ids"])
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert not torch.allclose(logits, ref["one image"][1], atol=1e-3)  # the option did change the pixels
    with raises_naming(ValueError, "size", FIX):
        aproc(images=random_images(sizes), text=texts, size={"longest_edge": 64})


def test_save_and_restore_give_the_same_logits(tmp_path):
    _, restored = assert_save_and_restore(*build("llava"), *CASES["ragged batch"], tmp_path)
    assert restored.model._hrperc_encoder.recipe_options == {"merge_size": 1, "longest_edge": 256}
