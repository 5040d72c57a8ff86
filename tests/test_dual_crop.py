"""DualPerspectiveCrop: grid and fit policies, ragged batches, geometry, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from hrperc import DualPerspectiveCrop, local_crop, local_merge, select_grid, stride_crop, stride_merge
from hrperc.dual_crop import candidate_grids


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
    assert select_grid((gh * 336, gw * 336), 336, max_tiles=16, rule="aspect")[1] / \
        select_grid((gh * 336, gw * 336), 336, max_tiles=16, rule="aspect")[0] == pytest.approx(gw / gh)


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


@pytest.mark.parametrize(
    "make, call, exc, words",
    [
        (lambda: DualPerspectiveCrop(grid=(4, 4), max_tiles=9), None, ValueError, ["grid=(4, 4)", "max_tiles=9"]),
        (lambda: DualPerspectiveCrop(grid=(0, 2)), None, ValueError, ["grid=(0, 2)"]),
        (lambda: DualPerspectiveCrop(grid="best"), None, ValueError, ["grid='best'"]),
        (lambda: DualPerspectiveCrop(fit="crop"), None, ValueError, ["fit='crop'"]),
        (lambda: DualPerspectiveCrop(tile_size=0), None, ValueError, ["tile_size=0"]),
        (lambda: DualPerspectiveCrop(tile_size=-3), None, ValueError, ["tile_size=-3"]),
        (lambda: DualPerspectiveCrop(grid="floor"), lambda m: m(torch.rand(1, 3, 200, 500)), ValueError,
         ["(200, 500)", "smaller than one tile"]),
        (lambda: DualPerspectiveCrop(grid=(1, 1), fit="pad", tile_size=28),
         lambda m: m(torch.rand(1, 3, 30, 20)), ValueError, ["does not fit", "never drops pixels"]),
        (lambda: DualPerspectiveCrop(grid="auto", fit="pad", tile_size=28, max_tiles=4),
         lambda m: m(torch.rand(1, 3, 100, 100)), ValueError, ["max_tiles=4"]),
        (lambda: DualPerspectiveCrop(), lambda m: m(torch.zeros(1, 3, 40, 40, dtype=torch.uint8)), TypeError,
         ["torch.uint8", "float"]),
        (lambda: DualPerspectiveCrop(), lambda m: m([]), ValueError, ["empty"]),
        (lambda: DualPerspectiveCrop(), lambda m: m(torch.rand(0, 3, 40, 40)), ValueError, ["positive"]),
        (lambda: DualPerspectiveCrop(), lambda m: m([torch.rand(3, 40, 40), torch.rand(1, 40, 40)]), ValueError,
         ["images[1]", "same channels"]),
        (lambda: DualPerspectiveCrop(), lambda m: m(torch.rand(40, 40)), ValueError, ["(40, 40)"]),
        (lambda: DualPerspectiveCrop(), lambda m: m("img.png"), TypeError, ["str"]),
    ],
)
def test_errors_name_the_values(make, call, exc, words):
    with pytest.raises(exc) as info:
        m = make()
        call(m)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
