"""DualPerspectiveCrop: grid and fit policies, ragged batches, geometry, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _messages import FIX, assert_names, raises_naming
from hypothesis import given
from hypothesis import strategies as st

from hrperc import DualPerspectiveCrop, local_crop, local_merge, stride_crop, stride_merge
from hrperc.ops.canvas import candidate_grids, select_grid


def test_fixed_grid_resize_matches_released_bicubic_pipeline():
    img = torch.rand(2, 3, 700, 900)
    dcm = DualPerspectiveCrop(grid=(3, 3), tile_size=28, mode="bicubic", antialias=False)
    out = dcm(img)
    canvas = F.interpolate(img, size=(84, 84), mode="bicubic", align_corners=False, antialias=False)
    assert torch.equal(out.local, local_crop(canvas, (3, 3)))
    assert torch.equal(out.strided, stride_crop(canvas, (3, 3)))
    thumb = F.interpolate(img, size=(28, 28), mode="bicubic", align_corners=False, antialias=False)
    assert torch.equal(out.thumbnail, thumb)
    assert out.offsets == [0, 9] and out.grids == [(3, 3), (3, 3)] and out.uniform_grid


def test_exact_size_image_is_not_resampled():
    img = torch.rand(1, 3, 84, 112)
    out = DualPerspectiveCrop(grid=(3, 4), tile_size=28, max_tiles=12)(img)
    assert torch.equal(local_merge(out.local, (3, 4)), img)
    assert torch.equal(stride_merge(out.strided, (3, 4)), img)


def test_antialias_is_default_and_resampling_is_float32():
    img = torch.rand(1, 3, 300, 300, dtype=torch.bfloat16)
    out = DualPerspectiveCrop(grid=(1, 1), tile_size=30)(img)
    ref = F.interpolate(img.float(), size=(30, 30), mode="bicubic", antialias=True, align_corners=False)
    assert out.local.dtype == torch.bfloat16
    assert torch.equal(out.local, ref.to(torch.bfloat16))


def test_pad_keeps_every_pixel_and_reports_the_valid_region():
    img = torch.arange(3 * 50 * 70, dtype=torch.int32).reshape(3, 50, 70)
    dcm = DualPerspectiveCrop(grid="auto", tile_size=28, fit="pad", fill=-1, thumbnail=False, max_tiles=9)
    out = dcm([img])
    geo = out.geometries[0]
    assert geo.grid == (2, 3) and geo.canvas_size == (56, 84) and geo.valid_box == (0, 0, 50, 70)
    canvas = local_merge(out.local, geo.grid)[0]
    assert torch.equal(canvas[:, :50, :70], img)
    assert (canvas[:, 50:, :] == -1).all() and (canvas[:, :, 70:] == -1).all()
    mask = geo.valid_mask(14)  # 4 x 6 tokens; row 3 covers pixels 42..55 (some real), col 5 covers 70..83 (none)
    assert mask.shape == (4, 6)
    assert mask[:, :5].all() and not mask[:, 5].any()


def test_resize_pad_centres_and_preserves_aspect():
    img = torch.rand(3, 100, 300)
    dcm = DualPerspectiveCrop(grid=(2, 2), tile_size=50, fit="resize_pad", max_tiles=4)
    geo = dcm.plan((100, 300))
    assert geo.valid_box == (33, 0, 33, 100)  # 100x300 -> 33x100, centred in 100x100
    out = dcm(img)
    canvas = local_merge(out.local, (2, 2))[0]
    assert (canvas[:, :33] == 0).all() and (canvas[:, 66:] == 0).all()


@given(st.integers(20, 3000), st.integers(20, 3000), st.integers(1, 16), st.sampled_from(["resolution", "aspect"]))
def test_auto_grid_respects_budget_and_is_a_candidate(H, W, max_tiles, rule):
    g = select_grid((H, W), 336, max_tiles=max_tiles, rule=rule)
    assert g in candidate_grids(max_tiles)
    assert 1 <= g[0] * g[1] <= max_tiles


@given(st.integers(1, 4), st.integers(1, 4))
def test_auto_grid_picks_the_exact_grid_for_exact_sizes(gh, gw):
    assert select_grid((gh * 336, gw * 336), 336, max_tiles=16) == (gh, gw)
    assert select_grid((gh * 336, gw * 336), 336, max_tiles=16, rule="aspect")[1] / select_grid(
        (gh * 336, gw * 336), 336, max_tiles=16, rule="aspect"
    )[0] == pytest.approx(gw / gh)


def test_auto_grid_prefers_aspect_for_wide_images():
    assert select_grid((400, 1600), 336, max_tiles=6) == (1, 4)
    assert select_grid((1008, 1344), 336, max_tiles=12) == (3, 4)
    assert select_grid((1600, 400), 336, max_tiles=6, rule="aspect") == (4, 1)


def test_floor_grid_is_the_papers_rule():
    dcm = DualPerspectiveCrop(grid="floor", tile_size=336, max_tiles=16)
    assert dcm.plan((1000, 1400)).grid == (2, 4)


def test_ragged_batch_with_different_grids():
    imgs = [torch.rand(3, 56, 56), torch.rand(3, 28, 84), torch.rand(3, 90, 30)]
    out = DualPerspectiveCrop(grid="auto", tile_size=28, max_tiles=4)(imgs)
    assert out.grids == [(2, 2), (1, 3), (3, 1)]
    assert out.offsets == [0, 4, 7]
    assert out.local.shape == (10, 3, 28, 28) and out.strided.shape == (10, 3, 28, 28)
    assert out.thumbnail.shape == (3, 3, 28, 28)
    # the first image is exactly a 2x2 grid of 28: no resampling, exact tiles
    assert torch.equal(local_merge(out.local[:4], (2, 2))[0], imgs[0])
    assert not out.uniform_grid


# -- fill must fit the image dtype ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fill, dtype, words",
    [
        (0.5, torch.uint8, ["fill=0.5", "torch.uint8", "[0, 255]"]),
        (256, torch.uint8, ["fill=256", "torch.uint8", "[0, 255]"]),
        (-1, torch.uint8, ["fill=-1", "[0, 255]"]),
        (1.5, torch.int32, ["fill=1.5", "torch.int32", "[-2147483648, 2147483647]"]),  # nan: refused at construction
        (2**63, torch.int64, [f"fill={2**63}", "torch.int64", "9223372036854775807]"]),
        (2, torch.bool, ["fill=2", "torch.bool", "[0, 1]"]),
        (1e6, torch.float16, ["fill=1000000.0", "torch.float16", "65504", "inf"]),
    ],
)
def test_fill_is_checked_against_the_image_dtype(fill, dtype, words):
    dcm = DualPerspectiveCrop(grid=(1, 1), tile_size=8, fit="pad", fill=fill, thumbnail=False)
    with pytest.raises(ValueError) as info:
        dcm(torch.zeros(1, 3, 8, 8, dtype=dtype))
    msg = str(info.value)
    assert_names(msg, *words)
    assert FIX.search(msg), msg


@pytest.mark.parametrize(
    "fill, dtype",
    [
        (255.0, torch.uint8),
        (-7, torch.int8),
        (2**62, torch.int64),
        (1, torch.bool),
        (-1.5, torch.float16),
        (0.25, torch.float32),
    ],
)
def test_representable_fill_is_used_exactly(fill, dtype):
    img = torch.ones(3, 5, 6, dtype=dtype)
    out = DualPerspectiveCrop(grid=(1, 1), tile_size=8, fit="pad", fill=fill, thumbnail=False)([img])
    canvas = out.local[0]
    assert canvas.dtype == dtype
    assert torch.equal(canvas[:, :5, :6], img)
    assert (canvas[:, 5:, :] == torch.tensor(fill).to(dtype)).all() and (canvas[:, :, 6:] == canvas[0, 7, 7]).all()
    if dtype == torch.int64:
        assert canvas[0, 7, 7].item() == fill  # exact, not through a float


def test_fill_is_not_checked_when_unused_and_must_be_a_number():
    DualPerspectiveCrop(grid=(1, 1), tile_size=8, fill=0.5)(torch.rand(1, 3, 8, 8))  # fit="resize": no padding
    with raises_naming(TypeError, "fill=tensor(0.)", "Tensor", "fill=0", "fill=t.item()"):
        DualPerspectiveCrop(fill=torch.tensor(0.0))


# -- list items must agree -----------------------------------------------------------------------------------
def test_list_items_with_different_dtypes_are_refused():
    dcm = DualPerspectiveCrop(grid=(1, 1), tile_size=8)
    with pytest.raises(ValueError) as info:
        dcm([torch.rand(3, 8, 8), torch.rand(3, 8, 8, dtype=torch.float64)])
    msg = str(info.value)
    assert_names(msg, "images[1]", "torch.float64", "images[0]", "torch.float32", "img.to(")
    assert FIX.search(msg)


@pytest.mark.parametrize("other", ["meta", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_list_items_on_different_devices_are_refused(other):
    # 'meta' tensors have a device but no data, so the device check is tested on any machine
    dcm = DualPerspectiveCrop(grid=(1, 1), tile_size=8)
    with pytest.raises(ValueError) as info:
        dcm([torch.rand(3, 8, 8), torch.rand(3, 8, 8, device=other)])
    msg = str(info.value)
    assert_names(msg, "images[1]", f"on {other}", "images[0]", "on cpu", "img.to(")


# -- min_tiles is applied or refused, never ignored ----------------------------------------------------------
def test_min_tiles_grows_the_auto_pad_grid_and_keeps_pixels():
    img = torch.arange(3 * 50 * 50, dtype=torch.int32).reshape(3, 50, 50)
    base = DualPerspectiveCrop(grid="auto", tile_size=28, fit="pad", thumbnail=False, max_tiles=9)
    assert base.plan((50, 50)).grid == (2, 2)  # min_tiles=1: the smallest grid that holds the image
    dcm = DualPerspectiveCrop(grid="auto", tile_size=28, fit="pad", thumbnail=False, max_tiles=9, min_tiles=6)
    geo = dcm.plan((50, 50))
    assert geo.grid in ((2, 3), (3, 2)) and geo.num_tiles >= 6
    out = dcm([img])
    canvas = local_merge(out.local, geo.grid)[0]
    assert torch.equal(canvas[:, :50, :50], img) and geo.valid_box == (0, 0, 50, 50)
    # ties go to the canvas aspect closest to the image's: a wide image gets a wide grid
    wide = DualPerspectiveCrop(grid="auto", tile_size=28, fit="pad", thumbnail=False, max_tiles=9, min_tiles=4)
    assert wide.plan((20, 70)).grid == (1, 4)
    for H, W in [(20, 70), (50, 50), (80, 30), (84, 84)]:
        g = dcm.plan((H, W)).grid
        assert 6 <= g[0] * g[1] <= 9 and g[0] * 28 >= H and g[1] * 28 >= W


@pytest.mark.parametrize(
    "kwargs, size, words",
    [
        (dict(grid=(1, 2), min_tiles=4), None, ["grid=(1, 2)", "2 tiles", "min_tiles=4", "Lower min_tiles"]),
        (
            dict(grid="floor", min_tiles=4, max_tiles=9),
            (60, 40),
            ["(60, 40)", "grid (2, 1)", "2 tiles", "min_tiles=4", "grid='auto'"],
        ),
        (
            dict(grid="floor", fit="pad", min_tiles=4, max_tiles=9),
            (20, 40),
            ["(20, 40)", "grid (1, 2)", "2 tiles", "min_tiles=4"],
        ),
        (
            dict(grid="auto", fit="pad", min_tiles=5, max_tiles=5),
            (50, 50),
            ["(50, 50)", "grid (2, 2)", "min_tiles=5", "max_tiles=5", "Lower min_tiles", "raise max_tiles"],
        ),
    ],
)
def test_min_tiles_outside_a_fixed_or_floor_grid_is_refused(kwargs, size, words):
    with pytest.raises(ValueError) as info:
        DualPerspectiveCrop(tile_size=28, thumbnail=False, **kwargs).plan(size)
    msg = str(info.value)
    assert_names(msg, *words)
    assert FIX.search(msg)


# -- tile larger than the image: explicit upsampling, 'floor' refuses, nothing is cropped --------------------
def test_small_image_is_upsampled_explicitly_by_fixed_and_auto_grids():
    img = torch.rand(1, 3, 50, 50)
    out = DualPerspectiveCrop(grid=(3, 3), tile_size=336)(img)
    geo = out.geometries[0]
    assert out.local.shape == (9, 3, 336, 336) and geo.canvas_size == (1008, 1008)
    assert geo.scale == (1008 / 50, 1008 / 50)  # reported: the tiles hold no more detail than the image
    auto = DualPerspectiveCrop(grid="auto", tile_size=336, max_tiles=9).plan((50, 50))
    assert auto.grid == (1, 1) and auto.scale[0] > 1  # the fewest tiles: more cannot keep more pixels
    padded = DualPerspectiveCrop(grid="auto", tile_size=336, fit="pad").plan((50, 50))
    assert padded.grid == (1, 1) and padded.scale == (1.0, 1.0)  # native pixels, padded


@pytest.mark.parametrize("fit", ["resize", "resize_pad"])
def test_floor_refuses_an_image_smaller_than_a_tile_and_names_the_fix(fit):
    dcm = DualPerspectiveCrop(grid="floor", tile_size=336, fit=fit)
    with pytest.raises(ValueError) as info:
        dcm(torch.rand(1, 3, 50, 500))
    msg = str(info.value)
    assert_names(msg, "(50, 500)", "(336, 336)", "fit='pad'", "grid='auto'", "tile_size")
    for size in [(336, 700), (400, 700), (671, 1000)]:  # floor never enlarges
        assert max(dcm.plan(size).scale) <= 1.0


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(grid=(2, 3)),
        dict(grid="auto", max_tiles=6),
        dict(grid="auto", max_tiles=6, auto_rule="aspect"),
        dict(grid="floor", max_tiles=16),
        dict(grid=(2, 3), fit="resize_pad"),
        dict(grid="auto", fit="resize_pad"),
        dict(grid="auto", fit="pad", max_tiles=16),
        dict(grid="floor", fit="pad", max_tiles=16),
    ],
    ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()),
)
@pytest.mark.parametrize("size", [(13, 17), (40, 100), (75, 60)])
def test_no_policy_drops_a_pixel(kwargs, size):
    # 'area' resampling averages every input pixel into some output pixel, so a pixel that reaches the
    # canvas leaves a trace there; a cropped one would not. Try a bright dot on each corner and edge.
    dcm = DualPerspectiveCrop(tile_size=28, mode="area", thumbnail=False, **kwargs)
    H, W = size
    if kwargs["grid"] == "floor" and kwargs.get("fit") != "pad" and min(H, W) < 28:
        with raises_naming(ValueError, f"({H}, {W})", "(28, 28)", "fit='pad'"):  # refused, not cropped
            dcm(torch.zeros(1, 1, H, W))
        return
    for r, c in [(0, 0), (0, W - 1), (H - 1, 0), (H - 1, W - 1), (H // 2, W // 2), (H - 1, W // 2)]:
        img = torch.zeros(1, 1, H, W)
        img[0, 0, r, c] = 1.0
        out = dcm(img)
        geo = out.geometries[0]
        canvas = local_merge(out.local, geo.grid)[0, 0]
        top, left, height, width = geo.valid_box
        assert canvas[top : top + height, left : left + width].sum() > 0, (kwargs, size, (r, c))
        assert torch.equal(stride_merge(out.strided, geo.grid)[0, 0], canvas)
        if geo.fit == "pad":
            assert canvas[r, c] == 1.0  # copied, not resampled


@pytest.mark.parametrize(
    "make, call, exc, words",
    [
        (lambda: DualPerspectiveCrop(grid=(4, 4), max_tiles=9), None, ValueError, ["grid=(4, 4)", "max_tiles=9"]),
        (lambda: DualPerspectiveCrop(grid=(0, 2)), None, ValueError, ["grid=(0, 2)"]),
        (lambda: DualPerspectiveCrop(grid="best"), None, ValueError, ["grid='best'"]),
        (lambda: DualPerspectiveCrop(fit="crop"), None, ValueError, ["fit='crop'"]),
        (lambda: DualPerspectiveCrop(tile_size=0), None, ValueError, ["tile_size=0"]),
        (lambda: DualPerspectiveCrop(tile_size=-3), None, ValueError, ["tile_size=-3"]),
        (
            lambda: DualPerspectiveCrop(grid="floor"),
            lambda m: m(torch.rand(1, 3, 200, 500)),
            ValueError,
            ["(200, 500)", "(336, 336)", "fit='pad'"],
        ),
        (
            lambda: DualPerspectiveCrop(grid=(1, 1), fit="pad", tile_size=28),
            lambda m: m(torch.rand(1, 3, 30, 20)),
            ValueError,
            ["(30, 20)", "(28, 28)", "grid (1, 1)", "fit='pad'", "fit='resize'"],
        ),
        (
            lambda: DualPerspectiveCrop(grid="auto", fit="pad", tile_size=28, max_tiles=4),
            lambda m: m(torch.rand(1, 3, 100, 100)),
            ValueError,
            ["max_tiles=4"],
        ),
        (
            lambda: DualPerspectiveCrop(),
            lambda m: m(torch.zeros(1, 3, 40, 40, dtype=torch.uint8)),
            TypeError,
            ["torch.uint8", "float", "fit='resize'"],
        ),
        (lambda: DualPerspectiveCrop(), lambda m: m([]), ValueError, ["images", "0 images"]),
        (
            lambda: DualPerspectiveCrop(),
            lambda m: m(torch.rand(0, 3, 40, 40)),
            ValueError,
            ["images has shape (0, 3, 40, 40)", "0 images", "batch size 0"],
        ),
        (
            lambda: DualPerspectiveCrop(),
            lambda m: m(torch.rand(2, 3, 0, 40)),
            ValueError,
            ["images has shape (2, 3, 0, 40)", ">= 1", "height H is 0"],
        ),
        (
            lambda: DualPerspectiveCrop(),
            lambda m: m([torch.rand(3, 40, 40), torch.rand(0, 40, 40)]),
            ValueError,
            ["images[1]", "(0, 40, 40)", "channel count C is 0"],
        ),
        (
            lambda: DualPerspectiveCrop(),
            lambda m: m([torch.rand(3, 40, 40), torch.rand(1, 40, 40)]),
            ValueError,
            ["images[1]", "(1, 40, 40)", "images[0]", "(3, 40, 40)"],
        ),
        (
            lambda: DualPerspectiveCrop(),
            lambda m: m(torch.rand(40, 40)),
            ValueError,
            ["(40, 40)", "2 dims", "(B, C, H, W)", "(C, H, W)", "img.unsqueeze(0)"],
        ),
        (
            lambda: DualPerspectiveCrop(),
            lambda m: m([torch.rand(1, 3, 40, 40)]),
            ValueError,
            ["images[0]", "(1, 3, 40, 40)", "img.squeeze(0)"],
        ),
        (lambda: DualPerspectiveCrop(), lambda m: m("img.png"), TypeError, ["str"]),
        (lambda: DualPerspectiveCrop(fit="crop"), None, ValueError, ["fit='crop'", "('resize', 'pad', 'resize_pad')"]),
        (
            lambda: DualPerspectiveCrop(mode="lanczos"),
            None,
            ValueError,
            ["mode='lanczos'", "'bicubic'", "'bilinear'", "'area'"],
        ),
        (
            lambda: DualPerspectiveCrop(auto_rule="best"),
            None,
            ValueError,
            ["auto_rule='best'", "('resolution', 'aspect')"],
        ),
        (
            lambda: select_grid((100, 100), 28, rule="best"),
            None,
            ValueError,
            ["rule='best'", "('resolution', 'aspect')"],
        ),
        (lambda: DualPerspectiveCrop(max_tiles=9.0), None, TypeError, ["max_tiles=9.0", "float", "max_tiles=9"]),
        (lambda: DualPerspectiveCrop(min_tiles="2"), None, TypeError, ["min_tiles='2'", "str", ">= 1"]),
        (lambda: DualPerspectiveCrop(max_tiles=0), None, ValueError, ["max_tiles=0", ">= 1"]),
        (lambda: DualPerspectiveCrop(min_tiles=5, max_tiles=4), None, ValueError, ["min_tiles=5 > max_tiles=4"]),
        (
            lambda: DualPerspectiveCrop(grid="floor", max_tiles=4, tile_size=28),
            lambda m: m(torch.rand(1, 3, 90, 90)),
            ValueError,
            ["(90, 90)", "grid (3, 3)", "max_tiles=4", "grid='auto'"],
        ),
    ],
)
def test_errors_name_the_values(make, call, exc, words):
    with pytest.raises(exc) as info:
        m = make()
        if call is not None:
            call(m)
    msg = str(info.value)
    assert_names(msg, *words)
    assert FIX.search(msg), f"no fix in: {msg}"
