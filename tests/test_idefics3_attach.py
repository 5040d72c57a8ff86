"""hrperc.integrations.transformers on Idefics3 and SmolVLM: the attached model against the unmodified one
(logits, ``generate``), the attached processor's ``input_ids`` (the ``<fake_token_around_image>`` /
``<row_r_col_c>`` / ``<global-img>`` text written from the encoder's layout) against the real processor's,
what ``encoder_from_model`` reads, the DCM+DEM upgrade, save / restore, and the refusals.

Tiny random models (``_idefics_tiny.build_idefics``) with the real ``Idefics3Processor`` / ``SmolVLMProcessor``
around an offline word-level tokenizer that keeps ``"\\n"``; nothing is downloaded.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from _messages import FIX, raises_naming
from _models import vit

tf = pytest.importorskip("transformers")
pytest.importorskip("num2words")  # SmolVLMProcessor needs it

from _idefics_tiny import SETTINGS, build_idefics, images, processor  # noqa: E402

import hrperc  # noqa: E402
from hrperc.integrations.transformers import (  # noqa: E402
    _families,
    attach,
    encoder_from_model,
    load_front_end,
    save_front_end,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only wait on each other
FAMILIES = list(SETTINGS)
# one image; several images of different sizes in one text; a ragged batch (other sizes and counts per row, left
# padded): tiled images, one under one tile (30 x 40), a thin one, an exact tile multiple
CASES = {
    "one image": ([[(100, 150)]], ["User : <image> describe it"]),
    "several images in one text": ([[(100, 150), (30, 40), (250, 2)]], ["User : <image> what <image> is <image> it"]),
    "ragged batch": ([[(300, 90)], [(112, 168), (30, 40)]], ["describe <image> it", "<image> what is <image> it"]),
}
OPTIONS = dict(image_mean=[0.3, 0.4, 0.5], image_std=[0.2, 0.25, 0.3])  # honoured at the processor's call


def build(family: str):
    model, proc = build_idefics(family)
    proc.tokenizer.padding_side = "left"  # generate continues every row from its last real token
    return model, proc


def _nested(sizes, seed=0):
    flat = iter(images([s for row in sizes for s in row], seed=seed))
    return [[next(flat) for _ in row] for row in sizes]


@pytest.fixture(scope="module", params=FAMILIES)
def attached(request):
    """The unmodified model's outputs on every case, then the same model attached to its own encoder."""
    family = request.param
    model, proc = build(family)
    ref = {}
    with torch.no_grad():
        for case, (sizes, texts) in CASES.items():
            inputs = proc(images=_nested(sizes), text=texts, return_tensors="pt", padding=True)
            ref[case] = inputs, model(**inputs).logits
        sizes, texts = CASES["one image"]
        inputs = proc(images=_nested(sizes), text=texts, return_tensors="pt", **OPTIONS)
        ref["with image_mean / image_std"] = inputs, model(**inputs).logits
        sizes, texts = CASES["ragged batch"]
        gen_in = proc(images=_nested(sizes), text=texts, return_tensors="pt", padding=True)
        ref_gen = model.generate(**gen_in, max_new_tokens=4, do_sample=False)
    encoder = encoder_from_model(model, proc)
    model, aproc = attach(model, proc, encoder)
    return family, model, proc, aproc, encoder, ref, ref_gen


@pytest.mark.parametrize("case", list(CASES))
def test_attached_logits_and_input_ids_equal_the_unmodified_model_s(attached, case):
    _, model, _, aproc, _, ref, _ = attached
    ref_in, ref_logits = ref[case]
    sizes, texts = CASES[case]
    inputs = aproc(images=_nested(sizes), text=texts, return_tensors="pt", padding=True)
    assert torch.equal(inputs["input_ids"], ref_in["input_ids"])  # markers, row breaks and <image> runs
    assert torch.equal(inputs["attention_mask"], ref_in["attention_mask"])
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values"}  # no image_sizes: the model takes none
    with torch.no_grad():
        logits = model(**inputs).logits
    assert (logits - ref_logits).abs().max().item() <= 1e-5  # 0.0 measured


def test_image_mean_and_std_at_the_call_are_honoured(attached):
    _, model, _, aproc, _, ref, _ = attached
    ref_in, ref_logits = ref["with image_mean / image_std"]
    sizes, texts = CASES["one image"]
    inputs = aproc(images=_nested(sizes), text=texts, return_tensors="pt", **OPTIONS)
    assert torch.equal(inputs["input_ids"], ref_in["input_ids"])
    with torch.no_grad():
        assert (model(**inputs).logits - ref_logits).abs().max().item() <= 1e-5


def test_generate_gives_the_unmodified_model_s_tokens(attached):
    _, model, _, aproc, _, _, ref_gen = attached
    sizes, texts = CASES["ragged batch"]
    inputs = aproc(images=_nested(sizes), text=texts, return_tensors="pt", padding=True)
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, ref_gen)


