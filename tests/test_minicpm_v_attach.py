"""hrperc.integrations.transformers on MiniCPM-V 4.6 and 4.7: the attached model against the unmodified one (logits,
``generate``), the attached processor's text (``<image_id>``, the markers, the image tokens), ``target_sizes`` and
``mm_token_type_ids`` against the original processor's, the options read from the model and processor, ``dcm=True``,
and the refusals.

Tiny random models (``_minicpm_tiny.build_minicpm``) with the real processors around an offline word-level
tokenizer; nothing is downloaded.
"""

from __future__ import annotations

import pytest
import torch
from _messages import FIX, raises_naming

tf = pytest.importorskip("transformers")

from _minicpm_tiny import build_minicpm  # noqa: E402

from hrperc.integrations.transformers import _families, attach, encoder_from_model  # noqa: E402
from hrperc.ops import slices  # noqa: E402
from hrperc.recipes.minicpm_v import MARKERS  # noqa: E402

VERSIONS = ["4_6", "4_7"]
#: the processors' slice side: a quarter of the released 448 (the same slicing and merging paths, 1/16 the patches);
#: the released options are read in test_families_and_the_options_read_from_the_model_and_processor
SCALE = dict(scale_resolution=112)
# one image; a ragged batch: several images of other sizes in one text (sliced 1 x 2, the source alone -- 4 x 20
# patches, a multiple of the tiny tower's 5 x 5 position table, where a position bucket off by one shows --, 2 x 1:
# a pixel over the slice area), another text with one, padded
CASES = {
    "one image": ([(125, 225)], ["<unk> what is in the image"]),
    "ragged batch": ([(125, 225), (10, 60), (113, 112)], ["describe <unk> it <unk>", "<unk> what is in the image"]),
}


OPTIONS = dict(image_mean=[0.3, 0.4, 0.5], image_std=[0.2, 0.25, 0.3])  # honoured at the processor's call


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: intra-op threads only wait on each other (and on a shared machine, on everything else)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(sizes):
    return [
        torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
        for i, (h, w) in enumerate(sizes)
    ]


def build(version: str, **options):
    model, proc = build_minicpm(version, **{**SCALE, **options})
    proc.tokenizer.padding_side = "left"  # generate continues every row from its last real token
    return model, proc


@pytest.fixture(scope="module", params=VERSIONS)
def attached(request):
    """The unmodified model's outputs on every case, then the same model attached to its own encoder."""
    model, proc = build(request.param)
    ref = {}
    with torch.no_grad():
        for case, (sizes, texts) in CASES.items():
            inputs = proc(images=_images(sizes), text=texts, return_tensors="pt", padding=True)
            ref[case] = inputs, model(**inputs).logits
        sizes, texts = CASES["one image"]
        inputs = proc(images=_images(sizes), text=texts, return_tensors="pt", **OPTIONS)
        ref["with image_mean / image_std"] = inputs, model(**inputs).logits
        ref_gen = model.generate(**ref["ragged batch"][0], max_new_tokens=4, do_sample=False)
    encoder = encoder_from_model(model, proc)
    model, aproc = attach(model, proc, encoder)
    return request.param, model, proc, aproc, encoder, ref, ref_gen


@pytest.mark.parametrize("case", list(CASES))
def test_attached_logits_equal_the_unmodified_model_s(attached, case):
    version, model, _, aproc, _, ref, _ = attached
    ref_in, ref_logits = ref[case]
    sizes, texts = CASES[case]
    inputs = aproc(images=_images(sizes), text=texts, return_tensors="pt", padding=True)
    assert torch.equal(inputs["input_ids"], ref_in["input_ids"])  # the same text: ids, markers, image tokens
    assert torch.equal(inputs["attention_mask"], ref_in["attention_mask"])
    assert torch.equal(inputs["target_sizes"], ref_in["target_sizes"])  # every view's patch grid
    if version == "4_7":  # its LLM's canvas positions read these
        assert torch.equal(inputs["mm_token_type_ids"], ref_in["mm_token_type_ids"])
    with torch.no_grad():
        logits = model(**inputs).logits
    assert (logits - ref_logits).abs().max().item() <= 1e-5


def test_image_mean_and_std_at_the_call_are_honoured(attached):
    _, model, _, aproc, _, ref, _ = attached
    ref_in, ref_logits = ref["with image_mean / image_std"]
    sizes, texts = CASES["one image"]
    inputs = aproc(images=_images(sizes), text=texts, return_tensors="pt", **OPTIONS)
    assert torch.equal(inputs["input_ids"], ref_in["input_ids"])
    with torch.no_grad():
        logits = model(**inputs).logits
    assert (logits - ref_logits).abs().max().item() <= 1e-5
    assert (logits - ref["one image"][1]).abs().max().item() > 1e-3  # the options changed the image


def test_generate_equals_the_unmodified_model_s(attached):
    _, model, _, aproc, _, _, ref_gen = attached
    sizes, texts = CASES["ragged batch"]
    inputs = aproc(images=_images(sizes), text=texts, return_tensors="pt", padding=True)
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, ref_gen)


