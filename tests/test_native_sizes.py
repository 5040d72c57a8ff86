"""``hrperc.ops.native``: the Qwen and Pixtral resized sizes, grids and token counts equal transformers' over
thousands of sizes per budget (tiny, thin 1:50 and 50:1, the budget's edges, above the maximum, random large),
equal what the real processors write in the text, and the official readings (qwen-vl-utils, mistral_common)
equal literal transcriptions of their code, with the documented differences from transformers.
"""

from __future__ import annotations

import functools
import math
import random
import re

import numpy as np
import pytest
import torch

tf = pytest.importorskip("transformers")

from _hf_tiny import word_tokenizer  # noqa: E402
from _messages import FIX, raises_naming  # noqa: E402
from transformers.models.pixtral.image_processing_pixtral import get_resize_output_image_size  # noqa: E402
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize  # noqa: E402

from hrperc.ops.native import (  # noqa: E402
    MISTRAL3_LONGEST_EDGE,
    MISTRAL3_MERGE_SIZE,
    MISTRAL3_PATCH_SIZE,
    QWEN2_VL_BUDGET,
    QWEN3_VL_BUDGET,
    QWEN3_VL_PATCH_SIZE,
    QWEN_CLASS_BUDGET,
    pixtral_layout,
    pixtral_num_tokens,
    pixtral_resize,
    qwen_grid,
    qwen_num_tokens,
    qwen_resize,
    qwen_vl_utils_budget,
)


# --- literal transcriptions of the official preprocessing ------------------------------------------
# qwen-vl-utils, QwenLM/Qwen3-VL (commit 004d5e0), qwen-vl-utils/src/qwen_vl_utils/vision_process.py
# (QwenLM/Qwen2-VL and QwenLM/Qwen2.5-VL carry the same smart_resize without the assert).
def round_by_factor(number: int, factor: int) -> int:
    return round(number / factor) * factor


def ceil_by_factor(number: int, factor: int) -> int:
    return math.ceil(number / factor) * factor


def floor_by_factor(number: int, factor: int) -> int:
    return math.floor(number / factor) * factor


