"""Bring an image of any size to a tile grid, then cut it both ways (INF-LLaVA's DCM front door).

:class:`DualPerspectiveCrop` takes images of any size and makes, for each, ``N = gh*gw`` local tiles,
``N`` strided global sub-images and an optional thumbnail, all of the tile size ``(h, w)``. How an
image of size ``(H0, W0)`` reaches the canvas ``(gh*h, gw*w)`` is an explicit policy, never a silent
crop:

**Grid** (``grid=``)

* ``(gh, gw)``: fixed.
* ``"floor"``: the paper's rule (eq. 9-10), ``gh = floor(H0 / h)``, ``gw = floor(W0 / w)``; an image
  smaller than one tile is refused.
* ``"auto"``: the best-fit grid with ``min_tiles <= gh*gw <= max_tiles``, by ``auto_rule``:

  - ``"resolution"`` (LLaVA-NeXT's ``select_best_resolution``): scale the image to fit each candidate
    canvas keeping its aspect ratio; keep the canvas that preserves the most original pixels
    (``min(scaled area, original area)``), ties broken by the least wasted canvas area, then fewer tiles.
    Where that degenerates (an image so thin that every canvas truncates its short side to 0 pixels,
    e.g. 100000 x 20), the untruncated area decides: the grid that holds the image largest, ``(12, 1)``
    for ``max_tiles=12`` (see :func:`~hrperc.ops.select_grid`).
  - ``"aspect"`` (InternVL's ``find_closest_aspect_ratio``): the grid whose ``gw/gh`` is closest to
    ``W0/H0``; on a tie the larger grid when the image has more than half its pixel count.

**Fit** (``fit=``), from the image to the canvas

* ``"resize"``: stretch to the canvas (antialiased ``mode`` interpolation, computed in float32);
  ``mode="bicubic", antialias=False`` reproduces the released INF-LLaVA pipeline.
* ``"pad"``: no resampling; the image is placed at the top-left and the rest filled with ``fill``.
  With ``grid="floor"`` the grid is the smallest that holds the image, ``ceil(H0/h) x ceil(W0/w)``;
  with ``grid="auto"`` it is the same grid, grown when it has fewer than ``min_tiles`` tiles to the
  smallest grid with ``min_tiles <= gh*gw <= max_tiles`` that holds the image (ties: the canvas
  aspect ratio closest to the image's). Refused when no grid within ``max_tiles`` holds the image.
* ``"resize_pad"``: scale keeping the aspect ratio to fit inside the canvas, centre it, pad with
  ``fill`` (LLaVA-NeXT's ``resize_and_pad_image``).

``fill`` must be representable in the image's dtype: for an integer image a whole number inside
``torch.iinfo(dtype)``, for a float image inside ``torch.finfo(dtype)``. A fixed grid or a ``"floor"``
grid outside ``[min_tiles, max_tiles]`` is refused, never silently changed.

**Small images are upsampled, explicitly.** A canvas larger than the image is reached by enlarging
it: with a fixed grid, or ``grid="auto"`` with ``fit="resize"``/``"resize_pad"``, a 50 x 50 image and
``grid=(3, 3), tile_size=336`` becomes nine 336 x 336 tiles of a 1008 x 1008 upsampled canvas (as in
LLaVA-NeXT, which also upsamples to its chosen resolution). The tiles then hold no more detail than
the image itself; ``CropGeometry.scale`` (> 1) reports it. ``grid="auto"`` with the default
``"resolution"`` rule gives such an image the fewest tiles (one), since more cannot keep more of its
pixels. To avoid upsampling, use ``fit="pad"`` (native resolution, the smallest grid that holds the
image) or ``grid="floor"``, which never enlarges and refuses an image smaller than one tile.

No policy crops: every input pixel reaches the canvas (resized, or copied by ``"pad"``), and
``"pad"`` refuses an image larger than its canvas. The returned :class:`CropGeometry` records the
valid region so padded tokens can be masked.

Example::

    >>> import torch, hrperc
    >>> dcm = hrperc.DualPerspectiveCrop(grid="auto", max_tiles=12, tile_size=336)
    >>> out = dcm(torch.rand(1, 3, 1008, 1344))
    >>> out.local.shape, out.strided.shape, out.geometries[0].grid
    (torch.Size([12, 3, 336, 336]), torch.Size([12, 3, 336, 336]), (3, 4))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .._errors import public
from .._validation import as_bool, as_grid, as_image_size, as_pair
from ..ops.canvas import (
    _RULES,
    RESIZE_MODES,
    CropGeometry,
    _check_fill,
    _check_tiles,
    _cover_tiles,
    _place_on_canvas,
    _resize_image,
    select_grid,
)
from ..ops.crop import _crop

__all__ = ["DualCrops", "DualPerspectiveCrop"]

Fit = Literal["resize", "pad", "resize_pad"]
_FITS = ("resize", "pad", "resize_pad")


@dataclass
class DualCrops:
    """Output of :class:`DualPerspectiveCrop`.

    ``local`` and ``strided``: ``(sum_b N_b, C, h, w)``, image ``b``'s sub-image ``k`` at
    ``offsets[b] + k`` (``= b*N + k`` when all images share a grid); ``thumbnail``: ``(B, C, h, w)`` or
    ``None``; ``geometries``: one :class:`CropGeometry` per image (``grids`` and ``offsets`` are read
    off them).
    """

    local: torch.Tensor
    strided: torch.Tensor
    thumbnail: torch.Tensor | None
    geometries: list[CropGeometry]

    @property
    def offsets(self) -> list[int]:
        """Stack index of each image's first sub-image: the running sum of the tile counts."""
        starts, start = [], 0
        for geo in self.geometries:
            starts.append(start)
            start += geo.num_tiles
        return starts

    @property
    def grids(self) -> list[tuple[int, int]]:
        return [g.grid for g in self.geometries]

    @property
    def uniform_grid(self) -> bool:
        return len(set(self.grids)) == 1


