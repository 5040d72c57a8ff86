"""The ``minicpm_v`` recipe and :mod:`hrperc.ops.slices` against transformers' MiniCPM-V (``minicpmv4_6``; 4.7 has
the same image processor): the slice grid, source and slice sizes and token counts equal to the image
processor's own methods over thousands of sizes, the processor's text on real images."""

from __future__ import annotations

import math
import random

import pytest
import torch
from _messages import FIX, raises_naming

tf = pytest.importorskip("transformers")

from _minicpm_tiny import build_minicpm  # noqa: E402

from hrperc.ops import slices  # noqa: E402

IP = tf.MiniCPMV4_6ImageProcessor()


def _sweep(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """Tiny, thin, huge, exact multiples of the slice side and of the merged patch, and random sizes."""
    rng = random.Random(seed)
    sizes = [(1, 1), (1, 5000), (5000, 1), (2, 3), (448, 448), (449, 448), (896, 448), (1344, 1344), (56, 56)]
    sizes += [(448 * a, 448 * b) for a in range(1, 5) for b in range(1, 5)]
    sizes += [(56 * a + d, 56 * b) for a in (1, 7, 8, 9, 20) for b in (1, 8, 16) for d in (-1, 0, 1)]
    sizes += [(rng.randint(1, 4000), rng.randint(1, 4000)) for _ in range(n)]
    sizes += [(rng.randint(1, 60), rng.randint(1, 6000)) for _ in range(n // 4)]  # thin
    return sizes


def _reference(size, *, scale=448, max_slices=9, patch=14, mode="16x", slice_mode=True):
    """The image processor's steps (its own methods), as ``_preprocess`` calls them."""
    grid = IP.get_sliced_grid(size, max_slices, scale) if slice_mode else None
    source = IP.find_best_resize(size, scale, patch, downsample_mode=mode, allow_upscale=grid is None)
    if grid is None:
        return source, None, None
    refine = IP.get_refine_size(size, grid, scale, patch, downsample_mode=mode, allow_upscale=True)
    return source, tuple(grid), tuple(refine)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"downsample_mode": "4x"},
        {"max_slice_nums": 4, "scale_resolution": 336},
        {"max_slice_nums": 1},
        {"slice_mode": False},
        {"patch_size": 16, "scale_resolution": 512},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults",
)
def test_slice_plan_equals_the_image_processor_over_thousands_of_sizes(options):
    ref_kw = {
        "scale": options.get("scale_resolution", 448),
        "max_slices": options.get("max_slice_nums", 9),
        "patch": options.get("patch_size", 14),
        "mode": options.get("downsample_mode", "16x"),
        "slice_mode": options.get("slice_mode", True),
    }
    divisor = 16 if ref_kw["mode"] == "16x" else 4
    p = ref_kw["patch"]
    sizes = _sweep(1500 if not options else 400)
    for size in sizes:
        plan = slices.slice_plan(size, **options)
        source, grid, refine = _reference(size, **ref_kw)
        assert (plan.source, plan.grid, plan.refine) == (tuple(source), grid, refine), size
        tokens = (source[0] // p) * (source[1] // p) // divisor
        if grid is not None:
            cut = (refine[0] // grid[0], refine[1] // grid[1])
            assert plan.slice == cut and cut[0] * grid[0] == refine[0] and cut[1] * grid[1] == refine[1], size
            tokens += grid[0] * grid[1] * ((cut[0] // p) * (cut[1] // p) // divisor)
        assert plan.image_tokens == tokens == slices.num_image_tokens(size, **options), size


def test_the_released_defaults_and_the_edge_rules():
    assert (slices.MINICPM_V_SCALE_RESOLUTION, slices.MINICPM_V_MAX_SLICE_NUMS) == (
        IP.scale_resolution,
        IP.max_slice_nums,
    )
    assert slices.MINICPM_V_PATCH_SIZE == IP.patch_size
    assert slices.slice_plan((448, 448)).grid is None  # exactly one slice's area: the source alone
    assert slices.slice_plan((449, 448)).grid == (2, 1)  # a pixel more: two slices, the taller split on a tie
    assert slices.slice_plan((4000, 4000)).grid == (3, 3)  # the budget caps the count
    assert slices.slice_plan((1, 1)).source == (448, 448)  # a tiny image is scaled up to the slice area
    plan = slices.slice_plan((500, 900))
    assert plan.num_tokens == plan.image_tokens + 2 + 2 * 2 + 0  # <image></image>, a pair per slice, one row


@pytest.mark.parametrize(
    ("options", "fragments"),
    [
        ({"downsample_mode": "8x"}, ("downsample_mode='8x'", "'16x'", "'4x'")),
        ({"max_slice_nums": 0}, ("max_slice_nums=0", ">= 1")),
        ({"scale_resolution": 44.8}, ("scale_resolution=44.8", "int")),
        ({"slice_mode": "yes"}, ("slice_mode='yes'",)),
    ],
)
def test_slice_plan_refuses_options_outside_the_processor_s_ranges(options, fragments):
    with raises_naming((ValueError, TypeError), *fragments, FIX):
        slices.slice_plan((500, 900), **options)
    with raises_naming((ValueError, TypeError), "image_size", "(0, 5)"):
        slices.slice_plan((0, 5))


# --- the processor's text on real images --------------------------------------------------------------------
# sliced 1 x 2, 2 x 1, 3 x 3 (capped), 1 x 3; the source alone; the area's edge; a pixel; thin both ways
TEXT_SIZES = [(500, 900), (900, 500), (1000, 1000), (300, 950), (40, 60), (448, 448), (449, 448), (1, 1), (30, 1400)]
TEXT_SIZES += [(1200, 60), (333, 777), (640, 480)]


def _expansion(proc, size):
    img = torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ids = proc(images=[img], text=["<unk>"], return_tensors="pt", use_image_id=False)["input_ids"][0].tolist()
    return [proc.tokenizer.convert_ids_to_tokens(i) for i in ids]


@pytest.fixture(scope="module")
def processor():
    return build_minicpm("4_6")[1]


@pytest.mark.parametrize("size", TEXT_SIZES)
def test_counts_equal_the_real_processor_s_text(processor, size):
    tokens = _expansion(processor, size)
    assert tokens.count("<unk>") == slices.num_image_tokens(size)
    assert len(tokens) == slices.num_tokens(size)  # every token the processor writes for the image
    plan = slices.slice_plan(size)
    rows = 0 if plan.grid is None else plan.grid[0]
    assert (tokens.count("<slice>"), tokens.count("\n")) == (plan.num_slices, max(rows - 1, 0))
    assert math.prod(plan.source_map) == tokens.index("</image>") - 1