def qwen_vl_utils_smart_resize(height, width, factor, min_pixels=None, max_pixels=None):
    max_pixels = max_pixels if max_pixels is not None else (16384 * factor**2)
    min_pixels = min_pixels if min_pixels is not None else (4 * factor**2)
    assert max_pixels >= min_pixels, "The max_pixels of image must be greater than or equal to min_pixels."
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}"
        )
    h_bar = max(factor, round_by_factor(height, factor))
    w_bar = max(factor, round_by_factor(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = floor_by_factor(height / beta, factor)
        w_bar = floor_by_factor(width / beta, factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = ceil_by_factor(height * beta, factor)
        w_bar = ceil_by_factor(width * beta, factor)
    return h_bar, w_bar


# mistral_common, mistralai/mistral-common, src/mistral_common/tokens/tokenizers/image.py:
# ImageEncoder._image_to_num_tokens and the new_image_size / asserts of ImageEncoder.__call__.
def mistral_common_size(height, width, max_image_size, image_patch_size, spatial_merge_size):
    w, h = width, height
    ratio = max(h / max_image_size, w / max_image_size)
    if ratio > 1:
        w = round(w / ratio)
        h = round(h / ratio)
    width_tokens = (w - 1) // (image_patch_size * spatial_merge_size) + 1
    height_tokens = (h - 1) // (image_patch_size * spatial_merge_size) + 1
    assert width_tokens > 0
    assert height_tokens > 0
    new_image_size = (
        width_tokens * image_patch_size * spatial_merge_size,
        height_tokens * image_patch_size * spatial_merge_size,
    )
    return new_image_size[1], new_image_size[0]  # (H, W) as hrperc spells sizes


# --- the sizes scanned ------------------------------------------------------------------------------
def _small_grid(n=80):
    return [(h, w) for h in range(1, n + 1) for w in range(1, n + 1)]


def _thin(n=60):
    return [s for k in range(1, n + 1) for s in ((k, 50 * k), (50 * k, k))]


def _ratio_limit():
    """Sizes at the aspect-ratio limit of 200, on both sides of it (refused above)."""
    return [s for k in range(1, 11) for s in ((k, 200 * k), (k, 200 * k + 1), (200 * k + 1, k), (200 * k, k))]


def _area_edges(area, factor):
    """Sizes whose area, or whose rounded area, is at ``area``: around ``sqrt(area)`` at a few aspect ratios,
    and around the multiples of ``factor`` whose product brackets ``area`` (the rounding's half-way points)."""
    out = []
    for a in (1.0, 4 / 3, 3 / 4, 2.0, 0.5, 16 / 9, 9 / 16, 10.0, 0.1, 50.0, 0.02):
        h0, w0 = math.sqrt(area / a), math.sqrt(area * a)
        out += [(round(h0) + dh, round(w0) + dw) for dh in range(-2, 3) for dw in range(-2, 3)]
    half = factor // 2
    offsets = (-half - 1, -half, -half + 1, 0, half - 1, half, half + 1)
    for k in (1, 2, 3, 5, 8, 13, 21, 34, 55):
        m = area // (k * factor * factor)
        for mm in (m, m + 1):
            for kk, mmm in ((k, mm), (mm, k)):
                if kk < 1 or mmm < 1:
                    continue
                out += [(kk * factor + dh, mmm * factor + dw) for dh in offsets for dw in offsets]
    return [(h, w) for h, w in out if h >= 1 and w >= 1]


def _random_sizes(seed, n, lo_area=1, hi_area=1e8, max_ratio=60.0):
    """``n`` sizes with log-uniform area and aspect ratio (fixed seed)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        area = math.exp(rng.uniform(math.log(lo_area), math.log(hi_area)))
        aspect = math.exp(rng.uniform(-math.log(max_ratio), math.log(max_ratio)))
        out.append((max(1, round(math.sqrt(area / aspect))), max(1, round(math.sqrt(area * aspect)))))
    return out


def qwen_sizes(factor, min_pixels, max_pixels, seed=0):
    sizes = _small_grid() + _thin() + _ratio_limit()
    sizes += _area_edges(min_pixels, factor) + _area_edges(max_pixels, factor)
    sizes += _random_sizes(seed, 600, max_pixels, 50 * max_pixels)  # above the maximum
    sizes += _random_sizes(seed + 1, 2000, 1, 4e7, max_ratio=300.0)  # anything, refusals included
    return sorted(set(sizes))


# (patch_size, min_pixels, max_pixels): class defaults, checkpoints, qwen-vl-utils', and small budgets where the
# max and min branches are frequent (the last is small enough for qwen-vl-utils' max branch to floor to 0).
QWEN_BUDGETS = {
    "qwen2-class": (14, *QWEN_CLASS_BUDGET),
    "qwen2-checkpoint": (14, *QWEN2_VL_BUDGET),
    "qwen2-small": (14, 56 * 56, 28 * 28 * 64),
    "qwen2-narrow": (14, 28 * 28 * 30, 28 * 28 * 40),
    "qwen2-tiny": (14, 28 * 28, 28 * 28 * 4),
    "qwen3-class": (16, *QWEN_CLASS_BUDGET),
    "qwen3-checkpoint": (16, *QWEN3_VL_BUDGET),
    "qwen3-utils": (16, *qwen_vl_utils_budget(16)),
    "qwen3-small": (16, 64 * 64, 32 * 32 * 64),
}


@functools.cache
def _hf_qwen(h, w, factor, lo, hi):
    return _outcome(hf_smart_resize, h, w, factor, min_pixels=lo, max_pixels=hi)


def _outcome(fn, *args, **kwargs):
    """``fn``'s result, or the exception class it raised."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, AssertionError) as err:
        return type(err)


@pytest.mark.parametrize("case", list(QWEN_BUDGETS))
def test_qwen_resize_equals_transformers_smart_resize(case):
    patch, lo, hi = QWEN_BUDGETS[case]
    factor = 2 * patch
    processor = tf.Qwen2VLImageProcessor(patch_size=patch, merge_size=2, size={"shortest_edge": lo, "longest_edge": hi})
    budget = dict(patch_size=patch, min_pixels=lo, max_pixels=hi)
    sizes = qwen_sizes(factor, lo, hi)
    assert len(sizes) > 8000
    refused = 0
    for i, (h, w) in enumerate(sizes):
        ref = _hf_qwen(h, w, factor, lo, hi)
        mine = _outcome(qwen_resize, (h, w), **budget)
        assert mine == ref, ((h, w), mine, ref)
        if ref is ValueError:
            refused += 1
            continue
        patches = processor.get_number_of_image_patches(h, w)  # what vLLM asks
        assert qwen_num_tokens((h, w), **budget) * 4 == patches == (ref[0] // patch) * (ref[1] // patch)
        if i % 8 == 0:  # the grid is the same division; a sample of it keeps the file fast
            assert qwen_grid((h, w), **budget) == (ref[0] // patch, ref[1] // patch)
    assert 0 < refused < len(sizes) // 4  # the ratio limit was crossed, and mostly not


@pytest.mark.parametrize("case", list(QWEN_BUDGETS))
def test_qwen_vl_utils_reading_equals_its_code_and_differs_where_documented(case):
    patch, lo, hi = QWEN_BUDGETS[case]
    factor = 2 * patch
    budget = dict(patch_size=patch, min_pixels=lo, max_pixels=hi)
    differ = 0
    for h, w in qwen_sizes(factor, lo, hi):
        ref = _outcome(qwen_vl_utils_smart_resize, h, w, factor, lo, hi)
        mine = _outcome(qwen_resize, (h, w), **budget, reading="qwen-vl-utils")
        floored_to_zero = isinstance(ref, tuple) and min(ref) == 0
        assert mine == (ValueError if floored_to_zero else ref), ((h, w), mine, ref)
        hf = _hf_qwen(h, w, factor, lo, hi)
        if mine != hf:
            differ += 1
            # the two documented places: a side rounding to 0 (<= factor/2), or qwen-vl-utils' max branch at 0
            assert round(min(h, w) / factor) == 0 or floored_to_zero, ((h, w), mine, hf)
    if case in ("qwen2-checkpoint", "qwen2-class", "qwen2-small", "qwen2-tiny", "qwen3-utils"):
        assert differ > 0


def test_qwen_documented_differences():
    # a side <= factor/2: transformers' min branch vs qwen-vl-utils' clamp (Qwen2 checkpoint budget, the same
    # numbers as qwen-vl-utils' own)
    lo, hi = QWEN2_VL_BUDGET
    assert qwen_vl_utils_budget() == QWEN2_VL_BUDGET
    assert qwen_resize((10, 500), min_pixels=lo, max_pixels=hi) == (28, 420) == hf_smart_resize(10, 500, 28, lo, hi)
    assert qwen_resize((10, 500), reading="qwen-vl-utils") == (28, 504) == qwen_vl_utils_smart_resize(10, 500, 28)
    assert qwen_grid((10, 500), min_pixels=lo, max_pixels=hi) == (2, 30)
    assert qwen_grid((10, 500), reading="qwen-vl-utils") == (2, 36)
    # Qwen3: the checkpoint's minimum is 16x qwen-vl-utils'
    assert qwen_vl_utils_budget(QWEN3_VL_PATCH_SIZE) == (4096, QWEN3_VL_BUDGET[1])
    q3 = dict(patch_size=QWEN3_VL_PATCH_SIZE)
    assert qwen_resize((200, 200), **q3, min_pixels=QWEN3_VL_BUDGET[0], max_pixels=QWEN3_VL_BUDGET[1]) == (256, 256)
    assert qwen_resize((200, 200), **q3, reading="qwen-vl-utils") == (192, 192)
    assert qwen_num_tokens((200, 200), **q3, min_pixels=QWEN3_VL_BUDGET[0], max_pixels=QWEN3_VL_BUDGET[1]) == 64
    assert qwen_num_tokens((200, 200), **q3, reading="qwen-vl-utils") == 36
    # the class default is not the checkpoints' maximum
    assert QWEN_CLASS_BUDGET == (3136, 1003520) and QWEN2_VL_BUDGET[1] == 16384 * 28 * 28
    assert qwen_resize((4000, 6000)) != qwen_resize((4000, 6000), min_pixels=lo, max_pixels=hi)
    # each reading defaults to its own budget
    assert qwen_resize((4000, 6000)) == hf_smart_resize(4000, 6000)
    assert qwen_resize((4000, 6000), reading="qwen-vl-utils") == qwen_vl_utils_smart_resize(4000, 6000, 28)
    # tiny images are scaled up by transformers, not refused
    assert qwen_resize((1, 1)) == (56, 56) and qwen_grid((3, 500)) == (2, 52)


# --- the real processors' text expansion -------------------------------------------------------------
QWEN_SPECIALS = ["<pad>", "<unk>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
PIXTRAL_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]


def _images(sizes):
    return [torch.zeros(3, h, w, dtype=torch.uint8) for h, w in sizes]


def _processor_sizes(seed, n, max_side, extra, max_area=160_000):
    """``n`` sizes for real images: ``extra`` then random sides up to ``max_side``, the second side cut so
    that no image has more than ``max_area`` pixels (the processors' time goes into resizing pixels)."""
    rng = random.Random(seed)
    sizes = []
    for _ in range(n - len(extra)):
        h = rng.randint(1, max_side)
        sizes.append((h, rng.randint(1, min(max_side, max(1, max_area // h)))))
    return [s for s in extra + sizes if max(s) / min(s) <= 200]


QWEN_PROCESSORS = {
    # family: (processor class, video processor class, patch, budgets (min_pixels, max_pixels))
    "qwen2_vl": ("Qwen2VLProcessor", "Qwen2VLVideoProcessor", 14, [(56 * 56, 28 * 28 * 64), QWEN2_VL_BUDGET]),
    "qwen2_5_vl": ("Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor", 14, [QWEN_CLASS_BUDGET]),
    "qwen3_vl": ("Qwen3VLProcessor", "Qwen3VLVideoProcessor", 16, [(64 * 64, 32 * 32 * 64), QWEN3_VL_BUDGET]),
}


@pytest.mark.parametrize("family", list(QWEN_PROCESSORS))
def test_qwen_token_count_equals_the_processors_expansion(family):
    proc_cls, video_cls, patch, budgets = QWEN_PROCESSORS[family]
    tok = word_tokenizer(QWEN_SPECIALS)
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    for i, (lo, hi) in enumerate(budgets):
        ip = tf.Qwen2VLImageProcessor(patch_size=patch, merge_size=2, size={"shortest_edge": lo, "longest_edge": hi})
        proc = getattr(tf, proc_cls)(
            image_processor=ip, tokenizer=tok, video_processor=getattr(tf, video_cls)(patch_size=patch)
        )
        sizes = _processor_sizes(i, 30, 600, [(1, 1), (3, 500), (10, 500), (500, 10), (2 * patch, 2 * patch)])
        text = ["<|vision_start|><|image_pad|><|vision_end|> describe it"] * len(sizes)
        out = proc(images=_images(sizes), text=text, return_tensors="pt", padding=True)
        counts = (out["input_ids"] == pad).sum(1).tolist()
        budget = dict(patch_size=patch, min_pixels=lo, max_pixels=hi)
        assert counts == [qwen_num_tokens(s, **budget) for s in sizes]
        assert out["image_grid_thw"][:, 1:].tolist() == [list(qwen_grid(s, **budget)) for s in sizes]


# --- Pixtral -----------------------------------------------------------------------------------------
# (longest_edge, patch_size, merge_size): Pixtral-12B, Mistral 3, and small edges where most sizes are scaled down
PIXTRAL_CASES = [
    (1024, 16, 1),
    (MISTRAL3_LONGEST_EDGE, MISTRAL3_PATCH_SIZE, MISTRAL3_MERGE_SIZE),
    (64, 16, 1),
    (100, 14, 2),
    (224, 14, 2),
    (30, 16, 1),
]


def pixtral_sizes(edge, seed=0):
    sizes = _small_grid() + _thin()
    sizes += [(edge + dh, s) for dh in range(-2, 3) for s in (1, 7, 16, 100, edge // 2, edge, 3 * edge)]
    sizes += [(w, h) for h, w in sizes]
    sizes += _random_sizes(seed, 1500, edge * edge, 100 * edge * edge)  # scaled down
    sizes += _random_sizes(seed + 1, 2000, 1, 2.5e7, max_ratio=3000.0)  # anything, zero sides included
    return sorted(set(sizes))


@functools.cache
def _hf_pixtral(h, w, edge, unit):
    image = np.broadcast_to(np.uint8(0), (3, h, w))  # no memory: only the shape is read
    out = get_resize_output_image_size(
        image, size=(edge, edge), patch_size=(unit, unit), input_data_format="channels_first"
    )
    return tuple(out)


@pytest.mark.parametrize("case", PIXTRAL_CASES, ids=str)
def test_pixtral_resize_equals_transformers(case):
    edge, patch, merge = case
    unit = patch * merge
    opts = dict(longest_edge=edge, patch_size=patch, merge_size=merge)
    sizes = pixtral_sizes(edge)
    assert len(sizes) > 8000
    refused = 0
    for i, (h, w) in enumerate(sizes):
        ref = _hf_pixtral(h, w, edge, unit)
        if min(ref) == 0:  # transformers' resize then fails (with an unclear message): refused here
            refused += 1
            with pytest.raises(ValueError):
                pixtral_resize((h, w), **opts)
            continue
        assert pixtral_resize((h, w), **opts) == ref, ((h, w), ref)
        assert max(ref) <= -(-edge // unit) * unit  # over longest_edge only up to its next multiple of P
        rows, cols = ref[0] // unit, ref[1] // unit
        assert pixtral_num_tokens((h, w), **opts) == rows * (cols + 1)
        if i % 8 == 0:  # the layout is the same division; a sample of it keeps the file fast
            assert pixtral_layout((h, w), **opts) == (rows, cols)
    assert refused > 0


@pytest.mark.parametrize("case", PIXTRAL_CASES, ids=str)
def test_mistral_common_reading_equals_its_code_and_differs_where_documented(case):
    edge, patch, merge = case
    unit = patch * merge
    opts = dict(longest_edge=edge, patch_size=patch, merge_size=merge)
    differ = 0
    for h, w in pixtral_sizes(edge):
        ref = _outcome(mistral_common_size, h, w, edge, patch, merge)
        mine = _outcome(pixtral_resize, (h, w), **opts, reading="mistral_common")
        assert mine == (ValueError if ref is AssertionError else ref), ((h, w), mine, ref)
        hf = _hf_pixtral(h, w, edge, unit)
        if mine != hf and min(hf) > 0 and mine is not ValueError:
            differ += 1
            # only when scaled down, with floor(x) a multiple of P and round(x) = floor(x) + 1 on a side
            ratio = max(h / edge, w / edge)
            assert ratio > 1
            assert any(
                math.floor(s / ratio) % unit == 0 and round(s / ratio) == math.floor(s / ratio) + 1 for s in (h, w)
            )
    assert differ > 0


def test_pixtral_documented_differences():
    assert pixtral_resize((19, 1149)) == (16, 1024) == _hf_pixtral(19, 1149, 1024, 16)
    assert (
        pixtral_resize((19, 1149), reading="mistral_common") == (32, 1024) == mistral_common_size(19, 1149, 1024, 16, 1)
    )
    assert pixtral_num_tokens((19, 1149)) == 65 and pixtral_num_tokens((19, 1149), reading="mistral_common") == 130
    # never scaled up; rounded up to P = patch * merge
    assert pixtral_resize((1, 1)) == (16, 16) and pixtral_layout((1, 1)) == (1, 1) and pixtral_num_tokens((1, 1)) == 2
    m3 = dict(longest_edge=MISTRAL3_LONGEST_EDGE, patch_size=MISTRAL3_PATCH_SIZE, merge_size=MISTRAL3_MERGE_SIZE)
    assert pixtral_resize((29, 29), **m3) == (56, 56) and pixtral_layout((29, 29), **m3) == (2, 2)
    # a side scaling to between 0.5 and 1 px: transformers' floor gives 0 (refused), mistral_common's round 1
    with pytest.raises(ValueError):
        pixtral_resize((1, 1500))
    assert (
        pixtral_resize((1, 1500), reading="mistral_common") == (16, 1024) == mistral_common_size(1, 1500, 1024, 16, 1)
    )


PIXTRAL_PROCESSORS = [(1024, 16, 1), (MISTRAL3_LONGEST_EDGE, MISTRAL3_PATCH_SIZE, MISTRAL3_MERGE_SIZE), (224, 14, 2)]


@pytest.mark.parametrize("case", PIXTRAL_PROCESSORS, ids=str)
def test_pixtral_token_layout_equals_the_processors_expansion(case):
    edge, patch, merge = case
    tok = word_tokenizer(PIXTRAL_SPECIALS)
    ids = [tok.convert_tokens_to_ids(t) for t in ("[IMG]", "[IMG_BREAK]", "[IMG_END]")]
    ip = tf.PixtralImageProcessor(size={"longest_edge": edge}, patch_size={"height": patch, "width": patch})
    proc = tf.PixtralProcessor(image_processor=ip, tokenizer=tok, patch_size=patch, spatial_merge_size=merge)
    extra = [(1, 1), (19, 1149), (1149, 19), (edge, 64), (edge + 1, 3), (patch * merge + 1, 1)]
    sizes = [s for s in _processor_sizes(7, 30, 2 * edge, extra) if min(_hf_pixtral(*s, edge, patch * merge)) > 0]
    opts = dict(longest_edge=edge, patch_size=patch, merge_size=merge)
    for s in sizes:  # one image a call: a batch is padded to its largest image, costing far more than the check
        out = proc(images=_images([s]), text=["[IMG] describe it"], return_tensors="pt")
        assert out["image_sizes"].tolist() == [list(pixtral_resize(s, **opts))]
        n_img, n_brk, n_end = ((out["input_ids"][0] == i).sum().item() for i in ids)
        rows, cols = pixtral_layout(s, **opts)
        assert (n_img, n_brk, n_end) == (rows * cols, rows - 1, 1), s
        assert n_img + n_brk + n_end == pixtral_num_tokens(s, **opts)


# --- refusals ----------------------------------------------------------------------------------------
def test_qwen_refusals_name_the_value_and_the_fix():
    with raises_naming(ValueError, "qwen_resize:", "image_size=(2, 500)", "250", "200", FIX):
        qwen_resize((2, 500))
    with raises_naming(ValueError, "qwen_num_tokens:", "min_pixels=5000", "max_pixels=4000", FIX):
        qwen_num_tokens((100, 100), min_pixels=5000, max_pixels=4000)
    with raises_naming(ValueError, "max_pixels=2000", "min_pixels", "3136", FIX):  # the default minimum
        qwen_resize((100, 100), max_pixels=2000)
    with raises_naming(ValueError, "qwen_grid:", "max_pixels=500", "784", FIX):
        qwen_grid((100, 100), min_pixels=1, max_pixels=500)
    with raises_naming(ValueError, "max_pixels=1000", "1024", FIX):  # factor 32 under Qwen3's patch
        qwen_resize((100, 100), patch_size=16, min_pixels=1, max_pixels=1000)
    for option in ("min_pixels", "max_pixels", "patch_size", "merge_size"):
        for bad in (0, -3):
            with raises_naming(ValueError, f"{option}={bad}", FIX):
                qwen_resize((100, 100), **{option: bad})
        with raises_naming(TypeError, f"{option}=3.5", FIX):
            qwen_resize((100, 100), **{option: 3.5})
    for bad in [(10.5, 20), (10.0, 20), (True, 20), "10x20", 10, (10, 20, 3)]:
        with raises_naming(TypeError, "image_size=", FIX):
            qwen_resize(bad)
    with raises_naming(ValueError, "image_size=(0, 20)", FIX):
        qwen_resize((0, 20))
    with raises_naming(ValueError, "reading='hf'", "'transformers'", "'qwen-vl-utils'", FIX):
        qwen_resize((10, 20), reading="hf")
    with raises_naming(TypeError, "reading=None", FIX):
        qwen_resize((10, 20), reading=None)


def test_qwen_vl_utils_zero_side_is_refused_with_a_budget_that_holds_it():
    opts = dict(min_pixels=784, max_pixels=3136, reading="qwen-vl-utils")
    assert min(qwen_vl_utils_smart_resize(20, 3000, 28, 784, 3136)) == 0  # its code returns a 0-pixel side
    assert qwen_resize((20, 3000), min_pixels=784, max_pixels=3136) == (28, 672)  # transformers clamps to 28
    with raises_naming(ValueError, "image_size=(20, 3000)", "max_pixels=3136", "reading='transformers'", FIX) as info:
        qwen_resize((20, 3000), **opts)
    need = int(re.search(r"max_pixels=(\d+) holds", str(info.value)).group(1))
    h, w = qwen_resize((20, 3000), **{**opts, "max_pixels": need})
    assert min(h, w) > 0 and (h, w) == qwen_vl_utils_smart_resize(20, 3000, 28, 784, need)


def test_pixtral_refusals_name_the_value_and_the_fix():
    with raises_naming(ValueError, "pixtral_resize:", "image_size=(1, 100)", "longest_edge=64", FIX) as info:
        pixtral_resize((1, 100), longest_edge=64)
    side = int(re.search(r"short side to at least (\d+) px", str(info.value)).group(1))
    edge = int(re.search(r"longest_edge=(\d+) or more", str(info.value)).group(1))
    assert pixtral_resize((side, 100), longest_edge=64) == _hf_pixtral(side, 100, 64, 16)
    assert min(_hf_pixtral(side - 1, 100, 64, 16)) == 0  # the least padding that works
    assert pixtral_resize((1, 100), longest_edge=edge) == _hf_pixtral(1, 100, edge, 16)
    assert min(_hf_pixtral(1, 100, edge - 1, 16)) == 0
    with raises_naming(ValueError, "pixtral_num_tokens:", "image_size=(3000, 1)", "mistral_common", FIX):
        pixtral_num_tokens((3000, 1), reading="mistral_common")  # round(1024/3000) = 0: mistral_common asserts
    with pytest.raises(AssertionError):
        mistral_common_size(3000, 1, 1024, 16, 1)
    for option in ("longest_edge", "patch_size", "merge_size"):
        with raises_naming(ValueError, f"{option}=0", FIX):
            pixtral_layout((100, 100), **{option: 0})
    with raises_naming(TypeError, "image_size=", FIX):
        pixtral_resize((100.0, 100))
    with raises_naming(ValueError, "reading='round'", "'mistral_common'", FIX):
        pixtral_resize((100, 100), reading="round")


def test_sizes_from_arrays_and_tensors_give_plain_ints():
    for size in [(np.int64(480), np.int64(640)), torch.tensor([480, 640]), torch.Size([480, 640])]:
        out = qwen_resize(size)
        assert out == (476, 644) and all(type(v) is int for v in out)
        assert type(qwen_num_tokens(size)) is int and type(pixtral_num_tokens(size)) is int
