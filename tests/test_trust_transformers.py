"""An attached transformers model is never silently wrong: the packed pixels cannot be mistaken, forward /
generate arguments and processor options are honoured or refused by name, a foreign tower needs consent,
and ``load_front_end`` validates its files before building anything, all or nothing.

Tiny random models (``_hf_tiny``); logits are compared with the unmodified model's (``1e-5``).
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

tf = pytest.importorskip("transformers")

from _hf_tiny import _clip_processor, _images, build  # noqa: E402
from _messages import FIX, raises_naming  # noqa: E402

import hrperc  # noqa: E402
from hrperc.integrations.transformers import (  # noqa: E402  # noqa: E402
    _pixels,
    _save,
    attach,
    encoder_from_model,
    load_front_end,
    pack_images,
    save_front_end,
    unpack_images,
)


def _logits(model, inputs, **kw):
    with torch.no_grad():
        return model(**inputs, **kw).logits


def _attached(family, **kw):
    model, proc, texts = build(family, **kw)
    model, aproc = attach(model, proc, encoder_from_model(model, proc))
    return model, aproc, texts


def _not_attached(model) -> bool:
    return getattr(model.model, "_hrperc_attachment", None) is None and not hasattr(model, "hrperc_front_end")


# --- the packed pixels: unmistakable, and sizes that survive collators ---------------------------------------
# A grey, low-contrast image of the tile's size (no padding, no resampling overshoot) whose normalized values
# fall in [0, 1] in every channel under the family's mean / std (OpenAI CLIP's, 0.5, ImageNet's).
LOW_CONTRAST = {"llava": 336, "llava_onevision": 384, "internvl": 448}


@pytest.mark.parametrize("family", sorted(LOW_CONTRAST))
def test_original_processor_pixels_are_refused_even_inside_0_1(family):
    model, proc, texts = build(family)
    side = LOW_CONTRAST[family]
    g = torch.Generator().manual_seed(3)
    image = torch.randint(140, 160, (3, side, side), dtype=torch.uint8, generator=g)
    original = proc(images=[image], text=texts[:1], return_tensors="pt")["pixel_values"]
    assert original.min() >= 0 and original.max() <= 1  # the case a range check cannot catch
    model, aproc = attach(model, proc, encoder_from_model(model, proc))
    inputs = aproc(images=[image], text=texts[:1], return_tensors="pt")
    with raises_naming(ValueError, "pixel_values", "original processor", "attach()", FIX):
        _logits(model, {**inputs, "pixel_values": original})


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.rand(1, 3, 40, 60),  # [0, 1] floats: the old format's own range
        lambda: torch.randn(2, 3, 40, 60),
        lambda: torch.randint(0, 256, (1, 3, 40, 60), dtype=torch.int16),
        lambda: torch.full((1, 3, 40, 60), -1.0),
        lambda: torch.rand(1, 5, 3, 40, 60),  # LLaVA-NeXT's (B, patches, 3, H, W)
        lambda: torch.rand(1, 3, 1, 60),
    ],
)
def test_any_tensor_but_packed_images_is_refused(make):
    with raises_naming(ValueError, "pixel_values", "attach()", FIX):
        unpack_images(make())


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8])
def test_a_narrow_integer_cast_is_refused_naming_the_dtype(dtype):
    px, _ = pack_images(_images([(30, 50), (20, 10)]))
    with raises_naming(ValueError, str(dtype), "header", "keep pixel_values' dtype"):
        unpack_images(px.to(dtype))


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.int64]
)
def test_casts_that_keep_the_header_give_the_same_images(dtype):
    images = _images([(30, 50), (7, 2), (1, 1)])
    px, sizes = pack_images(images)
    back = unpack_images(px.to(dtype))
    assert [b.dtype for b in back] == [torch.uint8] * 3  # the header says "uint8 values", whatever the dtype
    assert all(torch.equal(a, b) for a, b in zip(back, images))
    floats = [torch.rand(3, 9, 4), torch.rand(3, 2, 30)]
    pf, _ = pack_images(floats)
    if dtype.is_floating_point:
        back = unpack_images(pf.to(dtype))
        assert [tuple(b.shape) for b in back] == [(3, 9, 4), (3, 2, 30)]
        tol = {torch.float16: 1e-3, torch.bfloat16: 4e-3}.get(dtype, 0)
        torch.testing.assert_close(back[0], floats[0], atol=tol, rtol=0)
    else:  # float [0, 1] pixels rounded to integers: refused, not read as black-and-white
        with raises_naming(ValueError, str(dtype), "[0, 1]", "keep pixel_values' dtype"):
            unpack_images(pf.to(dtype))


@pytest.mark.parametrize("size", [(1, 1), (2, 4), (5, 1), (1, 40)])
def test_tiny_images_keep_a_whole_header(size):
    images = _images([size])
    px, sizes = pack_images(images)
    assert px.shape[-1] >= _pixels.HEADER_LENGTH and sizes.tolist() == [list(size)]
    assert torch.equal(unpack_images(px)[0], images[0])
    opts = {"mean": [0.1, 0.2, 0.3]}
    po, _ = pack_images(images, opts)
    packed = _pixels.read_packed(po)
    assert packed[0].options == opts and torch.equal(packed[0].image, images[0])
    with raises_naming(ValueError, "image options", "mean", "Pass"):
        unpack_images(po)  # options select another front end: only the attached model may run them


@pytest.mark.parametrize("fill", [-1, 0, 255])
def test_right_and_bottom_padding_keeps_sizes_and_logits(fill):
    model, aproc, texts = _attached("llava_next")
    images = _images([(300, 500), (200, 150)])
    inputs = aproc(images=images, text=texts, return_tensors="pt", padding=True)
    ref = _logits(model, inputs)
    padded = F.pad(inputs["pixel_values"], (0, 37, 0, 11), value=fill)  # a collator padding to a larger batch
    assert [tuple(i.shape) for i in unpack_images(padded)] == [(3, 300, 500), (3, 200, 150)]
    assert torch.equal(_logits(model, {**inputs, "pixel_values": padded}), ref)


@pytest.mark.parametrize(
    "change, fragments",
    [
        (lambda px: F.pad(px, (0, 0, 1, 0), value=-1), ("header", "top or left")),
        (lambda px: F.pad(px, (3, 0, 0, 0), value=0), ("header", "top or left")),
        (lambda px: px[..., :450], ("cropped", "300x500")),
        (lambda px: px[..., :250, :], ("cropped", "300x500")),
        (lambda px: px * 2, ("header", "rescaled")),
        (lambda px: px.flip(-1), ("header",)),
    ],
)
def test_padding_on_top_or_left_and_cropping_are_refused(change, fragments):
    px, _ = pack_images(_images([(300, 500)]))
    with raises_naming(ValueError, "pixel_values", *fragments, FIX):
        unpack_images(change(px))


def test_a_tampered_header_or_pixel_is_refused():
    px, _ = pack_images(_images([(30, 50)]))
    size_digit = len(_pixels.MAGIC) + 4  # the last digit of the height
    for change, fragment in [
        (lambda t: t[:, :, 0, size_digit].add_(1), "check"),
        (lambda t: t[:, 1, 0, size_digit].add_(1), "channels"),
        (lambda t: t[:, :, 0, len(_pixels.MAGIC)].fill_(7), "version"),
        (lambda t: t[:, :, 0, len(_pixels.MAGIC) + 1].fill_(9), "kind"),
        (lambda t: t[:, :, 5, 5].fill_(300), "0 to 300"),
        (lambda t: t[:, :, 5, 5].fill_(-7), "-7 to"),
    ]:
        bad = px.clone()
        change(bad)
        with raises_naming(ValueError, "pixel_values", fragment, FIX):
            unpack_images(bad)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_image_sizes_must_agree_with_the_headers(family):
    model, aproc, texts = _attached(family)
    inputs = aproc(images=_images([(300, 500)]), text=texts[:1], return_tensors="pt")
    for sizes in ([[300, 499]], [[500, 300]]):
        with raises_naming(ValueError, "image_sizes", str(sizes), "[[300, 500]]", FIX):
            _logits(model, {**inputs, "image_sizes": torch.tensor(sizes)})


def test_a_float16_cast_of_the_pixels_gives_the_same_logits():
    model, aproc, texts = _attached("llava")
    inputs = aproc(images=_images([(300, 500)]), text=texts[:1], return_tensors="pt")
    ref = _logits(model, inputs)
    for dtype in (torch.float16, torch.bfloat16):
        assert torch.equal(_logits(model, {**inputs, "pixel_values": inputs["pixel_values"].to(dtype)}), ref)


# --- vision_feature_layer / vision_feature_select_strategy at forward and generate -----------------------------
@pytest.mark.parametrize("family, layer", [("llava", -1), ("llava_next", 2), ("internvl", -2), ("llava_onevision", 1)])
def test_forward_honours_another_vision_feature_layer(family, layer):
    model, proc, texts = build(family)
    images = _images([(200, 260)])
    ref = _logits(model, proc(images=images, text=texts[:1], return_tensors="pt"), vision_feature_layer=layer)
    own = _logits(model, proc(images=images, text=texts[:1], return_tensors="pt"))
    assert not torch.allclose(ref, own)  # the argument matters for this model
    model, aproc = attach(model, proc, encoder_from_model(model, proc))
    inputs = aproc(images=images, text=texts[:1], return_tensors="pt")
    torch.testing.assert_close(_logits(model, inputs, vision_feature_layer=layer), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(_logits(model, inputs), own, atol=1e-5, rtol=0)  # the encoder itself is unchanged
    strategy = model.config.vision_feature_select_strategy
    equal = model.config.vision_feature_layer
    torch.testing.assert_close(
        _logits(model, inputs, vision_feature_layer=equal, vision_feature_select_strategy=strategy),
        own,
        atol=1e-5,
        rtol=0,
    )


@pytest.mark.parametrize("family", ["llava_next", "internvl"])
def test_generate_honours_another_vision_feature_layer(family):
    model, proc, texts = build(family)
    images = _images([(200, 260)])
    ref = model.generate(
        **proc(images=images, text=texts[:1], return_tensors="pt"),
        vision_feature_layer=1,
        max_new_tokens=3,
        do_sample=False,
    )
    model, aproc = attach(model, proc, encoder_from_model(model, proc))
    inputs = aproc(images=images, text=texts[:1], return_tensors="pt")
    assert torch.equal(model.generate(**inputs, vision_feature_layer=1, max_new_tokens=3, do_sample=False), ref)


@pytest.mark.parametrize(
    "family, kwargs, fragments",
    [
        ("llava", {"vision_feature_select_strategy": "full"}, ("vision_feature_select_strategy='full'", "'default'")),
        (
            "llava_onevision",
            {"vision_feature_select_strategy": "default"},
            ("vision_feature_select_strategy='default'", "'full'"),
        ),
        ("internvl", {"vision_feature_layer": [-2, -1]}, ("vision_feature_layer=[-2, -1]", "vision_feature_layer=-1")),
        ("llava", {"vision_feature_layer": 0}, ("vision_feature_layer=0", "vision_feature_layer=-2")),
        ("llava_next", {"vision_feature_layer": 5}, ("vision_feature_layer=5", "vision_feature_layer=-2")),
        ("llava_next", {"vision_feature_layer": -4}, ("vision_feature_layer=-4", "vision_feature_layer=-2")),
    ],
)
@pytest.mark.parametrize("call", ["forward", "generate"])
def test_feature_arguments_the_encoder_cannot_honour_are_refused(family, kwargs, fragments, call):
    model, aproc, texts = _attached(family)
    inputs = aproc(images=_images([(200, 300)]), text=texts[:1], return_tensors="pt")
    with raises_naming(ValueError, *fragments, FIX):
        if call == "forward":
            _logits(model, inputs, **kwargs)
        else:
            model.generate(**inputs, **kwargs, max_new_tokens=2)


# --- the model's own tower -------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "internvl"])
def test_an_encoder_of_another_model_s_tower_is_refused_unless_meant(family, tmp_path):
    model_a, proc, texts = build(family, seed=0)
    model_b, _, _ = build(family, seed=1)
    for encoder in (
        encoder_from_model(model_a, proc),
        hrperc.create_encoder(
            hrperc.integrations.transformers.FAMILIES[family], copy.deepcopy(model_b.model.vision_tower)
        ),
    ):
        with raises_naming(ValueError, "vision tower", "foreign_tower=True", FIX):
            attach(model_b, proc, encoder)
        assert _not_attached(model_b)
    with raises_naming(TypeError, "foreign_tower='yes'", FIX):
        attach(model_b, proc, encoder_from_model(model_a, proc), foreign_tower="yes")
    model_b, aproc = attach(model_b, proc, encoder_from_model(model_a, proc), foreign_tower=True)
    assert torch.isfinite(
        _logits(model_b, aproc(images=_images([(100, 120)]), text=texts[:1], return_tensors="pt"))
    ).all()
    with raises_naming(ValueError, "foreign_tower=True", "tower", FIX):
        save_front_end(model_b, tmp_path)
    assert not list(tmp_path.iterdir())
    model_c, proc_c, _ = build(family, seed=2)
    attach(model_c, proc_c, encoder_from_model(model_c, proc_c))  # its own tower: accepted


# --- image-processor options at the attached processor's call ----------------------------------------------------
OPTION_SIZES = [(150, 250), (350, 200)]


@pytest.fixture(scope="module")
def unmodified_logits():
    """``family -> logits`` of the unmodified model (``build(family)``, the same weights every time) on images of
    ``OPTION_SIZES`` and both texts, without options: a pure function of the family, computed once per module
    on a model of its own (no test's model is shared)."""
    cache: dict = {}

    def get(family):
        if family not in cache:
            model, proc, texts = build(family)
            inputs = proc(images=_images(OPTION_SIZES), text=texts, return_tensors="pt", padding=True)
            cache[family] = _logits(model, inputs)
        return cache[family]

    return get


@pytest.mark.parametrize(
    "family, options",
    [
        ("llava", {"do_pad": False}),
        ("llava", {"images_kwargs": {"do_pad": False}}),
        ("llava", {"image_mean": [0.3, 0.4, 0.5], "image_std": 0.25}),
        ("llava_next", {"image_mean": [0.5, 0.5, 0.5], "disable_grouping": True}),
        ("internvl", {"crop_to_patches": False}),
        ("internvl", {"min_patches": 3, "max_patches": 6}),  # both patch-count bounds (one alone: the same path)
        ("llava", {"size": {"shortest_edge": 336}, "resample": 3, "device": "cpu"}),  # equal to its own: no change
    ],
)
def test_processor_options_are_honoured_like_the_original(family, options, unmodified_logits):
    model, proc, texts = build(family)
    images = _images(OPTION_SIZES)
    ref_in = proc(images=images, text=texts, return_tensors="pt", padding=True, **options)
    ref = _logits(model, ref_in)
    own = unmodified_logits(family)
    model, aproc = attach(model, proc, encoder_from_model(model, proc))
    inputs = aproc(images=images, text=texts, return_tensors="pt", padding=True, **options)
    assert torch.equal(inputs["input_ids"], ref_in["input_ids"])  # the token count follows the options
    torch.testing.assert_close(_logits(model, inputs), ref, atol=1e-5, rtol=0)
    plain = aproc(images=images, text=texts, return_tensors="pt", padding=True)  # no options: the encoder as attached
    torch.testing.assert_close(_logits(model, plain), own, atol=1e-5, rtol=0)


@pytest.mark.parametrize("do_pad", [None, True, False])
def test_llava_15_with_a_clip_image_processor_equals_the_original(do_pad):
    model, proc, texts = build("llava")
    proc = _clip_processor(proc.tokenizer, **({} if do_pad is None else {"do_pad": do_pad}))
    images = _images([(300, 500), (700, 400)])
    ref = _logits(model, proc(images=images, text=texts, return_tensors="pt", padding=True))
    encoder = encoder_from_model(model, proc)
    assert encoder.recipe_options["pad"] is False  # CLIP's processor resizes the shortest edge and centre-crops
    model, aproc = attach(model, proc, encoder)
    out = _logits(model, aproc(images=images, text=texts, return_tensors="pt", padding=True))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_images_packed_with_different_options_run_their_own_front_end():
    model, aproc, texts = _attached("llava")
    a, b = _images([(300, 500)]), _images([(200, 600)], seed=1)
    pa = aproc(images=a, return_tensors="pt")["pixel_values"]
    pb = aproc(images=b, do_pad=False, return_tensors="pt")["pixel_values"]
    W = max(pa.shape[-1], pb.shape[-1])
    H = max(pa.shape[-2], pb.shape[-2])
    both = torch.cat([F.pad(p, (0, W - p.shape[-1], 0, H - p.shape[-2]), value=-1) for p in (pa, pb)])
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=both).pooler_output
        alone = [model.model.get_image_features(pixel_values=p).pooler_output[0] for p in (pa, pb)]
    assert torch.equal(feats[0], alone[0]) and torch.equal(feats[1], alone[1])
    with torch.no_grad():
        padded = model.model.get_image_features(pixel_values=aproc(images=b, return_tensors="pt")["pixel_values"])
    assert not torch.allclose(padded.pooler_output[0], alone[1])  # do_pad=False was not dropped


