"""LLaVA-NeXT's "anyres" geometry: the best resolution among grid pinpoints, the resized content, the
unpadded feature map, and the token count, exactly as the reference code computes them.

An image of ``(H, W)`` pixels gets a canvas from a list of pinpoint resolutions (LLaVA-NeXT's default
``[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]``, scaled to the tile size): the one
that keeps the most original pixels when the image is scaled into it keeping its aspect ratio, ties
broken by the least wasted canvas, then by list order (:func:`select_resolution`). The image is
resized into the canvas keeping its aspect ratio and centred (:func:`resized_size`), cut into tiles,
and after the ViT the padding rows or columns of the ``(gh*ht, gw*wt)`` feature map are removed
(:func:`unpadded_shape`). The tokens an LLM receives are the base view's ``ht*wt`` plus the unpadded
map's tokens plus one newline slot per unpadded row: :func:`anyres_plan` derives all of it once, as an
:class:`AnyresPlan` (what the ``llava_next`` / ``llava_onevision`` front ends plan with), and
:func:`num_tokens` is its count.

**The two readings of the pinpoints** (``tie_break=``). The original LLaVA-1.6 code reads each pinpoint
as ``(width, height)`` and the image size as ``(width, height)``; transformers reads both as
``(height, width)``. The list holds both orientations of every non-square pinpoint, so the two agree
whenever one candidate wins outright; they differ on ties, which every image smaller than one tile on
both sides produces (every canvas keeps all its pixels, and the two portrait/landscape canvases of the
same area waste the same): transformers then picks the landscape ``336 x 672`` canvas, the original
code the portrait ``672 x 336`` one. ``"transformers"`` (the default) matches
``LlavaNextImageProcessor`` / ``LlavaNextProcessor`` / ``LlavaNextModel``; ``"original"`` matches the
LLaVA-1.6 research code's grid choice (its unpadding is computed here as transformers does, with
``round(., 7)`` before truncation, which can differ from the original's plain truncation only when a
float product lands within 1e-7 of an integer).

Example::

    >>> from hrperc.ops.anyres import LLAVA_NEXT_PINPOINTS, select_resolution, num_tokens
    >>> select_resolution((200, 300), LLAVA_NEXT_PINPOINTS), select_resolution((200, 300), LLAVA_NEXT_PINPOINTS,
    ...                                                                          tie_break="original")
    ((336, 672), (672, 336))
    >>> num_tokens((1000, 800), LLAVA_NEXT_PINPOINTS, tile_size=336, patch_size=14)     # base + unpadded + newlines
    2448
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .._errors import public
from .._validation import as_bool, as_image_size, as_int, as_pair

__all__ = [
    "LLAVA_NEXT_PINPOINTS",
    "ONEVISION_PINPOINTS",
    "TIE_BREAKS",
    "select_resolution",
    "resized_size",
    "unpadded_shape",
    "shrunk_shape",
    "AnyresPlan",
    "anyres_plan",
    "num_tokens",
]

#: LLaVA-NeXT's default grid pinpoints, ``(height, width)`` as transformers reads them, for 336 px tiles.
LLAVA_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
#: LLaVA-OneVision's 36 pinpoints (``anyres_max_9``): every ``(384*a, 384*b)``, ``a, b`` in 1..6, in its order.
ONEVISION_PINPOINTS = tuple((384 * a, 384 * b) for a in range(1, 7) for b in range(1, 7))
#: How the pinpoints are read: transformers' ``(height, width)`` or the original code's ``(width, height)``.
TIE_BREAKS = ("transformers", "original")


def _pinpoints(resolutions, name: str = "resolutions") -> tuple[tuple[int, int], ...]:
    """``(height, width)`` pinpoints as pairs of Python ints (rows of an array or a tensor taken as pairs)."""
    example = [list(p) for p in LLAVA_NEXT_PINPOINTS]
    if isinstance(resolutions, (torch.Tensor, np.ndarray)):
        resolutions = resolutions.tolist()
    if not isinstance(resolutions, Sequence) or isinstance(resolutions, (str, bytes)):
        raise TypeError(
            f"{name}={resolutions!r} is a {type(resolutions).__name__}; pass a list of (height, width) pairs "
            f"of ints, e.g. {example}."
        )
    try:
        pairs = tuple(
            as_pair(r.tolist() if isinstance(r, (torch.Tensor, np.ndarray)) else r, name) for r in resolutions
        )
    except TypeError as e:
        raise TypeError(
            f"{name}={resolutions!r}; expected a list of (height, width) pairs of ints, e.g. {example}."
        ) from e
    if not pairs:
        raise ValueError(f"{name} is empty; pass at least one (height, width) pinpoint, e.g. {example}.")
    return tuple((int(h), int(w)) for h, w in pairs)


def _select_resolution(image_size, resolutions=LLAVA_NEXT_PINPOINTS, *, tie_break: str = "transformers"):
    """:func:`select_resolution` without a public boundary (for hrperc's own callers)."""
    H, W = as_image_size(image_size)
    pairs = _pinpoints(resolutions)
    if tie_break not in TIE_BREAKS:
        raise ValueError(
            f"tie_break={tie_break!r} is not one of {TIE_BREAKS}. Pass 'transformers' (LlavaNextProcessor's "
            f"reading, the default) or 'original' (the LLaVA-1.6 research code's)."
        )
    if tie_break == "original":  # the same scoring, with each pinpoint read as (width, height)
        pairs = tuple((b, a) for a, b in pairs)
    best, best_effective, best_wasted = None, 0, math.inf
    for height, width in pairs:
        scale = min(width / W, height / H)
        effective = min(int(W * scale) * int(H * scale), W * H)
        wasted = width * height - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (height, width), effective, wasted
    return best  # when every canvas keeps 0 pixels (a side scales below 1 px), the first one, as the reference


@public
def select_resolution(image_size, resolutions=LLAVA_NEXT_PINPOINTS, *, tie_break: str = "transformers"):
    """The canvas ``(height, width)`` an ``(H, W)`` image gets among ``resolutions`` (see module docs).

    Exactly ``transformers.image_processing_utils.select_best_resolution`` for ``tie_break="transformers"``,
    and LLaVA-1.6's ``select_best_resolution`` (pinpoints and image size read as ``(width, height)``) for
    ``"original"``; both return ``(height, width)`` here.

    Example::

        >>> select_resolution((900, 1600))
        (672, 672)
    """
    return _select_resolution(image_size, resolutions, tie_break=tie_break)


@public
def resized_size(image_size, canvas) -> tuple[int, int]:
    """``(h, w)`` of the image resized into ``canvas = (height, width)`` keeping its aspect ratio.

    Exactly transformers' ``get_patch_output_size``: the limiting side fills the canvas, the other is
    ``min(ceil(side * scale), canvas side)``; the content is then centred on the canvas.

    Example::

        >>> resized_size((1000, 800), (1008, 672))
        (840, 672)
    """
    H, W = as_image_size(image_size)
    ch, cw = as_pair(canvas, "canvas")
    scale_w, scale_h = cw / W, ch / H
    if scale_w < scale_h:
        return min(math.ceil(H * scale_w), ch), cw
    return ch, min(math.ceil(W * scale_h), cw)


def _unpadded_shape(image_size, feature_shape) -> tuple[int, int]:
    """:func:`unpadded_shape` without a public boundary (for hrperc's own callers)."""
    H, W = as_image_size(image_size)
    rows, cols = as_pair(feature_shape, "feature_shape")
    if W / H > cols / rows:
        new_rows = int(round(H * (cols / W), 7))
        rows -= 2 * ((rows - new_rows) // 2)
    else:
        new_cols = int(round(W * (rows / H), 7))
        cols -= 2 * ((cols - new_cols) // 2)
    return rows, cols


@public
def unpadded_shape(image_size, feature_shape) -> tuple[int, int]:
    """``(rows, cols)`` of a ``feature_shape = (gh*ht, gw*wt)`` map of an ``(H, W)`` image after unpadding.

    The rows (or columns) that only hold the padding of the centred content are removed, an equal
    number from each side, exactly as transformers' ``unpad_image`` and ``LlavaNextProcessor`` compute it.

    Example::

        >>> unpadded_shape((1000, 800), (72, 48))
        (60, 48)
    """
    return _unpadded_shape(image_size, feature_shape)


def _shrunk_shape(shape, tile_tokens, max_tiles: int) -> tuple[int, int]:
    """:func:`shrunk_shape` without a public boundary (for hrperc's own callers)."""
    # 0 rows (or columns) is a real unpadded shape: an image so thin that its content rounds to no token row
    # on an even token grid (224/16 tiles: 14 x 14) keeps rows % 2 == 0 of them; nothing is shrunk then.
    rows, cols = as_pair(shape, "shape", minimum=0)
    ht, _ = as_pair(tile_tokens, "tile_tokens")
    max_tiles = as_int(max_tiles, "max_tiles", example="max_tiles=9 (OneVision's 'anyres_max_9')")
    ratio = math.sqrt(rows * cols / (max_tiles * ht**2))
    if ratio > 1.1:
        return int(rows // ratio), int(cols // ratio)
    return rows, cols


@public
def shrunk_shape(shape, tile_tokens, max_tiles: int) -> tuple[int, int]:
    """OneVision's ``anyres_max_N`` cap: an unpadded ``(rows, cols)`` map holding more than about ``max_tiles``
    tiles' worth of tokens is shrunk (bilinear, by the model) to ``(rows // r, cols // r)``.

    ``r = sqrt(rows*cols / (max_tiles * ht*wt))``; the map is left alone unless ``r > 1.1``. Exactly
    ``LlavaOnevisionProcessor`` / ``LlavaOnevisionModel.pack_image_features``, which use the square
    ``ht**2`` of the tile's token side.

    Example::

        >>> shrunk_shape((162, 108), (27, 27), 9), shrunk_shape((81, 81), (27, 27), 9)
        ((99, 66), (81, 81))
    """
    return _shrunk_shape(shape, tile_tokens, max_tiles)


@dataclass(frozen=True)
class AnyresPlan:
    """The anyres numbers of one image: ``canvas`` ``(height, width)`` and its ``grid`` ``(gh, gw)`` of tiles;
    ``tile_tokens`` ``(ht, wt)``; ``unpadded``: the ``(rows, cols)`` map left after unpadding; ``shape``: the
    map the LLM gets (``unpadded``, or OneVision's shrink of it); ``newline``: a slot after every row."""

    canvas: tuple[int, int]
    grid: tuple[int, int]
    tile_tokens: tuple[int, int]
    unpadded: tuple[int, int]
    shape: tuple[int, int]
    newline: bool

    @property
    def base_tokens(self) -> int:
        """The base view's tokens, ``ht*wt``."""
        return self.tile_tokens[0] * self.tile_tokens[1]

    @property
    def map_tokens(self) -> int:
        """The map's tokens, newline slots included: ``rows * (cols + newline)``."""
        return self.shape[0] * (self.shape[1] + self.newline)

    @property
    def num_tokens(self) -> int:
        return self.base_tokens + self.map_tokens


def _anyres_plan(
    image_size,
    resolutions=LLAVA_NEXT_PINPOINTS,
    *,
    tile_size,
    patch_size,
    newline: bool = True,
    tie_break: str = "transformers",
    max_tiles: int | None = None,
) -> AnyresPlan:
    """:func:`anyres_plan` without a public boundary (for hrperc's own callers)."""
    (th, tw), (ph, pw) = as_pair(tile_size, "tile_size"), as_pair(patch_size, "patch_size")
    newline = as_bool(newline, "newline")
    canvas = _select_resolution(image_size, resolutions, tie_break=tie_break)
    grid, tile_tokens = (canvas[0] // th, canvas[1] // tw), (th // ph, tw // pw)
    unpadded = _unpadded_shape(image_size, (grid[0] * tile_tokens[0], grid[1] * tile_tokens[1]))
    shape = unpadded if max_tiles is None else _shrunk_shape(unpadded, tile_tokens, max_tiles)
    return AnyresPlan(canvas, grid, tile_tokens, unpadded, shape, newline)


@public
def anyres_plan(
    image_size,
    resolutions=LLAVA_NEXT_PINPOINTS,
    *,
    tile_size,
    patch_size,
    newline: bool = True,
    tie_break: str = "transformers",
    max_tiles: int | None = None,
) -> AnyresPlan:
    """The :class:`AnyresPlan` of an ``(H, W)`` image (arguments as :func:`num_tokens`).

    Example::

        >>> p = anyres_plan((1000, 800), tile_size=336, patch_size=14)
        >>> p.canvas, p.grid, p.unpadded, p.num_tokens
        ((672, 672), (2, 2), (48, 38), 2448)
    """
    return _anyres_plan(
        image_size,
        resolutions,
        tile_size=tile_size,
        patch_size=patch_size,
        newline=newline,
        tie_break=tie_break,
        max_tiles=max_tiles,
    )


@public
def num_tokens(
    image_size,
    resolutions=LLAVA_NEXT_PINPOINTS,
    *,
    tile_size,
    patch_size,
    newline: bool = True,
    tie_break: str = "transformers",
    max_tiles: int | None = None,
) -> int:
    """Visual tokens of an ``(H, W)`` image under LLaVA-NeXT's anyres: base view + unpadded map + newline slots.

    ``tile_size`` and ``patch_size`` (ints or pairs) give ``ht = tile // patch`` tokens a side; the canvas
    is ``select_resolution(...)``, cut into ``canvas // tile`` tiles. Equals
    ``LlavaNextProcessor._get_number_of_features`` (CLS dropped) for ``tie_break="transformers"``.
    ``max_tiles`` applies OneVision's ``anyres_max_N`` cap (:func:`shrunk_shape`): with
    ``ONEVISION_PINPOINTS``, ``tile_size=384``, ``patch_size=14`` and ``max_tiles=9`` it equals
    ``LlavaOnevisionProcessor._get_number_of_features``. The count of :func:`anyres_plan`.

    Example::

        >>> kw = dict(tile_size=336, patch_size=14)
        >>> num_tokens((300, 200), **kw), num_tokens((300, 200), tie_break="original", **kw)   # a tie: 2 canvases
        (984, 1476)
    """
    return _anyres_plan(
        image_size,
        resolutions,
        tile_size=tile_size,
        patch_size=patch_size,
        newline=newline,
        tie_break=tie_break,
        max_tiles=max_tiles,
    ).num_tokens