class DualPerspectiveCrop(nn.Module):
    """Images of any size -> local tiles, strided global sub-images and a thumbnail.

    Args:
        grid: ``(gh, gw)``, ``"auto"`` or ``"floor"`` (see module docs).
        tile_size: sub-image size ``(h, w)`` or an int; the ViT's native size (336 for ViT-L/14-336).
        max_tiles, min_tiles: bounds on ``gh*gw``. ``"auto"`` chooses within them (with ``fit="pad"`` too,
            growing the grid to ``min_tiles``); a fixed or ``"floor"`` grid outside them is refused.
        fit: ``"resize"``, ``"pad"`` or ``"resize_pad"``.
        mode, antialias: interpolation for resizing (and the thumbnail), computed in float32; ``antialias``
            is a bool (as ``thumbnail``: a string such as ``"false"`` is a ``TypeError``).
        fill: padding value for ``"pad"``/``"resize_pad"``; must fit the image dtype (a whole number
            inside ``torch.iinfo`` for integer images), else a ``ValueError``; ``nan`` and ``inf`` are
            refused at construction (``ValueError``).
        thumbnail: also return the whole image resized to ``(h, w)``.
        auto_rule: ``"resolution"`` (LLaVA-NeXT) or ``"aspect"`` (InternVL) for ``grid="auto"``.

    Input: ``(B, C, H, W)`` or ``(C, H, W)`` tensor, or a list of ``(C, H, W)`` tensors of different
    sizes (same ``C``, dtype and device). Every size must be >= 1 (an empty batch is refused). Integer
    images can only be padded, not resized. Output: :class:`DualCrops`.

    Upsampling: a canvas larger than the image (a fixed grid, or ``"auto"`` with a resize fit, for a
    small image) is reached by enlarging the image, as LLaVA-NeXT does; e.g. a 50 x 50 image with
    ``grid=(3, 3)`` gives nine 336 x 336 tiles of an upsampled canvas, ``geometry.scale`` > 1. Use
    ``fit="pad"`` (native pixels) or ``grid="floor"`` (never enlarges; refuses an image smaller than a
    tile) to avoid it. No policy crops: every input pixel reaches the canvas.

    Example::

        >>> dcm = DualPerspectiveCrop(grid=(3, 3), mode="bicubic", antialias=False)   # released
        >>> out = dcm([torch.rand(3, 900, 1200), torch.rand(3, 1008, 1008)])
        >>> out.local.shape, out.thumbnail.shape
        (torch.Size([18, 3, 336, 336]), torch.Size([2, 3, 336, 336]))
    """

    @public(name="DualPerspectiveCrop")
    def __init__(
        self,
        grid=(3, 3),
        tile_size=336,
        max_tiles: int = 9,
        min_tiles: int = 1,
        fit: Fit = "resize",
        mode: str = "bicubic",
        antialias: bool = True,
        fill: float = 0.0,
        thumbnail: bool = True,
        auto_rule: str = "resolution",
    ) -> None:
        super().__init__()
        _check_tiles(max_tiles, min_tiles)
        if isinstance(grid, str):
            if grid not in ("auto", "floor"):
                raise ValueError(f"grid={grid!r}; pass (gh, gw), 'auto' or 'floor'.")
        else:
            grid = as_grid(grid)
            if grid[0] * grid[1] > max_tiles:
                raise ValueError(
                    f"grid={grid} has {grid[0] * grid[1]} tiles, over max_tiles={max_tiles}. "
                    f"Raise max_tiles or use a smaller grid."
                )
            if grid[0] * grid[1] < min_tiles:
                raise ValueError(
                    f"grid={grid} has {grid[0] * grid[1]} tiles, under min_tiles={min_tiles}; a fixed grid "
                    f"is never changed. Lower min_tiles or use a larger grid (or grid='auto')."
                )
        if fit not in _FITS:
            raise ValueError(
                f"fit={fit!r} is not one of {_FITS}. Pass one of them: 'resize' (stretch to the canvas), "
                f"'pad' (native pixels, padded) or 'resize_pad' (keep the aspect ratio, then pad)."
            )
        if mode not in RESIZE_MODES:
            raise ValueError(
                f"mode={mode!r} is not one of {RESIZE_MODES}. Pass one of them, e.g. mode='bicubic' (the default)."
            )
        if auto_rule not in _RULES:
            raise ValueError(
                f"auto_rule={auto_rule!r} is not one of {_RULES}. Pass one of them: 'resolution' "
                f"(LLaVA-NeXT's best resolution) or 'aspect' (InternVL's closest aspect ratio)."
            )
        self.grid = grid
        self.tile_size = as_pair(tile_size, "tile_size")
        self.max_tiles, self.min_tiles = max_tiles, min_tiles
        self.fit, self.mode, self.fill = fit, mode, _check_fill(fill)
        self.antialias, self.thumbnail = as_bool(antialias, "antialias"), as_bool(thumbnail, "thumbnail")
        self.auto_rule = auto_rule

    def extra_repr(self) -> str:
        return (
            f"grid={self.grid}, tile_size={self.tile_size}, max_tiles={self.max_tiles}, fit={self.fit!r}, "
            f"mode={self.mode!r}, antialias={self.antialias}, thumbnail={self.thumbnail}"
        )

    # geometry -------------------------------------------------------------------------------------
    @public(name="DualPerspectiveCrop.plan")
    def plan(self, image_size) -> CropGeometry:
        """The :class:`CropGeometry` an ``(H0, W0)`` image gets; no pixels are touched."""
        H0, W0 = as_image_size(image_size)
        h, w = self.tile_size
        if self.grid == "auto" and self.fit != "pad":
            grid = select_grid((H0, W0), (h, w), self.max_tiles, self.min_tiles, self.auto_rule)
        elif self.grid in ("auto", "floor") and self.fit == "pad":
            grid = (math.ceil(H0 / h), math.ceil(W0 / w))
            if self.grid == "auto" and grid[0] * grid[1] < self.min_tiles:
                grid = self._grow_pad_grid(grid, H0, W0)
        elif self.grid == "floor":
            if H0 < h or W0 < w:
                raise ValueError(
                    f"image of size ({H0}, {W0}) is smaller than one tile {self.tile_size}, so the "
                    f"paper's floor rule gives no tile (and 'floor' never upsamples). Use fit='pad' (pads it "
                    f"into one tile), grid='auto' (upsamples it), or a smaller tile_size."
                )
            grid = (H0 // h, W0 // w)
        else:
            grid = self.grid
        if grid[0] * grid[1] > self.max_tiles:
            fix = (
                "Raise max_tiles, or use fit='resize'/'resize_pad', which scale the image down"
                if self.fit == "pad"
                else "Raise max_tiles, or use grid='auto', which picks a grid within max_tiles"
            )
            raise ValueError(
                f"image of size ({H0}, {W0}) needs grid {grid} ({grid[0] * grid[1]} tiles) with "
                f"grid={self.grid!r}, fit={self.fit!r}, over max_tiles={self.max_tiles}. {fix}."
            )
        if grid[0] * grid[1] < self.min_tiles:  # only a 'floor' grid gets here: fixed grids are checked in __init__
            raise ValueError(
                f"image of size ({H0}, {W0}) gets grid {grid} ({grid[0] * grid[1]} tiles) from "
                f"grid={self.grid!r}, under min_tiles={self.min_tiles}; the floor rule is never changed silently. "
                f"Lower min_tiles, or use grid='auto', which picks a grid within [min_tiles, max_tiles]."
            )
        canvas = (grid[0] * h, grid[1] * w)
        if self.fit == "resize":
            box = (0, 0, canvas[0], canvas[1])
        elif self.fit == "pad":
            if H0 > canvas[0] or W0 > canvas[1]:
                raise ValueError(
                    f"image of size ({H0}, {W0}) does not fit the canvas {canvas} of grid {grid}; "
                    f"fit='pad' never drops pixels. Use fit='resize'/'resize_pad' or a larger grid."
                )
            box = (0, 0, H0, W0)
        else:
            s = min(canvas[0] / H0, canvas[1] / W0)
            nh, nw = min(canvas[0], max(1, round(H0 * s))), min(canvas[1], max(1, round(W0 * s)))
            box = ((canvas[0] - nh) // 2, (canvas[1] - nw) // 2, nh, nw)
        return CropGeometry((H0, W0), tuple(grid), (h, w), canvas, box, self.fit)

    def _grow_pad_grid(self, need, H0: int, W0: int) -> tuple[int, int]:
        """``grid="auto", fit="pad"``: the smallest grid with ``>= min_tiles`` tiles that holds the image."""
        h, w = self.tile_size
        # Per row gh >= need_h only the narrowest grid that holds the image and has >= min_tiles can win (the
        # fewest tiles first); no row beyond a holding grid's tile count can (its grids have more tiles).
        rows = min(self.max_tiles, _cover_tiles(need[0], need[1], self.min_tiles))
        fits = [(gh, max(need[1], -(-self.min_tiles // gh))) for gh in range(need[0], rows + 1)]
        fits = [g for g in fits if g[0] * g[1] <= self.max_tiles]
        if not fits:
            raise ValueError(
                f"image of size ({H0}, {W0}) needs at least grid {need} with fit='pad', and "
                f"no grid with min_tiles={self.min_tiles} <= gh*gw <= max_tiles={self.max_tiles} tiles holds it. "
                f"Lower min_tiles or raise max_tiles."
            )
        aspect = math.log(W0 / H0)
        return min(fits, key=lambda g: (g[0] * g[1], abs(math.log(g[1] * w / (g[0] * h)) - aspect), g[0]))

    # pixels ---------------------------------------------------------------------------------------
    def _resize(self, img: torch.Tensor, size, scale_uint8: bool = False) -> torch.Tensor:
        """``img`` resized to ``size``; ``scale_uint8``: uint8 ``[0, 255]`` in, float32 ``[0, 1]`` out (exact)."""
        return _resize_image(img, size, self.mode, self.antialias, scale_uint8=scale_uint8)

    def _check_image(self, img, name: str, ndim: int, scale_uint8: bool = False) -> None:
        if not isinstance(img, torch.Tensor):
            raise TypeError(
                f"{name} is a {type(img).__name__}; expected a torch.Tensor. Convert PIL images with "
                f"torchvision.transforms.functional.pil_to_tensor or use HighResEncoder, which accepts them."
            )
        if img.ndim != ndim:
            if ndim == 3:
                expected = "(C, H, W) (one list item is one image)"
                fix = (
                    "Pass each list item as one (C, H, W) image: img.squeeze(0) for a (1, C, H, W) tensor, "
                    "img.unsqueeze(0) for an (H, W) one"
                )
            else:
                expected = "(B, C, H, W) or (C, H, W)"
                fix = (
                    "Pass a (C, H, W) image or a (B, C, H, W) batch (an (H, W) image needs a channel: "
                    "img.unsqueeze(0)); for images of different sizes pass a list of (C, H, W) tensors"
                )
            raise ValueError(f"{name} has shape {tuple(img.shape)} ({img.ndim} dims); expected {expected}. {fix}.")
        if ndim == 4 and img.shape[0] == 0:
            raise ValueError(
                f"{name} has shape {tuple(img.shape)}: received 0 images (batch size 0), but at least one "
                f"is needed. Skip the call for an empty batch, or pass at least one image."
            )
        if min(img.shape) <= 0:
            dims = ("channel count C", "height H", "width W")  # the batch size was checked above
            zero = ", ".join(d for d, e in zip(dims, img.shape[-3:]) if e == 0)
            raise ValueError(
                f"{name} has shape {tuple(img.shape)}; every size must be positive (>= 1), but its {zero} "
                f"is 0. Pass a non-empty image (check how it was loaded or cropped before this call)."
            )
        uint8_read_as_unit = scale_uint8 and img.dtype == torch.uint8  # resized exactly into float32 [0, 1]
        if not img.is_floating_point() and not uint8_read_as_unit and (self.fit != "pad" or self.thumbnail):
            why = f"fit={self.fit!r} resizes" if self.fit != "pad" else "thumbnail=True resizes"
            raise TypeError(
                f"{name} has dtype {img.dtype} but {why}, which needs a float image. Convert it "
                f"(e.g. img.float() / 255), or use fit='pad' with thumbnail=False to crop integers exactly."
            )

    def _check_fill_for(self, dtype: torch.dtype) -> None:
        """``fill`` must be storable in the image dtype (it is used by ``"pad"``/``"resize_pad"``)."""
        if self.fit == "resize" or dtype.is_complex:
            return
        fill = self.fill
        if dtype.is_floating_point:
            info = torch.finfo(dtype)
            if math.isfinite(fill) and abs(fill) > info.max:
                raise ValueError(
                    f"fill={fill!r} is outside the range of the image dtype {dtype} "
                    f"([{info.min}, {info.max}], torch.finfo); it would become inf. Pass a fill inside that "
                    f"range, or convert the image to a wider dtype (e.g. img.float())."
                )
            return
        lo, hi = (0, 1) if dtype == torch.bool else (torch.iinfo(dtype).min, torch.iinfo(dtype).max)
        whole = isinstance(fill, int) or (math.isfinite(fill) and float(fill).is_integer())
        if not whole or not lo <= fill <= hi:
            rule = "a whole number" if not whole else f"inside [{lo}, {hi}]"
            raise ValueError(
                f"fill={fill!r} cannot be stored in the image dtype {dtype}: an integer image needs a "
                f"whole-number fill inside [{lo}, {hi}] (torch.iinfo({dtype})), and {fill!r} is not {rule}. Pass "
                f"a whole number in that range (e.g. fill=0), or convert the image to float first."
            )

    @public(name="DualPerspectiveCrop")
    def forward(self, images, thumbnail: bool | None = None, *, scale_uint8: bool = False) -> DualCrops:
        """Crop ``images`` (``(B, C, H, W)``, ``(C, H, W)`` or a list of ``(C, H, W)``) into :class:`DualCrops`.

        ``thumbnail`` overrides the module's setting for this call (``False`` skips the resize when the
        caller will not use the thumbnail). ``scale_uint8=True`` reads uint8 images as ``[0, 255]`` pixels:
        every output is float32 in ``[0, 1]`` (``fill`` in those units), bit-identical to passing
        ``images.float() / 255`` but without its full-size float copy (what :class:`hrperc.HighResEncoder` does).
        """
        want_thumb = self.thumbnail if thumbnail is None else as_bool(thumbnail, "thumbnail")
        scale_uint8 = as_bool(scale_uint8, "scale_uint8")
        if isinstance(images, torch.Tensor):
            if images.ndim == 3:
                images = images.unsqueeze(0)
            self._check_image(images, "images", 4, scale_uint8)
            groups = [images]
        elif isinstance(images, Sequence) and not isinstance(images, str):
            if len(images) == 0:
                raise ValueError(
                    f"images is an empty {type(images).__name__}: received 0 images, but at least one is "
                    f"needed. Pass at least one (C, H, W) image, or skip the call for an empty batch."
                )
            for b, img in enumerate(images):
                self._check_image(img, f"images[{b}]", 3, scale_uint8)
            first = images[0]
            for b, img in enumerate(images):
                if img.shape[0] != first.shape[0] or img.dtype != first.dtype or img.device != first.device:
                    raise ValueError(
                        f"images[{b}] is {tuple(img.shape)} {img.dtype} on {img.device} but images[0] is "
                        f"{tuple(first.shape)} {first.dtype} on {first.device}; all items need the same "
                        f"channels, dtype and device. Convert them first, e.g. "
                        f"img.to(device=images[0].device, dtype=images[0].dtype)."
                    )
            groups = [img.unsqueeze(0) for img in images]
        else:
            raise TypeError(f"images is a {type(images).__name__}; pass a tensor or a list of tensors.")
        scale = scale_uint8 and groups[0].dtype == torch.uint8  # uint8 in, float32 [0, 1] out
        self._check_fill_for(torch.float32 if scale else groups[0].dtype)

        locals_, strideds, thumbs, geos = [], [], [], []
        # One iteration per image group (a batched tensor is one group): tiles themselves are vectorized.
        for img in groups:
            geo = self.plan(tuple(img.shape[-2:]))  # its errors are named by this (outer) boundary
            canvas = _place_on_canvas(img, geo, self.mode, self.antialias, self.fill, scale_uint8=scale)
            locals_.append(_crop(canvas, geo.grid, "contiguous", "nchw", None))
            strideds.append(_crop(canvas, geo.grid, "strided", "nchw", None))
            if want_thumb:
                thumbs.append(self._resize(img, self.tile_size, scale))
            geos.extend([geo] * img.shape[0])
        cat = (lambda xs: xs[0]) if len(groups) == 1 else (lambda xs: torch.cat(xs, 0))
        thumb_stack = cat(thumbs) if want_thumb else None
        return DualCrops(cat(locals_), cat(strideds), thumb_stack, geos)