@pytest.mark.parametrize(
    "family, options, name",
    [
        ("llava", {"size": {"shortest_edge": 400}}, "size"),
        ("llava", {"crop_size": {"height": 300, "width": 300}}, "crop_size"),
        ("llava", {"resample": 2}, "resample"),
        ("llava", {"do_resize": False}, "do_resize"),
        ("llava", {"do_rescale": False}, "do_rescale"),
        ("llava", {"rescale_factor": 1 / 127.5}, "rescale_factor"),
        ("llava_next", {"do_normalize": False}, "do_normalize"),
        ("llava_next", {"do_center_crop": False}, "do_center_crop"),
        ("llava_next", {"image_grid_pinpoints": [[336, 672], [672, 336]]}, "image_grid_pinpoints"),
        ("internvl", {"size": {"height": 224, "width": 224}}, "size"),
        ("internvl", {"data_format": "channels_last"}, "data_format"),
    ],
)
def test_other_image_options_are_refused_by_name(family, options, name):
    model, aproc, texts = _attached(family)
    with raises_naming(ValueError, f"{name}=", f"Drop {name}"):
        aproc(images=_images([(300, 500)]), text=texts[:1], return_tensors="pt", **options)


def test_options_an_upgraded_encoder_has_no_setting_for_are_refused():
    model, proc, texts = build("llava")
    tower = hrperc.backbones.HFBackbone(model.model.vision_tower)
    model, aproc = attach(model, proc, hrperc.create_encoder("inf_llava", tower))
    with raises_naming(ValueError, "do_pad=False", "inf_llava", "Drop do_pad"):
        aproc(images=_images([(300, 500)]), text=texts[:1], do_pad=False)
    model, proc, texts = build("internvl")
    tower = hrperc.backbones.HFBackbone(
        model.model.vision_tower, layer=-1, mean=proc.image_processor.image_mean, std=proc.image_processor.image_std
    )
    with pytest.warns(UserWarning, match="new mlp2x_gelu projector"):
        model, aproc = attach(model, proc, hrperc.create_encoder("llava_next", tower))
    with raises_naming(ValueError, "max_patches=4", "llava_next", "Drop"):
        aproc(images=_images([(300, 500)]), text=texts[:1], max_patches=4)