def test_the_text_follows_the_processor_s_options(attached):
    _, _, proc, aproc, encoder, _, _ = attached
    sizes, texts = CASES["ragged batch"]
    for kw in ({"use_image_id": False}, {"use_image_id": True}):
        ref = proc(images=_images(sizes), text=texts, return_tensors="pt", padding=True, **kw)["input_ids"]
        assert torch.equal(
            aproc(images=_images(sizes), text=texts, return_tensors="pt", padding=True, **kw)["input_ids"], ref
        )
    assert [encoder.num_tokens(s) for s in sizes] == [slices.num_tokens(s, **SCALE) for s in sizes]
    assert [slices.slice_plan(s, **SCALE).grid for s in sizes] == [(1, 2), None, (2, 1)]
    with raises_naming(ValueError, "max_slice_nums=2", "max_slice_nums=9", FIX):
        aproc(images=_images(sizes[:1]), text=texts[1:], max_slice_nums=2)
    with raises_naming(TypeError, "use_image_id='no'", FIX):
        aproc(images=_images(sizes[:1]), text=texts[1:], use_image_id="no")


@pytest.mark.parametrize("version", VERSIONS)
def test_each_family_entry_matches_the_transformers_classes(version):
    import inspect

    model, proc = build_minicpm(version)
    entry = _families.family_of(model.config.model_type)
    assert entry.model_type == model.config.model_type and entry.model_class == type(model).__name__
    params = list(inspect.signature(type(model.model).get_image_features).parameters)
    assert params[1:3] == ["pixel_values", entry.view_sizes]
    assert isinstance(getattr(model.model, entry.projector), torch.nn.Module)
    for name in entry.image_ids:
        assert isinstance(getattr(proc, name), str)
    assert set(entry.image_markers(proc)) == set(MARKERS)  # a text for every marker run of the recipe's layout


def test_families_and_the_options_read_from_the_model_and_processor():
    assert _families.FAMILIES["minicpmv4_6"] == _families.FAMILIES["minicpmv4_7"] == "minicpm_v"
    model, proc = build("4_6", max_slice_nums=4, scale_resolution=336)
    enc = encoder_from_model(model, proc)
    assert enc.recipe_options == {
        "downsample_mode": "16x",
        "scale_resolution": 336,
        "max_slice_nums": 4,
        "slice_mode": True,
    }
    size = (1000, 1500)
    tokens = proc(images=_images([size]), text=["<unk>"], return_tensors="pt", use_image_id=False)["input_ids"][0]
    assert enc.num_tokens(size) == len(tokens) == slices.num_tokens(size, max_slice_nums=4, scale_resolution=336)
    assert encoder_from_model(model).recipe_options == {"downsample_mode": "16x"}  # no processor: the released


def test_dcm_attaches_keeps_the_text_and_trains_only_the_dem():
    model, proc = build("4_6")
    sizes, texts = CASES["ragged batch"]
    ref = proc(images=_images(sizes), text=texts, return_tensors="pt", padding=True)
    model, aproc = attach(model, proc, encoder_from_model(model, proc, dcm=True))
    inputs = aproc(images=_images(sizes), text=texts, return_tensors="pt", padding=True)
    assert torch.equal(inputs["input_ids"], ref["input_ids"])
    model(**inputs).logits.square().mean().backward()
    dem = list(model.hrperc_front_end.dem.parameters())
    assert dem and all(p.grad is not None for p in dem)
    assert all(p.grad is None for p in model.model.vision_tower.parameters())


def test_refusals_name_the_value_and_the_fix(attached):
    version, model, proc, aproc, _, _, _ = attached
    sizes, texts = CASES["one image"]
    inputs = aproc(images=_images(sizes), text=texts, return_tensors="pt")
    with raises_naming(ValueError, "downsample_mode='4x'", "downsample_mode='16x'", FIX):
        model(**inputs, downsample_mode="4x")
    wrong = dict(inputs, target_sizes=inputs["target_sizes"] + 2)
    with raises_naming(ValueError, "target_sizes=", FIX):
        model(**wrong)
    fresh, fresh_proc = build(version)
    fresh_proc.image_processor.downsample_mode = "4x"
    with raises_naming(ValueError, "downsample_mode='4x'", "'16x'", FIX):
        encoder_from_model(fresh, fresh_proc)
    fresh_proc.image_processor.downsample_mode, fresh_proc.image_processor.patch_size = "16x", 16
    with raises_naming(ValueError, "patch_size=16", "14", FIX):
        encoder_from_model(fresh, fresh_proc)
    fresh.config.merger_times = 2
    with raises_naming(ValueError, "merger_times=2", "merger_times=1", FIX):
        encoder_from_model(fresh)


def test_save_and_restore_give_the_same_logits(tmp_path):
    import copy

    from hrperc.integrations.transformers import load_front_end, save_front_end

    model, proc = build("4_6")
    fresh = copy.deepcopy(model)
    model, aproc = attach(model, proc, encoder_from_model(model, proc, dcm=True, max_slice_nums=4))
    sizes, texts = CASES["one image"]
    inputs = aproc(images=_images(sizes), text=texts, return_tensors="pt", padding=True)
    save_front_end(model, tmp_path)
    restored, rproc = load_front_end(fresh, proc, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(restored(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
    again = rproc(images=_images(sizes), text=texts, return_tensors="pt", padding=True)
    assert torch.equal(again["input_ids"], inputs["input_ids"])
