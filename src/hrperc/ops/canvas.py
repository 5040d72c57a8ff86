"""From an image of any size to a tile-grid canvas: grid selection, the geometry record, resize and pad.

Pure functions behind :class:`hrperc.DualPerspectiveCrop` (whose docstring explains the grid and fit
policies): :func:`candidate_grids` and :func:`select_grid` choose a grid, :class:`CropGeometry` records
where the image went, :func:`resize_image` and :func:`place_on_canvas` move the pixels.

Example::

    >>> from hrperc.ops.canvas import select_grid
    >>> select_grid((1008, 1344), 336, max_tiles=12)
    (3, 4)
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._validation import as_pair

__all__ = ["CropGeometry", "candidate_grids", "select_grid", "resize_image", "place_on_canvas", "RESIZE_MODES"]

#: Interpolation modes :func:`resize_image` accepts.
RESIZE_MODES = ("bicubic", "bilinear", "nearest", "nearest-exact", "area")
_RULES = ("resolution", "aspect")


@dataclass(frozen=True)
class CropGeometry:
    """Where an image went: enough to map tokens back to pixels and to unpad features.

    ``input_size`` ``(H0, W0)`` of the original image; ``grid`` ``(gh, gw)``; ``tile_size`` ``(h, w)``;
    ``canvas_size`` ``(gh*h, gw*w)``; ``valid_box`` ``(top, left, height, width)``: the canvas pixels
    that hold image content (the whole canvas for ``fit="resize"``); ``fit``: the policy used.
    """

    input_size: tuple[int, int]
    grid: tuple[int, int]
    tile_size: tuple[int, int]
    canvas_size: tuple[int, int]
    valid_box: tuple[int, int, int, int]
    fit: str = "resize"

    @property
    def num_tiles(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def scale(self) -> tuple[float, float]:
        """Canvas pixels per input pixel, ``(sy, sx)``."""
        return self.valid_box[2] / self.input_size[0], self.valid_box[3] / self.input_size[1]

    def valid_mask(self, patch: int = 1) -> torch.Tensor:
        """``(gh*h//patch, gw*w//patch)`` bool map of the canvas cells that overlap image content.

        A token (``patch`` x ``patch`` pixels) counts as valid when any of its pixels is image content,
        so no image pixel is ever masked away.
        """
        patch = as_pair(patch, "patch", "CropGeometry.valid_mask")
        ph, pw = patch
        H, W = self.canvas_size
        if H % ph or W % pw:
            raise ValueError(
                f"CropGeometry.valid_mask: canvas {self.canvas_size} is not divisible by patch {patch}. "
                f"Use the backbone's patch size, which divides the tile size."
            )
        top, left, height, width = self.valid_box
        rows = torch.arange(H // ph)
        cols = torch.arange(W // pw)
        row_ok = (rows * ph < top + height) & ((rows + 1) * ph > top)
        col_ok = (cols * pw < left + width) & ((cols + 1) * pw > left)
        return row_ok[:, None] & col_ok[None, :]


def candidate_grids(max_tiles: int, min_tiles: int = 1) -> list[tuple[int, int]]:
    """All ``(gh, gw)`` with ``min_tiles <= gh*gw <= max_tiles``, ordered by tile count then ``gh``."""
    grids = [
        (gh, gw)
        for gh in range(1, max_tiles + 1)
        for gw in range(1, max_tiles // gh + 1)
        if min_tiles <= gh * gw <= max_tiles
    ]
    return sorted(grids, key=lambda g: (g[0] * g[1], g[0]))


def select_grid(image_size, tile_size, max_tiles: int = 9, min_tiles: int = 1, rule: str = "resolution"):
    """Best-fit grid ``(gh, gw)`` for an ``(H0, W0)`` image under ``max_tiles`` (see module docs).

    Example::

        >>> select_grid((1008, 1344), 336, max_tiles=12)
        (3, 4)
        >>> select_grid((400, 1600), 336, max_tiles=6, rule="aspect")
        (1, 4)
    """
    fn = "select_grid"
    H0, W0 = as_pair(image_size, "image_size", fn)
    h, w = as_pair(tile_size, "tile_size", fn)
    _check_tiles(max_tiles, min_tiles, fn)
    grids = candidate_grids(max_tiles, min_tiles)
    if rule == "resolution":

        def score(g):
            ch, cw = g[0] * h, g[1] * w
            s = min(ch / H0, cw / W0)
            effective = min(int(H0 * s) * int(W0 * s), H0 * W0)
            return (-effective, ch * cw - effective, g[0] * g[1])

        return min(grids, key=score)
    if rule == "aspect":
        target = W0 / H0
        best, best_diff = grids[0], float("inf")
        for g in grids:
            diff = abs(target - g[1] / g[0])
            if diff < best_diff - 1e-12:
                best, best_diff = g, diff
            elif abs(diff - best_diff) <= 1e-12 and H0 * W0 > 0.5 * h * w * g[0] * g[1]:
                best = g
        return best
    raise ValueError(
        f"{fn}: rule={rule!r} is not one of {_RULES}. Pass one of them: 'resolution' (LLaVA-NeXT's best "
        f"resolution) or 'aspect' (InternVL's closest aspect ratio)."
    )


def _check_tiles(max_tiles, min_tiles, fn):
    for name, v in (("max_tiles", max_tiles), ("min_tiles", min_tiles)):
        if not isinstance(v, numbers.Integral) or isinstance(v, bool):
            raise TypeError(
                f"{fn}: {name}={v!r} is a {type(v).__name__}; it must be an integer >= 1 (a tile count). "
                f"Pass a whole number, e.g. {name}={int(v) if isinstance(v, float) and v.is_integer() else 9}."
            )
        if v < 1:
            raise ValueError(f"{fn}: {name}={v!r}; it must be an integer >= 1 (a tile count). Pass e.g. {name}=1.")
    if min_tiles > max_tiles:
        raise ValueError(f"{fn}: min_tiles={min_tiles} > max_tiles={max_tiles}. Lower min_tiles or raise max_tiles.")


def _check_fill(fill, fn: str):
    """``fill`` as a plain Python number (int kept exact), or a TypeError."""
    if isinstance(fill, torch.Tensor) or not isinstance(fill, numbers.Real):
        raise TypeError(
            f"{fn}: fill={fill!r} is a {type(fill).__name__}; it must be a Python number (the padding value). "
            f"Pass e.g. fill=0 (for a 0-d tensor, fill=t.item())."
        )
    return int(fill) if isinstance(fill, numbers.Integral) else float(fill)



def resize_image(img: torch.Tensor, size, mode: str = "bicubic", antialias: bool = True) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, C, *size)`` by ``mode``, computed in float32 and cast back (as timm does).

    ``antialias`` applies to ``"bilinear"``/``"bicubic"`` only; an image already of ``size`` is returned
    as is.

    Example::

        >>> resize_image(torch.rand(1, 3, 10, 20), (5, 10)).shape
        torch.Size([1, 3, 5, 10])
    """
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    # Resampling in float32 keeps fp16/bf16 images accurate.
    kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    aa = antialias and mode in ("bilinear", "bicubic")
    out = F.interpolate(img.float(), size=tuple(size), mode=mode, antialias=aa, **kw)
    return out.to(img.dtype)


def place_on_canvas(img: torch.Tensor, geometry: CropGeometry, mode: str = "bicubic", antialias: bool = True,
                    fill: float = 0.0) -> torch.Tensor:  # fmt: skip
    """``(B, C, H0, W0)`` -> ``(B, C, gh*h, gw*w)`` by the geometry's fit: stretched (``"resize"``), or
    the image (resized for ``"resize_pad"``) in ``geometry.valid_box`` and ``fill`` elsewhere.

    Example::

        >>> from hrperc import DualPerspectiveCrop
        >>> geo = DualPerspectiveCrop(grid="auto", tile_size=4, fit="pad").plan((3, 6))
        >>> place_on_canvas(torch.ones(1, 1, 3, 6), geo, fill=0.0)[0, 0]
        tensor([[1., 1., 1., 1., 1., 1., 0., 0.],
                [1., 1., 1., 1., 1., 1., 0., 0.],
                [1., 1., 1., 1., 1., 1., 0., 0.],
                [0., 0., 0., 0., 0., 0., 0., 0.]])
    """
    if geometry.fit == "resize":
        return resize_image(img, geometry.canvas_size, mode, antialias)
    top, left, height, width = geometry.valid_box
    content = img if geometry.fit == "pad" else resize_image(img, (height, width), mode, antialias)
    fill = fill if img.is_floating_point() or img.is_complex() else int(fill)  # integer fills are whole numbers
    canvas = img.new_full((*img.shape[:2], *geometry.canvas_size), fill)
    canvas[..., top : top + height, left : left + width] = content
    return canvas