@pytest.mark.parametrize(
    "family, setting, fragments",
    [
        ("llava", {"do_resize": False}, ("do_resize=False",)),
        ("llava", {"resample": 2}, ("resample=",)),
        ("llava_next", {"crop_size": {"height": 224, "width": 224}}, ("crop_size=", "336x336")),
        ("internvl", {"size": {"height": 224, "width": 224}}, ("size=", "448x448")),
        ("llava", {"do_pad": False, "do_center_crop": False}, ("do_center_crop=False",)),
    ],
)
def test_encoder_from_model_refuses_processor_steps_it_does_not_reproduce(family, setting, fragments):
    model, proc, _ = build(family)
    for k, v in setting.items():
        setattr(proc.image_processor, k, v)
    with raises_naming(ValueError, *fragments, FIX):
        encoder_from_model(model, proc)


def test_videos_and_audio_are_refused():
    model, aproc, texts = _attached("llava_onevision")
    for name in ("videos", "audio"):
        with raises_naming(ValueError, f"{name}=", f"Drop {name}="):
            aproc(images=_images([(100, 100)]), text=texts[:1], **{name: [torch.zeros(3, 8, 8)]})


# --- save_front_end / load_front_end -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "projector",
    [
        lambda: torch.nn.Sequential(
            torch.nn.LayerNorm(64), torch.nn.Linear(64, 48), torch.nn.GELU("tanh"), torch.nn.Linear(48, 32, bias=False)
        ),
        lambda: hrperc.modules.projector.build_projector("linear", 64, 32),
        lambda: hrperc.modules.projector.build_projector("mlp3x_gelu", 64, 32),
    ],
)
def test_a_custom_projector_is_saved_and_restored(projector, tmp_path):
    model, proc, texts = build("llava")
    enc = hrperc.create_encoder("s2", hrperc.backbones.HFBackbone(model.model.vision_tower))  # 64-wide tokens
    model, aproc = attach(model, proc, enc, projector=projector())
    inputs = aproc(images=_images([(300, 500)]), text=texts[:1], return_tensors="pt")
    ref = _logits(model, inputs)
    model.save_pretrained(tmp_path)
    save_front_end(model, tmp_path)
    restored = tf.LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    restored, rproc = load_front_end(restored, proc, tmp_path)
    torch.testing.assert_close(_logits(restored, inputs), ref, atol=1e-5, rtol=0)


