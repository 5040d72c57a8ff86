"""Degenerate grids, bounded grid search, non-finite fill, DEM dtypes/width."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from _messages import FIX, raises_naming
from _models import vit as tiny_vit

from hrperc import DualPerspectiveCrop, DualPerspectiveEnhancement, HighResEncoder, wrap_backbone
from hrperc.ops.canvas import candidate_grids, select_grid


def _brute(image_size, tile, max_tiles, min_tiles, rule):
    """The rules over every grid (the search before it was bounded), as reference."""
    (H0, W0), (h, w) = image_size, tile
    grids = candidate_grids(max_tiles, min_tiles)
    if rule == "resolution":

        def score(g):
            s = min(g[0] * h / H0, g[1] * w / W0)
            eff = min(int(H0 * s) * int(W0 * s), H0 * W0)
            return (-eff, g[0] * h * g[1] * w - eff, g[0] * g[1])

        return min(grids, key=score)
    target, best, best_diff = W0 / H0, grids[0], float("inf")
    for g in grids:
        diff = abs(target - g[1] / g[0])
        if diff < best_diff - 1e-12:
            best, best_diff = g, diff
        elif abs(diff - best_diff) <= 1e-12 and H0 * W0 > 0.5 * h * w * g[0] * g[1]:
            best = g
    return best


def _degenerate(image_size, tile, max_tiles, min_tiles):
    """True when every canvas truncates the image's short side to 0 pixels (select_best_resolution keeps 0)."""
    (H0, W0), (h, w) = image_size, tile
    for gh, gw in candidate_grids(max_tiles, min_tiles):
        s = min(gh * h / H0, gw * w / W0)
        if int(H0 * s) * int(W0 * s) > 0:
            return False
    return True


