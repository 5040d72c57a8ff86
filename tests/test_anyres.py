"""LLaVA-NeXT's anyres geometry against transformers' own code, over thousands of image sizes."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from hrperc.ops.anyres import (
    LLAVA_NEXT_PINPOINTS,
    ONEVISION_PINPOINTS,
    num_tokens,
    resized_size,
    select_resolution,
    unpadded_shape,
)

transformers = pytest.importorskip("transformers")
from transformers.image_processing_utils import get_patch_output_size, select_best_resolution  # noqa: E402
from transformers.models.llava_next.modeling_llava_next import unpad_image  # noqa: E402

PINPOINTS = [list(p) for p in LLAVA_NEXT_PINPOINTS]


def _sizes(n=2500, seed=0):
    """Sizes under one tile, ordinary, extreme aspect ratios (1:20, 20:1), above the largest pinpoint, ties."""
    rng = random.Random(seed)
    out = {(h, w) for h in range(1, 336, 23) for w in range(1, 336, 29)}  # under one tile: every canvas ties
    out |= {(s, 20 * s) for s in range(1, 120, 7)} | {(20 * s, s) for s in range(1, 120, 7)}
    out |= {(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008), (1009, 337), (2000, 3000), (5000, 400)}
    while len(out) < n:
        out.add((rng.randint(1, 4000), rng.randint(1, 4000)))
    return sorted(out)


def _processor():
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    proc = object.__new__(LlavaNextProcessor)  # the counting code only, without a tokenizer
    proc.image_processor = LlavaNextImageProcessor()
    proc.patch_size, proc.num_additional_image_tokens, proc.vision_feature_select_strategy = 14, 1, "default"
    assert proc.image_processor.image_grid_pinpoints == PINPOINTS
    return proc


def _original_select(original_size_wh, possible_resolutions):
    """LLaVA-1.6's select_best_resolution (llava/mm_utils.py), transcribed: everything read as (width, height)."""
    original_width, original_height = original_size_wh
    best_fit, max_effective, min_wasted = None, 0, float("inf")
    for width, height in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        down_w, down_h = int(original_width * scale), int(original_height * scale)
        effective = min(down_w * down_h, original_width * original_height)
        wasted = width * height - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted, best_fit = effective, wasted, (width, height)
    return best_fit


def test_select_resolution_equals_both_references():
    for h, w in _sizes():
        assert select_resolution((h, w)) == tuple(select_best_resolution((h, w), PINPOINTS)), (h, w)
        bw, bh = _original_select((w, h), PINPOINTS)
        assert select_resolution((h, w), tie_break="original") == (bh, bw), (h, w)


def test_the_two_readings_differ_exactly_on_ties_of_small_images():
    small = [(h, w) for h in range(1, 336, 11) for w in range(1, 336, 13)]
    differ = [s for s in small if select_resolution(s) != select_resolution(s, tie_break="original")]
    assert len(differ) > 0.8 * len(small)  # nearly every image under one tile on both sides
    big = [(h, w) for h, w in _sizes() if h > 700 and w > 700]
    assert all(select_resolution(s) == select_resolution(s, tie_break="original") for s in big)


def test_num_tokens_equals_the_processor_count_for_every_size():
    proc = _processor()
    for h, w in _sizes():
        expected = proc._get_number_of_features(h, w, 336, 336) - 1  # CLS dropped ("default" strategy)
        assert num_tokens((h, w), tile_size=336, patch_size=14) == expected, (h, w)


def test_resized_size_equals_get_patch_output_size():
    for h, w in _sizes(800, seed=1):
        canvas = select_resolution((h, w))
        image = np.broadcast_to(np.zeros((1, 1, 1), dtype=np.uint8), (h, w, 3))  # no memory for big sizes
        assert resized_size((h, w), canvas) == tuple(get_patch_output_size(image, canvas, "channels_last"))


def test_unpadded_shape_equals_the_model_unpad_image():
    for h, w in _sizes(800, seed=2):
        ch, cw = select_resolution((h, w))
        rows, cols = ch // 336 * 24, cw // 336 * 24
        features = torch.zeros(1, 1, 1).expand(1, rows, cols)
        assert unpadded_shape((h, w), (rows, cols)) == tuple(unpad_image(features, (h, w)).shape[1:]), (h, w)


def test_bad_arguments_name_the_value_and_the_fix():
    with pytest.raises(ValueError) as err:
        select_resolution((100, 100), tie_break="width_first")
    assert "tie_break='width_first'" in str(err.value) and "'original'" in str(err.value)
    with pytest.raises(ValueError) as err:
        select_resolution((100, 100), [])
    assert "resolutions" in str(err.value)
    # Every canvas keeps 0 pixels (the short side scales below one pixel): the first one, as the reference does.
    assert select_resolution((1, 100000)) == tuple(select_best_resolution((1, 100000), PINPOINTS)) == (336, 672)


def _onevision_processor():
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor

    proc = object.__new__(LlavaOnevisionProcessor)  # the counting code only, without a tokenizer
    proc.image_processor = LlavaOnevisionImageProcessor()
    proc.num_image_tokens, proc.vision_aspect_ratio, proc.vision_feature_select_strategy = 729, "anyres_max_9", "full"
    assert [tuple(p) for p in proc.image_processor.image_grid_pinpoints] == list(ONEVISION_PINPOINTS)
    return proc


def test_onevision_num_tokens_equals_the_processor_count_for_every_size():
    proc = _onevision_processor()
    shrunk = 0
    for h, w in _sizes(2500, seed=3) + [(4000, 4000), (2304, 2304), (6000, 300), (300, 6000)]:
        expected = proc._get_number_of_features(h, w, 384, 384)
        got = num_tokens((h, w), ONEVISION_PINPOINTS, tile_size=384, patch_size=14, max_tiles=9)
        assert got == expected, (h, w)
        plain = num_tokens((h, w), ONEVISION_PINPOINTS, tile_size=384, patch_size=14)
        shrunk += got < plain
    assert shrunk > 100  # the cap is exercised, not only the LLaVA-NeXT path


def test_shrunk_shape_is_what_the_model_interpolates_to():
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    # pack_image_features: unpad, then interpolate to (rows // ratio, cols // ratio) when ratio > 1.1.
    model = object.__new__(LlavaOnevisionModel)
    torch.nn.Module.__init__(model)
    model.config = transformers.LlavaOnevisionConfig()
    model.config.vision_config.image_size, model.config.vision_config.patch_size = 384, 14
    model.config.image_grid_pinpoints = [list(p) for p in ONEVISION_PINPOINTS]
    for h, w in [(3000, 2000), (2304, 2304), (400, 3000), (500, 500), (1200, 1700)]:
        ch, cw = select_resolution((h, w), ONEVISION_PINPOINTS)
        n = (ch // 384) * (cw // 384)
        feats = [torch.zeros(1 + n, 27 * 27, 1)]
        packed, lengths = model.pack_image_features(feats, torch.tensor([[h, w]]), image_newline=None)
        expected = num_tokens((h, w), ONEVISION_PINPOINTS, tile_size=384, patch_size=14, max_tiles=9, newline=False)
        assert torch.as_tensor(lengths).tolist() == [expected], (h, w)