def test_projectors_of_the_wrong_widths_are_refused_and_opaque_ones_are_not_saved(tmp_path):
    model, proc, _ = build("llava")
    enc = hrperc.create_encoder("s2", hrperc.backbones.HFBackbone(model.model.vision_tower))
    for proj, fragments in (
        (torch.nn.Linear(64, 33), ("output width 33", "32")),
        (torch.nn.Linear(48, 32), ("input width 48", "64")),
    ):
        with raises_naming(ValueError, "projector", *fragments, FIX):
            attach(model, proc, enc, projector=proj)
        assert _not_attached(model)

    class Gate(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(64, 32)

        def forward(self, x):
            return self.lin(x) * torch.sigmoid(self.lin(x))

    model, _ = attach(model, proc, enc, projector=Gate())
    with raises_naming(ValueError, "Gate", "build_projector", "nn.Sequential"):
        save_front_end(model, tmp_path)
    assert not list(tmp_path.iterdir())  # nothing half-written


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved llava_next + DCM/DEM front end (and its processor), and a fresh model loaded from it."""
    d = tmp_path_factory.mktemp("front_end")
    model, proc, _ = build("llava_next")
    model, _ = attach(model, proc, encoder_from_model(model, proc, dcm=True))
    model.save_pretrained(d)
    save_front_end(model, d)
    fresh = tf.LlavaNextForConditionalGeneration.from_pretrained(d).eval()
    return d, proc, fresh


def _edit_json(path, change):
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def _set(*keys, value):
    def change(config):
        node = config
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value

    return change


def _drop(*keys):
    def change(config):
        node = config
        for k in keys[:-1]:
            node = node[k]
        del node[keys[-1]]

    return change


JSON_CORRUPTIONS = {
    "truncated": (lambda p: p.write_text(p.read_text()[: len(p.read_text()) // 2]), "not valid JSON"),
    "empty": (lambda p: p.write_text(""), "not valid JSON"),
    "not an object": (lambda p: p.write_text("[1, 2]"), "not an object"),
    "binary": (lambda p: p.write_bytes(b"\xff\xfe\x00garbage"), "not valid JSON"),
    "missing recipe": (lambda p: _edit_json(p, _drop("recipe")), "recipe"),
    "missing dem": (lambda p: _edit_json(p, _drop("dem")), "dem"),
    "missing dem.heads": (lambda p: _edit_json(p, _drop("dem", "heads")), "heads"),
    "missing backbone.std": (lambda p: _edit_json(p, _drop("backbone", "std")), "std"),
    "unknown key": (lambda p: _edit_json(p, _set("extra", value=1)), "extra"),
    "dem width 8192": (lambda p: _edit_json(p, _set("dem", "dim", value=8192)), "8192"),
    "dem width as text": (lambda p: _edit_json(p, _set("dem", "dim", value="32")), "'32'"),
    "dem heads not dividing": (lambda p: _edit_json(p, _set("dem", "heads", value=3)), "heads"),
    "dem fusion unknown": (lambda p: _edit_json(p, _set("dem", "fusion", value="sum")), "'sum'"),
    "dem bool as text": (lambda p: _edit_json(p, _set("dem", "skip_unread", value="false")), "skip_unread"),
    "dem output size huge": (lambda p: _edit_json(p, _set("dem", "output_size", value=[10**6, 3])), "output_size"),
    "dem dropped": (lambda p: _edit_json(p, _set("dem", value=None)), "dem=None"),
    "recipe unknown": (lambda p: _edit_json(p, _set("recipe", value="llava99")), "llava99"),
    "other family": (lambda p: _edit_json(p, _set("family", value="internvl")), "internvl"),
    "version": (lambda p: _edit_json(p, _set("version", value=99)), "99"),
    "layer out of range": (lambda p: _edit_json(p, _set("backbone", "layer", value=-9)), "-9"),
    "layer as float": (lambda p: _edit_json(p, _set("backbone", "layer", value=-2.0)), "-2.0"),
    "mean of two": (lambda p: _edit_json(p, _set("backbone", "mean", value=[0.5, 0.5])), "mean"),
    "std zero": (lambda p: _edit_json(p, _set("backbone", "std", value=[0.5, 0.0, 0.5])), "std"),
    "options not a dict": (lambda p: _edit_json(p, _set("options", value=[1])), "options"),
    "option as text": (lambda p: _edit_json(p, _set("options", "dcm", value="yes")), "dcm"),
    "option unknown": (lambda p: _edit_json(p, _set("options", "zoom", value=2)), "zoom"),
    "projector wrong width": (
        lambda p: _edit_json(p, _set("projector", value={"kind": "linear", "in": 32, "out": 33})),
        "33",
    ),
    "projector deep": (
        lambda p: _edit_json(p, _set("projector", value={"kind": "mlp999x_gelu", "in": 32, "out": 32})),
        "mlp999x_gelu",
    ),
}


def _copy(saved, tmp_path):
    d, proc, fresh = saved
    out = tmp_path / "copy"
    shutil.copytree(d, out)
    return out, proc, fresh


@pytest.mark.parametrize("case", sorted(JSON_CORRUPTIONS))
def test_a_bad_front_end_json_is_refused_naming_the_file(case, saved, tmp_path):
    d, proc, fresh = _copy(saved, tmp_path)
    corrupt, fragment = JSON_CORRUPTIONS[case]
    corrupt(d / "hrperc_front_end.json")
    grads = [p.requires_grad for p in fresh.model.vision_tower.parameters()]
    with raises_naming(ValueError, "hrperc_front_end.json", fragment, FIX):
        load_front_end(fresh, proc, d)
    assert _not_attached(fresh)  # all or nothing: the same model serves every case, and the retry below
    assert grads == [p.requires_grad for p in fresh.model.vision_tower.parameters()]


def _rewrite_weights(path, change):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def _first(tensors):
    return sorted(tensors)[0]


WEIGHT_CORRUPTIONS = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:100]), "safetensors"),
    "garbage": (lambda p: p.write_bytes(b"\x00" * 64), "safetensors"),
    "extra tensor": (lambda p: _rewrite_weights(p, lambda t: t.update(extra=torch.zeros(2))), "extra"),
    "missing tensor": (lambda p: _rewrite_weights(p, lambda t: t.pop(_first(t))), "missing"),
    "wrong shape": (lambda p: _rewrite_weights(p, lambda t: t.update({_first(t): torch.zeros(3, 3)})), "shape"),
    "integer tensor": (
        lambda p: _rewrite_weights(p, lambda t: t.update({_first(t): t[_first(t)].to(torch.int32)})),
        "floating-point",
    ),
    "nan": (lambda p: _rewrite_weights(p, lambda t: t[_first(t)].fill_(float("nan"))), "NaN"),
}


@pytest.mark.parametrize("case", sorted(WEIGHT_CORRUPTIONS))
def test_a_bad_front_end_weight_file_is_refused_naming_the_file(case, saved, tmp_path):
    d, proc, fresh = _copy(saved, tmp_path)
    corrupt, fragment = WEIGHT_CORRUPTIONS[case]
    corrupt(d / "hrperc_front_end.safetensors")
    with raises_naming(ValueError, "hrperc_front_end.safetensors", fragment, FIX):
        load_front_end(fresh, proc, d)
    assert _not_attached(fresh)


@pytest.mark.parametrize("name", ["hrperc_front_end.json", "hrperc_front_end.safetensors"])
def test_a_missing_front_end_file_is_named(name, saved, tmp_path):
    d, proc, fresh = _copy(saved, tmp_path)
    (d / name).unlink()
    with raises_naming(FileNotFoundError, name, "save_front_end"):
        load_front_end(fresh, proc, d)
    assert _not_attached(fresh)


def test_a_huge_dem_width_is_refused_before_any_module_is_built(saved, tmp_path, monkeypatch):
    d, proc, fresh = _copy(saved, tmp_path)
    _edit_json(d / "hrperc_front_end.json", _set("dem", "dim", value=8192))
    built = []
    real = _save.DualPerspectiveEnhancement

    def recording(*args, **kwargs):
        built.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(_save, "DualPerspectiveEnhancement", recording)
    with raises_naming(ValueError, "hrperc_front_end.json", "dem.dim", "8192", "width 32", FIX):
        load_front_end(fresh, proc, d)
    assert built == [] and _not_attached(fresh)


def test_a_load_after_refusals_works_and_legacy_files_load(saved, tmp_path):
    d, proc, fresh = _copy(saved, tmp_path)
    path = d / "hrperc_front_end.json"
    heads = json.loads(path.read_text())["dem"]["heads"]
    _edit_json(path, _set("dem", "heads", value=5))
    with pytest.raises(ValueError):
        load_front_end(fresh, proc, d)
    _edit_json(path, _set("dem", "heads", value=heads))
    _edit_json(path, lambda c: (c.pop("format"), c.pop("version")))  # as written before the format had a version
    _old_weight_names(d)
    model = copy.deepcopy(fresh)  # the model every refusal above was tried on (the fixture's stays un-attached)
    model, aproc = load_front_end(model, proc, d)
    assert model.model._hrperc_attachment.encoder.dem is model.hrperc_front_end.dem


def _old_weight_names(d) -> None:
    """Rewrite the weight file with the names hrperc wrote before the front end owned its DEM (``dem.*``)."""
    from safetensors.torch import load_file, save_file

    path = str(d / "hrperc_front_end.safetensors")
    save_file({k.removeprefix("front_end."): v for k, v in load_file(path).items()}, path)


@pytest.mark.parametrize("version", [1, 2])
def test_version_1_files_load_with_their_dem_names_and_version_2_refuses_them(saved, tmp_path, version):
    d, proc, fresh = _copy(saved, tmp_path)
    _edit_json(d / "hrperc_front_end.json", _set("version", value=version))
    _old_weight_names(d)
    model = copy.deepcopy(fresh)
    if version == 2:  # today's files name the front end's state front_end.*: dem.* there is a wrong file
        with raises_naming(ValueError, "hrperc_front_end.safetensors", "front_end.dem.", FIX):
            load_front_end(model, proc, d)
        assert _not_attached(model)
        return
    model, _ = load_front_end(model, proc, d)
    weights = _files_weights(saved[0])
    loaded = model.hrperc_front_end.state_dict()
    assert weights.keys() == loaded.keys() and all(torch.equal(weights[k], loaded[k]) for k in weights)


def _files_weights(d) -> dict:
    from safetensors.torch import load_file

    return load_file(str(d / "hrperc_front_end.safetensors"))
