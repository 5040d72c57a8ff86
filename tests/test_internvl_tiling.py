"""The "aspect" grid rule against InternVL's tiling as transformers implements it (GotOcr2ImageProcessor)."""

from __future__ import annotations

import random

import pytest

from hrperc import DualPerspectiveCrop
from hrperc.ops.canvas import select_grid

pytest.importorskip("transformers")
from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas  # noqa: E402


def _sizes(n=3000, seed=0):
    rng = random.Random(seed)
    out = {(h, w) for h in range(1, 900, 37) for w in range(1, 900, 41)}  # small images: ties on every ratio
    out |= {(s, 20 * s) for s in range(1, 200, 9)} | {(20 * s, s) for s in range(1, 200, 9)}  # 1:20, 20:1
    out |= {(448 * a, 448 * b) for a in range(1, 7) for b in range(1, 7)}  # exact grid ratios
    while len(out) < n:
        out.add((rng.randint(1, 5000), rng.randint(1, 5000)))
    return sorted(out)


@pytest.mark.parametrize("min_tiles,max_tiles,tile", [(1, 12, 448), (1, 6, 448), (2, 9, 336)])
def test_aspect_rule_equals_internvl_tiling(min_tiles, max_tiles, tile):
    for h, w in _sizes():
        cols, rows = get_optimal_tiled_canvas((h, w), (tile, tile), min_tiles, max_tiles)
        got = select_grid((h, w), tile, max_tiles=max_tiles, min_tiles=min_tiles, rule="aspect")
        assert got == (rows, cols), (h, w)


def test_the_crop_plans_the_same_grid():
    dcm = DualPerspectiveCrop(grid="auto", tile_size=448, max_tiles=12, auto_rule="aspect")
    for h, w in _sizes(300, seed=1):
        cols, rows = get_optimal_tiled_canvas((h, w), (448, 448), 1, 12)
        assert dcm.plan((h, w)).grid == (rows, cols)
