"""Gemma 3's "pan and scan": the crops of an elongated image and its token count, as pure functions of its size.

Computed exactly as transformers' ``Gemma3ImageProcessor`` (``pan_and_scan_batched``, the torchvision backend)
and ``Gemma3ImageProcessorPil`` (``pan_and_scan``) compute them -- the same float expressions, so the same
rounding -- and as ``Gemma3Processor`` counts the image tokens::

    image (H, W), landscape (W >= H; a portrait image is the same with the sides swapped)
      W / H < min_ratio_to_activate                                  --> no crops
      n = floor(W / H + 0.5)                     (crops close to the aspect ratio, half rounded up)
      n = min(n, floor(W / min_crop_size)), then clamped to [2, max_num_crops] (in that order)
      crop = (H, ceil(W / n)); crops at left = 0, crop, 2 crop, ... (the last one cut at the border)
      min(crop) < min_crop_size                                      --> no crops

Every image is resized to the tower's square (the original first, then its crops, left to right / top to
bottom), and each of them stands for ``mm_tokens_per_image`` image tokens in the text: ``mm_tokens_per_image
* (1 + crops)`` tokens (:func:`gemma3_num_tokens`).

transformers' defaults (``Gemma3Processor``'s ``images_kwargs``, the released checkpoints'):
``do_pan_and_scan=False``, ``pan_and_scan_min_crop_size=256``, ``pan_and_scan_max_num_crops=4``,
``pan_and_scan_min_ratio_to_activate=1.2``. The options are checked once (:func:`check_pan_and_scan`):
integers >= 1 for the crop size and the crop budget (transformers divides by the first and makes no crop
of a budget of 0), a finite ratio. One case transformers cannot cut is refused by name: a small crop size
and a large budget can place the last crop past the image (``(1, 7)`` with ``min_crop_size=1``,
``max_num_crops=5``: crops of 2 pixels at 0, 2, 4, 6, 8), an empty crop its resize fails on.

Example::

    >>> from hrperc.ops.pan_and_scan import pan_and_scan_grid, pan_and_scan_crops, gemma3_num_tokens
    >>> pan_and_scan_grid((600, 1600)), pan_and_scan_crops((600, 1600))          # (rows, cols), (top, left, h, w)
    ((1, 3), ((0, 0, 600, 534), (0, 534, 600, 534), (0, 1068, 600, 532)))
    >>> pan_and_scan_grid((300, 320)), pan_and_scan_grid((200, 2000))    # too square; crops under 256 px
    ((0, 0), (0, 0))
    >>> gemma3_num_tokens((600, 1600)), gemma3_num_tokens((600, 1600), do_pan_and_scan=True)
    (256, 1024)
"""

from __future__ import annotations

import math
import numbers

from .._errors import public
from .._validation import as_bool, as_image_size, as_int

__all__ = [
    "MIN_CROP_SIZE",
    "MAX_NUM_CROPS",
    "MIN_RATIO_TO_ACTIVATE",
    "MM_TOKENS_PER_IMAGE",
    "check_pan_and_scan",
    "pan_and_scan_grid",
    "pan_and_scan_crops",
    "gemma3_num_crops",
    "gemma3_num_tokens",
]

#: ``Gemma3Processor``'s defaults (the released checkpoints'), under transformers' names without the prefix.
MIN_CROP_SIZE = 256
MAX_NUM_CROPS = 4
MIN_RATIO_TO_ACTIVATE = 1.2
#: ``Gemma3Config.mm_tokens_per_image``: image tokens per view (16 x 16 pooled from SigLIP's 64 x 64 patches).
MM_TOKENS_PER_IMAGE = 256


def check_pan_and_scan(min_crop_size, max_num_crops, min_ratio_to_activate) -> tuple[int, int, float]:
    """The pan-and-scan options checked (named as transformers names them), as ``(int, int, float)``."""
    size = as_int(min_crop_size, "pan_and_scan_min_crop_size", example=f"pan_and_scan_min_crop_size={MIN_CROP_SIZE}")
    crops = as_int(max_num_crops, "pan_and_scan_max_num_crops", example=f"pan_and_scan_max_num_crops={MAX_NUM_CROPS}")
    ratio = min_ratio_to_activate
    rule = "the aspect ratio, long side over short side, from which an image is cropped"
    fix = f"Pass e.g. pan_and_scan_min_ratio_to_activate={MIN_RATIO_TO_ACTIVATE}."
    if not isinstance(ratio, numbers.Real) or isinstance(ratio, bool):
        raise TypeError(
            f"pan_and_scan_min_ratio_to_activate={ratio!r} is a {type(ratio).__name__}; it must be a number ({rule}). "
            f"{fix}"
        )
    if not math.isfinite(float(ratio)):
        raise ValueError(f"pan_and_scan_min_ratio_to_activate={ratio!r}; it must be finite ({rule}). {fix}")
    return size, crops, float(ratio)