def test_encoder_from_model_reads_the_model_and_the_processor(attached):
    family, model, proc, _, encoder, _, _ = attached
    tile, patch, scale, edge = SETTINGS[family]
    assert encoder.recipe == family == _families.FAMILIES[family]
    assert encoder.recipe_options == {
        "scale_factor": scale,
        "longest_edge": edge,
        "do_image_splitting": True,
        "resample": "lanczos",
    }
    assert encoder.backbone.model is model.model.vision_model  # shared, not copied
    bare = encoder_from_model(model)  # no processor: the recipe's defaults (4 tiles), the model's scale
    assert bare.front_end.longest_edge == 4 * tile and bare.front_end.scale_factor == scale
    assert encoder.front_end.image_seq_len == proc.image_seq_len


def test_each_family_entry_matches_the_transformers_classes(attached):
    family, model, proc, *_ = attached
    entry = _families.family_of(family)
    assert entry.model_type == model.config.model_type and entry.model_class == type(model).__name__
    params = list(inspect.signature(type(model.model).get_image_features).parameters)
    assert params[1:3] == ["pixel_values", "pixel_attention_mask"] and entry.pixel_mask_second
    assert [getattr(proc, name) for name in entry.tile_markers] == ["<fake_token_around_image>", "<global-img>"]
    assert isinstance(getattr(model.model, entry.tower), torch.nn.Module)
    assert hasattr(getattr(model.model, entry.projector), "modality_projection")


def test_dcm_keeps_the_text_and_a_step_trains_only_the_dem():
    model, proc = build("idefics3")
    encoder = encoder_from_model(model, proc, dcm=True)
    plain = encoder_from_model(model, proc)
    model, aproc = attach(model, proc, encoder)
    sizes, texts = CASES["ragged batch"]
    inputs = aproc(images=_nested(sizes), text=texts, return_tensors="pt", padding=True)
    ref_ids = proc(images=_nested(sizes), text=texts, return_tensors="pt", padding=True)["input_ids"]
    assert torch.equal(inputs["input_ids"], ref_ids)  # the same count and markers as the original
    assert encoder.num_tokens((300, 90)) == plain.num_tokens((300, 90))
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.hrperc_front_end.parameters():
        p.requires_grad_(True)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    model(**inputs, labels=labels).loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and all(n.startswith("hrperc_front_end.front_end.dem.") for n in trained)


def test_save_and_restore_give_the_same_logits(tmp_path):
    model, proc = build("smolvlm")
    fresh = copy.deepcopy(model)
    model, aproc = attach(model, proc, encoder_from_model(model, proc))
    sizes, texts = CASES["one image"]
    inputs = aproc(images=_nested(sizes), text=texts, return_tensors="pt")
    save_front_end(model, tmp_path)
    restored, rproc = load_front_end(fresh, proc, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(restored(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
    assert torch.equal(rproc(images=_nested(sizes), text=texts, return_tensors="pt")["input_ids"], inputs["input_ids"])


def test_refusals_name_the_value_and_the_fix(attached):
    family, model, proc, aproc, _, ref, _ = attached
    tile, patch, scale, edge = SETTINGS[family]
    sizes, texts = CASES["one image"]
    with raises_naming(ValueError, "do_image_splitting=False", "Drop do_image_splitting"):
        aproc(images=_nested(sizes), text=texts, do_image_splitting=False)
    inputs = aproc(images=_nested(sizes), text=texts, return_tensors="pt")
    with raises_naming(ValueError, "pixel_attention_mask", FIX):
        model(**inputs, pixel_attention_mask=torch.ones(1, 1, tile, tile, dtype=torch.long))
    ref_in, _ = ref["one image"]
    with raises_naming(ValueError, "pixel_values", FIX):  # the original processor's pixels: no header
        model(**ref_in)
    other = processor(family, max_image_size={"longest_edge": 2 * tile})
    with raises_naming(ValueError, f"max_image_size={{'longest_edge': {2 * tile}}}", f"{tile} px", FIX):
        encoder_from_model(model, other)
    other = processor(family)
    other.image_seq_len = 7
    with raises_naming(ValueError, "image_seq_len=7", FIX):
        encoder_from_model(model, other)
    other = processor(family, resample=0)
    with raises_naming(ValueError, "resample=", "LANCZOS", FIX):
        encoder_from_model(model, other)
    other = processor(family, do_resize=False)
    with raises_naming(ValueError, "do_resize=False", FIX):
        encoder_from_model(model, other)
    foreign = hrperc.create_encoder("inf_llava", vit(56, patch=14))
    with raises_naming(ValueError, "is not this model's vision tower", FIX):
        attach(build(family)[0], proc, foreign)
