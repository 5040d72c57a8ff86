"""Impossible sizes and options are refused by every recipe and by the runner; valid thin images are right.

* Image sizes: ``num_tokens`` / ``view_plan`` / ``plan`` / ``num_backbone_passes`` (and a front end's own
  ``plan``) refuse zero, negative, non-integer and wrong-length sizes; ``forward`` refuses images with a
  side of 0 pixels (lists, batches, PIL). 1-pixel and very thin images are valid and encoded.
* Options: every switch is a real bool (``dcm="false"`` is refused, not read as True), list options
  refuse empty lists (never "the defaults") and take numpy arrays / tensors as lists.
* DCM+DEM: a DEM whose output is not the whole token map is refused when the encoder is built.
* OneVision on an even token grid (224/16, 336/14 tiles): thin images get the count and the tokens of
  transformers' processor and model (which agree: the unpadded map keeps 0 rows or columns).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from _messages import FIX, raises_naming
from _models import vit as tiny_vit

import hrperc
from hrperc import HighResEncoder
from hrperc.modules.frontend import FrontEnd, ViewPlan, make_layout
from hrperc.ops import anyres
from hrperc.ops.canvas import CropGeometry
from hrperc.ops.pixels import to_pixels
from hrperc.ops.preprocess import resize

RECIPES = ("llava15", "llava_next", "llava_onevision", "internvl", "s2", "infimm_hd", "inf_llava")
SIZE_METHODS = ("num_tokens", "view_plan", "plan", "num_backbone_passes")


@pytest.fixture(scope="module")
def encoders():
    vit = tiny_vit()
    return {name: hrperc.create_encoder(name, vit) for name in RECIPES}


def _methods(enc):
    return list(SIZE_METHODS)  # every front end answers all four (view_plan is plan's older name)


def _fix(info):
    assert FIX.search(str(info.value)), str(info.value)


# --- image sizes -----------------------------------------------------------------------------------------

NOT_POSITIVE = [(0, 10), (10, 0), (0, 0), (-5, 10), (10, -1)]
NOT_INTEGER = [
    (10.7, 10),
    (10, 10.0),
    (True, 10),
    (10, False),
    ("10", 10),
    (None, 10),
    (np.float64(10), 10),
    (torch.tensor(10.0), 10),
    (np.bool_(True), 10),
    (torch.tensor([10]), 10),
]
WRONG_LENGTH = [(10,), (10, 10, 3), (), 10, "480x640", {"h": 10, "w": 10}]
NOT_A_SIZE_ARRAY = [torch.tensor([[10, 10]]), np.array([10.0, 10.0]), torch.tensor([True, True])]


@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize("size", NOT_POSITIVE, ids=str)
def test_zero_and_negative_sizes_are_refused_everywhere(encoders, name, size):
    enc = encoders[name]
    for method in _methods(enc):
        with raises_naming(ValueError, f"image_size={size!r}", ">= 1", method) as info:
            getattr(enc, method)(size)
        _fix(info)
    if enc.front_end is not None:  # a front end's own plan checks too (not only the runner's methods)
        with raises_naming(ValueError, f"image_size={size!r}", ">= 1"):
            enc.frontend.plan(size)


@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize("size", NOT_INTEGER, ids=repr)
def test_non_integer_sizes_are_refused_everywhere(encoders, name, size):
    enc = encoders[name]
    for method in _methods(enc):
        with raises_naming(TypeError, "image_size=", repr(size[0] if size[1] == 10 else size[1]), "whole") as info:
            getattr(enc, method)(size)
        _fix(info)


@pytest.mark.parametrize("name", RECIPES)
def test_wrong_length_and_non_size_values_are_refused(encoders, name):
    enc = encoders[name]
    for size in WRONG_LENGTH + NOT_A_SIZE_ARRAY:
        for method in _methods(enc):
            with raises_naming(TypeError, "image_size=", "(H, W)") as info:
                getattr(enc, method)(size)
            _fix(info)


@pytest.mark.parametrize("name", RECIPES)
def test_integer_scalars_of_numpy_and_torch_are_sizes(encoders, name):
    enc = encoders[name]
    want = enc.num_tokens((70, 90))
    for size in [
        (np.int64(70), np.int32(90)),
        (torch.tensor(70), 90),
        torch.Size([70, 90]),
        [70, 90],
        np.array([70, 90]),
        torch.tensor([70, 90]),
        (np.array(70), 90),
    ]:
        assert enc.num_tokens(size) == want, size
        assert enc.plan(size) == enc.plan((70, 90))


def test_the_dual_perspective_crop_and_the_anyres_ops_refuse_the_same_sizes():
    crop = hrperc.DualPerspectiveCrop(grid="auto", tile_size=28)
    for size in [(0, 10), (-1, 5), (10.5, 10), (True, 4), (10,), 10]:
        exc = ValueError if size in [(0, 10), (-1, 5)] else TypeError
        with raises_naming(exc, "image_size="):
            crop.plan(size)
        for op in (
            anyres.select_resolution,
            lambda s: anyres.resized_size(s, (56, 56)),
            lambda s: anyres.unpadded_shape(s, (8, 8)),
        ):
            with raises_naming(exc, "image_size="):
                op(size)


def test_a_user_written_front_end_gets_checked_sizes():
    seen = []

    class Thumbnail(FrontEnd):  # the docs' example (docs/recipes.md): it trusts image_size
        def plan(self, image_size):
            seen.append(image_size)
            (t, _), (ht, wt) = self.tile_size, self.tile_tokens
            geo = CropGeometry(tuple(image_size), (1, 1), self.tile_size, self.tile_size, (0, 0, t, t))
            return ViewPlan(tuple(image_size), 1, geo, make_layout(("image", ht * wt, (ht, wt))))

    class Subclassed(Thumbnail):
        def plan(self, image_size):
            return super().plan(image_size)

    for cls in (Thumbnail, Subclassed):
        fe = cls((28, 28), (7, 7))
        for size in [(0, 10), (10.5, 10), (10,)]:
            with pytest.raises((ValueError, TypeError), match=re.escape(f"image_size={size!r}")):
                fe.plan(size)
        assert fe.plan(np.array([30, 40])).image_size == (30, 40)
        assert seen[-1] == (30, 40) and all(type(v) is int for v in seen[-1])


ZERO_IMAGES = [(3, 0, 10), (3, 10, 0), (3, 0, 0), (1, 0, 5)]


@pytest.mark.parametrize("name", RECIPES)
def test_images_with_a_zero_side_are_refused_by_forward(encoders, name):
    enc = encoders[name]
    good = torch.rand(3, 30, 40)
    for shape in ZERO_IMAGES:
        for dtype in (torch.float32, torch.uint8):
            bad = torch.zeros(shape, dtype=dtype)
            with raises_naming(ValueError, str(shape), "is 0") as info:
                enc(bad)
            _fix(info)
            with raises_naming(ValueError, "images[1]", str(shape), "is 0"):
                enc([good.to(dtype) if dtype == torch.float32 else (good * 255).to(dtype), bad])
            with raises_naming(ValueError, str((2, *shape)), "is 0"):
                enc(bad.unsqueeze(0).expand(2, -1, -1, -1))


def test_empty_pil_images_are_refused():
    from PIL import Image

    enc = hrperc.create_encoder("llava_next", tiny_vit())
    for wh in [(0, 10), (10, 0), (0, 0)]:
        with raises_naming(ValueError, "images[0]", f"size {wh}") as info:
            enc([Image.new("RGB", wh)])
        _fix(info)


THIN = [(1, 1), (1, 4000), (4000, 1), (2, 3000), (3000, 5), (1, 29)]


@pytest.mark.parametrize("name", RECIPES)
def test_one_pixel_and_very_thin_images_are_encoded(encoders, name):
    enc = encoders[name]
    g = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in THIN]
    with torch.no_grad():
        out = enc(images)
    assert out.num_tokens == [enc.num_tokens(s) for s in THIN]
    assert torch.isfinite(out.tokens).all()
    for b in range(3):  # a ragged batch equals each image alone
        with torch.no_grad():
            alone = enc(images[b])
        n = out.num_tokens[b]
        torch.testing.assert_close(out.tokens[b, :n], alone.tokens[0], rtol=0, atol=1e-5)


# --- switches and list options ---------------------------------------------------------------------------

SWITCHES = {
    "llava15": ["pad"],
    "s2": ["pad"],
    "internvl": ["thumbnail", "dcm"],
    "llava_next": ["newline", "dcm"],
    "llava_onevision": ["newline", "dcm"],
    "infimm_hd": [],
    "inf_llava": ["thumbnail", "antialias", "encode_all"],
}
ENCODER_SWITCHES = ["check_range", "train_backbone", "grad_checkpointing"]
NOT_BOOLS = ["false", "True", "", 0, 1, None, 1.0, torch.tensor(True), np.array([False]), [True]]


@pytest.mark.parametrize("name", RECIPES)
def test_every_switch_of_every_recipe_must_be_a_bool(name):
    vit = tiny_vit()
    for option in SWITCHES[name] + ENCODER_SWITCHES:
        for value in NOT_BOOLS:
            with raises_naming(TypeError, f"{option}={value!r}", "True", "False") as info:
                hrperc.create_encoder(name, vit, **{option: value})
            _fix(info)


def test_dcm_false_as_a_string_never_turns_the_dem_on():
    vit = tiny_vit()
    for name in ("llava_next", "llava_onevision", "internvl"):
        plain = hrperc.create_encoder(name, vit)
        for value in ("false", "False", "0", "no"):
            with raises_naming(TypeError, f"dcm={value!r}"):
                hrperc.create_encoder(name, vit, dcm=value)
        # numpy's bool (what a comparison returns) is a bool
        off, on = hrperc.create_encoder(name, vit, dcm=np.bool_(False)), hrperc.create_encoder(name, vit, dcm=np.True_)
        assert off.dem is None and on.dem is not None
        size = (60, 90)
        assert off.num_backbone_passes(size) == plain.num_backbone_passes(size) < on.num_backbone_passes(size)
        assert type(on.frontend.uses_dem) is bool


def test_the_runner_and_the_crop_refuse_non_bool_switches():
    vit = tiny_vit()
    for option in ("encode_all", "check_range", "train_backbone", "grad_checkpointing"):
        for value in ("false", 0, torch.tensor(False)):
            with raises_naming(TypeError, f"{option}={value!r}", "HighResEncoder"):
                HighResEncoder(vit, **{option: value})
    for option in ("antialias", "thumbnail"):
        with raises_naming(TypeError, f"{option}='no'", "DualPerspectiveCrop"):
            hrperc.DualPerspectiveCrop(**{option: "no"})
    enc = HighResEncoder(vit)
    x = torch.rand(3, 40, 40)
    with raises_naming(TypeError, "timings='yes'"):
        enc(x, timings="yes")
    for option in ("encode_all", "thumbnail"):
        with raises_naming(TypeError, f"{option}=1"):
            enc.subimage_features(x, **{option: 1})
    with raises_naming(TypeError, "thumbnail='false'"):
        enc.crop(x, thumbnail="false")
    assert HighResEncoder(vit, encode_all=np.True_).encode_all is True


def test_ops_switches_must_be_bools():
    x = torch.rand(1, 3, 8, 8)
    with raises_naming(TypeError, "antialias='false'"):
        resize(x, (4, 4), antialias="false")
    with raises_naming(TypeError, "check_range=0"):
        to_pixels(x, check_range=0)
    with raises_naming(TypeError, "newline='no'"):
        anyres.num_tokens((100, 200), tile_size=336, patch_size=14, newline="no")


@pytest.mark.parametrize("name", ["llava_next", "llava_onevision"])
def test_empty_pinpoints_are_refused_not_the_defaults(name):
    vit = tiny_vit()
    for empty in ([], (), np.empty((0, 2), dtype=np.int64), torch.empty(0, 2, dtype=torch.long)):
        with raises_naming(ValueError, "pinpoints=", "empty") as info:
            hrperc.create_encoder(name, vit, pinpoints=empty)
        _fix(info)
    for wrong in ("28x56", {(28, 56)}, 28, [(28, 56.5)]):
        with raises_naming(TypeError, "pinpoints="):
            hrperc.create_encoder(name, vit, pinpoints=wrong)


@pytest.mark.parametrize("name", ["llava_next", "llava_onevision"])
def test_pinpoints_as_arrays_and_tensors_are_the_same_pinpoints(name):
    vit = tiny_vit()
    pins = [(28, 56), (56, 28), (56, 56), (28, 84)]
    ref = hrperc.create_encoder(name, vit, pinpoints=pins)
    sizes = [(10, 10), (60, 200), (200, 60), (90, 90)]
    for given in (np.array(pins), torch.tensor(pins), [np.array(p) for p in pins], [torch.tensor(p) for p in pins]):
        enc = hrperc.create_encoder(name, vit, pinpoints=given)
        assert enc.frontend.pinpoints == ref.frontend.pinpoints
        assert [enc.num_tokens(s) for s in sizes] == [ref.num_tokens(s) for s in sizes]
        # what the encoder records of its options is plain Python (integrations save it as JSON)
        assert json.loads(json.dumps(enc.recipe_options))["pinpoints"] == [list(p) for p in pins]


def test_s2_scales_empty_refused_arrays_converted():
    vit = tiny_vit()
    for empty in ((), [], np.array([], dtype=np.int64)):
        with raises_naming(ValueError, "scales=", "empty"):
            hrperc.create_encoder("s2", vit, scales=empty)
    ref = hrperc.create_encoder("s2", vit, scales=(1, 2, 3))
    for given in (np.array([1, 2, 3]), torch.tensor([1, 2, 3]), [np.int64(1), 2, torch.tensor(3)]):
        enc = hrperc.create_encoder("s2", vit, scales=given)
        assert enc.frontend.scales == (1, 2, 3) and all(type(s) is int for s in enc.frontend.scales)
        assert enc.num_backbone_passes((50, 70)) == ref.num_backbone_passes((50, 70)) == 14
    for bad in (np.array([1.0, 2.0]), (1, 0), (1, True), "12"):
        with pytest.raises((TypeError, ValueError), match="scales="):
            hrperc.create_encoder("s2", vit, scales=bad)


def test_integer_options_are_checked_at_build():
    vit = tiny_vit()
    cases = [
        ("llava_onevision", "max_tiles", "9", TypeError),
        ("llava_onevision", "max_tiles", 0, ValueError),
        ("llava_onevision", "max_tiles", 2.5, TypeError),
        ("internvl", "max_tiles", "12", TypeError),
        ("internvl", "min_tiles", 0, ValueError),
        ("internvl", "downsample", 2.0, TypeError),
        ("infimm_hd", "max_side", True, TypeError),
        ("infimm_hd", "max_side", -1, ValueError),
    ]
    for name, option, value, exc in cases:
        with raises_naming(exc, f"{option}={value!r}") as info:
            hrperc.create_encoder(name, vit, **{option: value})
        _fix(info)
    assert hrperc.create_encoder("llava_onevision", vit, max_tiles=np.int64(4)).frontend.max_tiles == 4
    assert hrperc.create_encoder("llava_onevision", vit, max_tiles=None).frontend.max_tiles is None
    for name in ("llava_next", "inf_llava"):  # the runner's max_batch: 'auto' or a whole number >= 1
        for value in ("4", 2.0, True, 0):
            with raises_naming(ValueError, f"max_batch={value!r}", "'auto'") as info:
                hrperc.create_encoder(name, vit, max_batch=value)
            _fix(info)
        assert hrperc.create_encoder(name, vit, max_batch=np.int64(4)).chunk_size == 4


# --- DCM+DEM mismatches, refused at build ----------------------------------------------------------------

DCM_RECIPES = ("llava_next", "llava_onevision", "internvl")
REDUCING = [
    dict(reduction="bilinear"),
    dict(reduction="avg"),
    dict(reduction="area"),
    dict(reduction="bilinear", output_size=(2, 2)),
]


@pytest.mark.parametrize("name", DCM_RECIPES)
def test_a_reducing_dem_is_refused_when_the_encoder_is_built(name):
    vit = tiny_vit()
    for kw in REDUCING:
        dem = hrperc.DualPerspectiveEnhancement(32, 4, **kw)
        with raises_naming(ValueError, f"reduction={kw['reduction']!r}", "reduction='none'", "dcm=True") as info:
            hrperc.create_encoder(name, vit, dcm=True, dem=dem)
        _fix(info)
        frontend = hrperc.create_encoder(name, vit, dcm=True).frontend  # the runner itself refuses it too
        with raises_naming(ValueError, f"reduction={kw['reduction']!r}", "reduction='none'"):
            HighResEncoder(vit, frontend, dem=dem)
    # the right DEM is taken and runs
    enc = hrperc.create_encoder(name, vit, dcm=True, dem=hrperc.DualPerspectiveEnhancement(32, 4, reduction="none"))
    with torch.no_grad():
        assert enc(torch.rand(3, 60, 90)).num_tokens == [enc.num_tokens((60, 90))]


@pytest.mark.parametrize("name", DCM_RECIPES)
def test_other_dem_mismatches_are_refused_at_build(name):
    vit = tiny_vit()
    with raises_naming(ValueError, "dim=16", "hidden_size=32"):  # the width
        hrperc.create_encoder(name, vit, dcm=True, dem=hrperc.DualPerspectiveEnhancement(16, 2, reduction="none"))

    class OneTileDEM(torch.nn.Module):  # a custom module: no reduction attribute, one tile's worth of tokens
        dim = 32

        def num_tokens(self, grid, tile_size):
            return tile_size[0] * tile_size[1]

    with raises_naming(ValueError, "dem.num_tokens((2, 3), (4, 4)) = 16", "96 tokens") as info:
        hrperc.create_encoder(name, vit, dcm=True, dem=OneTileDEM())
    _fix(info)


def test_a_fixed_grid_dem_that_cannot_be_averaged_is_refused_at_build():
    vit = tiny_vit()
    for grid, kw in [((3, 3), dict(reduction="none")), ((2, 2), dict(output_size=(2, 2))), ((1, 2), dict())]:
        dem = hrperc.DualPerspectiveEnhancement(32, 4, **kw)
        if kw == {}:  # the released reduction gives one tile's worth: averaged with the thumbnail, built
            assert hrperc.create_encoder("inf_llava", vit, dem=dem, grid=grid, max_tiles=9).num_tokens((40, 50)) == 16
            continue
        with raises_naming(ValueError, "combine='mean'", str(grid)) as info:
            hrperc.create_encoder("inf_llava", vit, dem=dem, grid=grid)
        _fix(info)
        enc = hrperc.create_encoder("inf_llava", vit, dem=dem, grid=grid, combine="concat")  # concat takes any count
        assert enc.num_tokens((40, 50)) == 16 + dem.num_tokens(grid, (4, 4))


# --- LLaVA-OneVision on even token grids: thin images as transformers computes them ----------------------

transformers = pytest.importorskip("transformers")

ONEVISION_THIN = [(1, 1000), (1000, 1), (10, 2500), (2500, 10), (2, 700), (700, 2)]


def _onevision(tile, patch):
    from transformers import LlavaOnevisionProcessor

    torch.manual_seed(0)
    pins = [[tile * a, tile * b] for a in range(1, 7) for b in range(1, 7)]
    vision = transformers.SiglipVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=tile,
        patch_size=patch,
    )
    text = transformers.Qwen2Config(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=64,
    )
    cfg = transformers.LlavaOnevisionConfig(vision_config=vision, text_config=text, image_grid_pinpoints=pins)
    model = transformers.LlavaOnevisionForConditionalGeneration(cfg).eval()
    proc = transformers.LlavaOnevisionImageProcessor(
        image_mean=[0.5] * 3, image_std=[0.5] * 3, size={"height": tile, "width": tile}, image_grid_pinpoints=pins
    )
    counter = object.__new__(LlavaOnevisionProcessor)  # the counting code only, without a tokenizer
    counter.image_processor, counter.num_image_tokens = proc, (tile // patch) ** 2
    counter.vision_aspect_ratio, counter.vision_feature_select_strategy = "anyres_max_9", "full"
    enc = hrperc.create_encoder("llava_onevision", model.model.vision_tower)  # default pinpoints, scaled to the tile
    assert enc.frontend.pinpoints == tuple(tuple(p) for p in pins) and enc.tile_tokens[0] % 2 == 0
    return model, proc, counter, enc


@pytest.mark.parametrize("tile,patch", [(224, 16), (336, 14)])
def test_onevision_thin_images_on_an_even_token_grid_equal_transformers(tile, patch):
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    model, proc, counter, enc = _onevision(tile, patch)
    g = torch.Generator().manual_seed(2)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in ONEVISION_THIN]
    with torch.no_grad():
        out = enc(images)
    D = enc.backbone.hidden_size
    degenerate = 0
    for b, (size, img) in enumerate(zip(ONEVISION_THIN, images)):
        batch = proc(img, return_tensors="pt", input_data_format="channels_first")
        n_views = image_size_to_num_patches(batch["image_sizes"][0], model.config.image_grid_pinpoints, tile)
        with torch.no_grad():
            feats = model.model.vision_tower(batch["pixel_values"][0, :n_views], output_hidden_states=True)
            packed, _ = model.model.pack_image_features(
                [feats.hidden_states[-1]],
                batch["image_sizes"],
                image_newline=torch.zeros(D),
                vision_aspect_ratio="anyres_max_9",
            )
        ref = packed[0]
        n = enc.num_tokens(size)
        assert n == counter._get_number_of_features(*size, tile, tile) == ref.shape[0] == out.num_tokens[b], size
        torch.testing.assert_close(out.tokens[b, :n], ref, rtol=0, atol=1e-5)
        rows, cols = enc.plan(size).anyres.unpadded
        degenerate += rows == 0 or cols == 0
    assert degenerate >= 4  # the class of the failure: the unpadded map keeps no row (or no column)


def test_onevision_thin_images_with_projector_and_newline_equal_get_image_features():
    model, proc, _, enc = _onevision(224, 16)
    sizes = [(1, 1000), (1000, 1), (10, 2500)]
    g = torch.Generator().manual_seed(3)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]
    batch = proc(images, return_tensors="pt", input_data_format="channels_first")
    mm = model.model
    with torch.no_grad():
        ref = mm.get_image_features(
            batch["pixel_values"],
            batch["image_sizes"],
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9",
        ).pooler_output
        out = enc(images, project=mm.multi_modal_projector, newline=mm.image_newline)
    for b in range(len(sizes)):
        n = out.num_tokens[b]
        assert n == ref[b].shape[0]
        torch.testing.assert_close(out.tokens[b, :n], ref[b], rtol=0, atol=1e-5)


def test_shrunk_shape_takes_an_empty_unpadded_map():
    assert anyres.shrunk_shape((0, 84), (14, 14), 9) == (0, 84)
    assert anyres.shrunk_shape((84, 0), (14, 14), 9) == (84, 0)
    with raises_naming(ValueError, "shape=(-1, 84)"):
        anyres.shrunk_shape((-1, 84), (14, 14), 9)