# -- the resolution rule is LLaVA-NeXT's, except where that degenerates -------------------------------
def test_resolution_rule_equals_transformers_select_best_resolution_on_ordinary_images():
    sbr = pytest.importorskip("transformers.image_processing_utils").select_best_resolution
    rng = random.Random(13)
    checked = 0
    for _ in range(400):
        H0 = rng.randint(16, 4000)
        W0 = min(max(16, int(H0 * math.exp(rng.uniform(-3, 3)))), 40000)  # ratios up to ~1:20
        h = rng.choice([14, 224, 336, 448])
        w = rng.choice([h, rng.randint(100, 500)])
        max_tiles = rng.randint(1, 36)
        min_tiles = rng.randint(1, max_tiles)
        if _degenerate((H0, W0), (h, w), max_tiles, min_tiles):
            continue
        canvases = [(gh * h, gw * w) for gh, gw in candidate_grids(max_tiles, min_tiles)]
        ch, cw = sbr((H0, W0), canvases)
        assert select_grid((H0, W0), (h, w), max_tiles, min_tiles) == (ch // h, cw // w), (H0, W0, h, w)
        checked += 1
    assert checked > 350
    for size in [(336, 336), (672, 1008), (1008, 672), (1000, 1000), (768, 1366), (4000, 3000), (50, 50)]:
        canvases = [(gh * 336, gw * 336) for gh, gw in candidate_grids(9)]
        ch, cw = sbr(size, canvases)
        assert select_grid(size, 336, 9) == (ch // 336, cw // 336)


@pytest.mark.parametrize(
    "image_size, tile, max_tiles, min_tiles, want",
    [
        ((100000, 20), 336, 12, 1, (12, 1)),  # the case
        ((20, 100000), 336, 12, 1, (1, 12)),  # 1:5000
        ((100000, 20), 336, 12, 6, (12, 1)),  # min_tiles does not change it
        ((400, 20), 4, 4, 1, (4, 1)),  # 20:1 with small tiles and cap
        ((20, 400), 4, 4, 1, (1, 4)),  # 1:20
        ((20, 400), (2, 3), 6, 2, (1, 6)),
    ],
)
def test_extreme_aspect_ratios_get_the_best_shaped_grid_not_one_tile(image_size, tile, max_tiles, min_tiles, want):
    tile2 = (tile, tile) if isinstance(tile, int) else tile
    assert _degenerate(image_size, tile2, max_tiles, min_tiles)  # select_best_resolution keeps 0 pixels everywhere
    assert _brute(image_size, tile2, max_tiles, min_tiles, "resolution") == candidate_grids(max_tiles, min_tiles)[0]
    got = select_grid(image_size, tile, max_tiles, min_tiles)
    assert got == want
    assert got == select_grid(image_size, tile, max_tiles, min_tiles, rule="aspect")  # the rules agree there
    # No candidate canvas is closer in shape to the image than the chosen one.
    (H0, W0), (h, w) = image_size, tile2

    def distortion(g):
        return abs(math.log(g[1] * w / (g[0] * h)) - math.log(W0 / H0))

    assert distortion(got) == pytest.approx(min(map(distortion, candidate_grids(max_tiles, min_tiles))))
    dcm = DualPerspectiveCrop(grid="auto", tile_size=tile, max_tiles=max_tiles, min_tiles=min_tiles)
    assert dcm.plan(image_size).grid == want


def test_degenerate_cases_agree_with_the_aspect_rule_and_ordinary_ones_are_unchanged():
    rng = random.Random(4)
    seen = 0
    for _ in range(300):
        thin, long = rng.randint(1, 30), rng.randint(1000, 200000)
        H0, W0 = rng.choice([(thin, long), (long, thin)])
        h = rng.choice([4, 14, 336])
        max_tiles = rng.randint(1, 20)
        min_tiles = rng.randint(1, max_tiles)
        got = select_grid((H0, W0), h, max_tiles, min_tiles)
        if _degenerate((H0, W0), (h, h), max_tiles, min_tiles):
            seen += 1
            assert got == select_grid((H0, W0), h, max_tiles, min_tiles, rule="aspect")
            assert got == ((max_tiles, 1) if H0 > W0 else (1, max_tiles))
        else:
            assert got == _brute((H0, W0), (h, h), max_tiles, min_tiles, "resolution")
    assert seen > 50


# -- the search costs what the image needs, not what max_tiles allows ---------------------------------
def test_pruned_search_gives_the_same_grid_as_every_grid():
    rng = random.Random(8)
    for _ in range(300):
        H0 = rng.choice([rng.randint(1, 50), rng.randint(1, 5000)])
        W0 = rng.choice([rng.randint(1, 50), rng.randint(1, 5000)])
        h, w = rng.choice([(14, 14), (336, 336), (7, 5), (1, 1)])
        max_tiles = rng.randint(1, 30)
        min_tiles = rng.randint(1, max_tiles)
        for rule in ("resolution", "aspect"):
            subset = candidate_grids(max_tiles, min_tiles, image_size=(H0, W0), tile_size=(h, w), rule=rule)
            assert set(subset) <= set(candidate_grids(max_tiles, min_tiles))
            assert subset == sorted(subset, key=lambda g: (g[0] * g[1], g[0]))
            if rule == "resolution" and _degenerate((H0, W0), (h, w), max_tiles, min_tiles):
                continue
            assert select_grid((H0, W0), (h, w), max_tiles, min_tiles, rule) == _brute(
                (H0, W0), (h, w), max_tiles, min_tiles, rule
            ), (H0, W0, h, w, max_tiles, min_tiles, rule)


@pytest.mark.parametrize("size", [(1008, 1344), (336, 336), (500, 700), (3000, 4000), (100000, 20), (20, 5000)])
def test_a_huge_max_tiles_examines_few_grids_and_changes_nothing(size):
    # Resolution: the answer never needs more tiles than holding the image at native resolution.
    native = math.ceil(size[0] / 336) * math.ceil(size[1] / 336)
    examined = candidate_grids(10**6, image_size=size, tile_size=336)
    assert len(examined) <= 2 * (native + 1)  # a full search examines ~14 million grids
    assert (
        select_grid(size, 336, 10**6)
        == select_grid(size, 336, native)
        == _brute(size, (336, 336), native, 1, "resolution")
    )
    for fit in ("resize", "pad", "resize_pad"):
        big = DualPerspectiveCrop(grid="auto", fit=fit, max_tiles=10**6, thumbnail=False)
        small = DualPerspectiveCrop(grid="auto", fit=fit, max_tiles=max(native, 1), thumbnail=False)
        assert big.plan(size) == small.plan(size)


def test_aspect_rule_and_pad_growth_with_a_huge_cap_stay_small():
    # An exact ratio: the aspect search stops at the rows that can still tie.
    examined = candidate_grids(10**6, image_size=(1008, 1344), tile_size=336, rule="aspect")
    assert len(examined) <= 8 and select_grid((1008, 1344), 336, 10**6, rule="aspect") == (3, 4)  # (3k, 4k), k <= 8
    assert select_grid((500, 700), 336, 10**6, rule="aspect") == select_grid((500, 700), 336, 100, rule="aspect")
    # fit="pad" growing to min_tiles: the smallest holding grid, found row by row.
    dcm = DualPerspectiveCrop(grid="auto", fit="pad", max_tiles=10**6, min_tiles=10**5, thumbnail=False)
    geo = dcm.plan((1008, 1344))
    assert geo.num_tiles == 10**5 and geo.grid[0] * 336 >= 1008 and geo.grid[1] * 336 >= 1344
    small = DualPerspectiveCrop(grid="auto", fit="pad", max_tiles=40, min_tiles=17, thumbnail=False)
    assert small.plan((1008, 1344)).grid == (3, 6)  # 18 tiles, the shape closest to 3:4 among the fewest


def test_candidate_grids_needs_both_image_and_tile_size_and_a_known_rule():
    with raises_naming(TypeError, "image_size=(10, 10)", "tile_size=None", "pass both"):
        candidate_grids(9, image_size=(10, 10))
    with raises_naming(ValueError, "rule='best'", "'resolution'", "'aspect'"):
        candidate_grids(9, image_size=(10, 10), tile_size=5, rule="best")
    with raises_naming(TypeError, "max_tiles=9.5", "float"):
        candidate_grids(9.5, image_size=(10, 10), tile_size=5)
    assert candidate_grids(4) == [(1, 1), (1, 2), (2, 1), (1, 3), (3, 1), (1, 4), (2, 2), (4, 1)]


# -- a non-finite fill is refused ------------------------------------------------------------
@pytest.mark.parametrize("fill", [float("nan"), float("inf"), -float("inf"), np.float64("nan"), np.float32("inf")])
@pytest.mark.parametrize("fit", ["pad", "resize_pad", "resize"])
def test_non_finite_fill_is_refused_at_construction(fill, fit):
    with raises_naming(ValueError, f"fill={float(fill)!r}".replace("'", ""), "finite", "fill=0.0") as info:
        DualPerspectiveCrop(grid=(1, 1), tile_size=8, fit=fit, fill=fill)
    assert FIX.search(str(info.value))


def test_finite_fills_still_work():
    out = DualPerspectiveCrop(grid=(1, 1), tile_size=8, fit="pad", fill=0.25, thumbnail=False)(torch.ones(1, 3, 5, 6))
    assert (out.local[:, :, 5:] == 0.25).all() and (out.local[:, :, :5, :6] == 1).all()
    assert DualPerspectiveCrop(fill=np.float32(0.5)).fill == 0.5


# -- DEM dtypes and width ------------------------------------------------------------------------------
def _feats(dtype, n=4, d=32):
    torch.manual_seed(0)
    return torch.randn(n, 16, d).to(dtype), torch.randn(n, 16, d).to(dtype)


@pytest.mark.parametrize(
    "feat_dtype, module_dtype",
    [
        (torch.float64, torch.float32),
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float64),
        (torch.float32, torch.bfloat16),
    ],
)
def test_dem_refuses_features_of_another_float_dtype(feat_dtype, module_dtype):
    dem = DualPerspectiveEnhancement(32, 4, dtype=module_dtype)
    with raises_naming(
        TypeError, str(feat_dtype), str(module_dtype), f"dem.to({feat_dtype})", f"local_feats.to({module_dtype})"
    ) as info:
        dem(*_feats(feat_dtype), grid=(2, 2))
    assert FIX.search(str(info.value))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_dem_refuses_integer_features(dtype):
    dem = DualPerspectiveEnhancement(32, 4)
    with raises_naming(TypeError, "local_feats", str(dtype), "floating", "local_feats.to(torch.float32)"):
        dem(*_feats(dtype), grid=(2, 2))


def test_dem_refuses_two_feature_dtypes_and_accepts_matching_or_autocast():
    dem = DualPerspectiveEnhancement(32, 4)
    loc, glo = _feats(torch.float32)
    with raises_naming(
        TypeError, "local_feats", "global_feats", "torch.float32", "torch.float64", "global_feats.to(local_feats.dtype)"
    ):
        dem(loc, glo.double(), grid=(2, 2))
    ref = dem(loc, glo, grid=(2, 2))
    assert ref.dtype == torch.float32
    out64 = dem.double()(loc.double(), glo.double(), grid=(2, 2))
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), ref, rtol=1e-4, atol=1e-4)
    dem.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts per op: allowed
        assert dem(loc.bfloat16(), glo.bfloat16(), grid=(2, 2)).shape == ref.shape


@pytest.mark.parametrize("dem_dim", [48, 16])
def test_encoder_checks_the_dem_width_at_construction(dem_dim):
    bb = wrap_backbone(tiny_vit(dim=32))
    with raises_naming(ValueError, f"dim={dem_dim}", "hidden_size=32", "DualPerspectiveEnhancement(32"):
        HighResEncoder(bb, dem=DualPerspectiveEnhancement(dem_dim, heads=4))
    enc = HighResEncoder(bb, DualPerspectiveCrop(grid=(2, 2), tile_size=28), dem=DualPerspectiveEnhancement(32, 4))
    assert enc(torch.rand(3, 56, 56)).tokens.shape[-1] == 32