def _grid(H: int, W: int, min_crop_size: int, max_num_crops: int, min_ratio: float) -> tuple[int, int]:
    # transformers' expressions, in its order: the same floats give the same rounding.
    if W >= H:
        if W / H < min_ratio:
            return 0, 0
        n = int(math.floor(W / H + 0.5))
        n = min(int(math.floor(W / min_crop_size)), n)
        n = min(max_num_crops, max(2, n))
        rows, cols = 1, n
    else:
        if H / W < min_ratio:
            return 0, 0
        n = int(math.floor(H / W + 0.5))
        n = min(int(math.floor(H / min_crop_size)), n)
        n = min(max_num_crops, max(2, n))
        rows, cols = n, 1
    if min(int(math.ceil(W / cols)), int(math.ceil(H / rows))) < min_crop_size:
        return 0, 0
    return rows, cols


@public
def pan_and_scan_grid(
    image_size,
    *,
    min_crop_size: int = MIN_CROP_SIZE,
    max_num_crops: int = MAX_NUM_CROPS,
    min_ratio_to_activate: float = MIN_RATIO_TO_ACTIVATE,
) -> tuple[int, int]:
    """``(rows, cols)`` of the pan-and-scan crops of an ``(H, W)`` image (one of them 1); ``(0, 0)``: no crops.

    A grid whose last crop would start past the image (an empty crop, which transformers' resize fails on) is
    refused, naming the size and the options that make it.
    """
    H, W = as_image_size(image_size)
    size, crops, ratio = check_pan_and_scan(min_crop_size, max_num_crops, min_ratio_to_activate)
    rows, cols = _grid(H, W, size, crops, ratio)
    if rows and ((rows - 1) * int(math.ceil(H / rows)) >= H or (cols - 1) * int(math.ceil(W / cols)) >= W):
        raise ValueError(
            f"image_size={(H, W)} with pan_and_scan_min_crop_size={size}, pan_and_scan_max_num_crops={crops}: "
            f"the {rows} x {cols} crops of {int(math.ceil(H / rows))} x {int(math.ceil(W / cols))} px would leave the "
            f"last one empty (past the image), which transformers' processor fails on. Pass a larger "
            f"pan_and_scan_min_crop_size (the released {MIN_CROP_SIZE}) or a smaller pan_and_scan_max_num_crops."
        )
    return rows, cols


@public
def pan_and_scan_crops(
    image_size,
    *,
    min_crop_size: int = MIN_CROP_SIZE,
    max_num_crops: int = MAX_NUM_CROPS,
    min_ratio_to_activate: float = MIN_RATIO_TO_ACTIVATE,
) -> tuple[tuple[int, int, int, int], ...]:
    """The crops of an ``(H, W)`` image as ``(top, left, height, width)`` boxes, in the processor's order
    (row-major); the last one is cut at the image's border. ``()``: no crops."""
    H, W = as_image_size(image_size)
    rows, cols = pan_and_scan_grid(
        (H, W), min_crop_size=min_crop_size, max_num_crops=max_num_crops, min_ratio_to_activate=min_ratio_to_activate
    )
    if not rows:
        return ()
    ch, cw = int(math.ceil(H / rows)), int(math.ceil(W / cols))
    return tuple((r * ch, c * cw, min(ch, H - r * ch), min(cw, W - c * cw)) for r in range(rows) for c in range(cols))


@public
def gemma3_num_crops(
    image_size,
    *,
    do_pan_and_scan: bool = False,
    min_crop_size: int = MIN_CROP_SIZE,
    max_num_crops: int = MAX_NUM_CROPS,
    min_ratio_to_activate: float = MIN_RATIO_TO_ACTIVATE,
) -> int:
    """The processor's ``num_crops`` of an ``(H, W)`` image: 0 without pan and scan."""
    H, W = as_image_size(image_size)
    if not as_bool(do_pan_and_scan, "do_pan_and_scan"):
        return 0
    rows, cols = pan_and_scan_grid(
        (H, W), min_crop_size=min_crop_size, max_num_crops=max_num_crops, min_ratio_to_activate=min_ratio_to_activate
    )
    return rows * cols


@public
def gemma3_num_tokens(
    image_size,
    *,
    do_pan_and_scan: bool = False,
    min_crop_size: int = MIN_CROP_SIZE,
    max_num_crops: int = MAX_NUM_CROPS,
    min_ratio_to_activate: float = MIN_RATIO_TO_ACTIVATE,
    mm_tokens_per_image: int = MM_TOKENS_PER_IMAGE,
) -> int:
    """The image tokens (``<image_soft_token>``) ``Gemma3Processor`` writes for an ``(H, W)`` image:
    ``mm_tokens_per_image`` for the image and for each of its crops."""
    per = as_int(mm_tokens_per_image, "mm_tokens_per_image", example=f"mm_tokens_per_image={MM_TOKENS_PER_IMAGE}")
    crops = gemma3_num_crops(
        image_size,
        do_pan_and_scan=do_pan_and_scan,
        min_crop_size=min_crop_size,
        max_num_crops=max_num_crops,
        min_ratio_to_activate=min_ratio_to_activate,
    )
    return per * (1 + crops)
