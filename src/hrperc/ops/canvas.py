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

import functools
import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._errors import public
from .._validation import as_bool, as_image_size, as_pair

__all__ = ["CropGeometry", "candidate_grids", "select_grid", "resize_image", "place_on_canvas", "RESIZE_MODES"]

#: Interpolation modes :func:`resize_image` accepts.
RESIZE_MODES = ("bicubic", "bilinear", "nearest", "nearest-exact", "area")
_RULES = ("resolution", "aspect")
#: Most bytes of float32 one :func:`resize_image` step converts at once (a larger channel goes alone).
_RESIZE_CHUNK_BYTES = 64 << 20


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

    @public(name="CropGeometry.valid_mask")
    def valid_mask(self, patch: int | tuple[int, int] = 1) -> torch.Tensor:
        """``(gh*(h//ph), gw*(w//pw))`` bool map of the tokens that overlap image content.

        Each tile is cut into ``h//ph x w//pw`` patches of ``patch = (ph, pw)`` pixels from its top-left
        corner, as a ViT's patch convolution does; a tile size that is not a multiple of the patch
        leaves its last pixels unread (SigLIP so400m-patch14-384: 27 x 27 patches of a 384 tile). A
        token counts as valid when any of its pixels is image content, so no image pixel that a
        token reads is ever masked away.

        Example::

            >>> geo = CropGeometry((20, 25), (1, 2), (20, 20), (20, 40), (0, 0, 20, 25), "pad")
            >>> geo.valid_mask(7).int()                 # 2 x 2 patches of 7 per 20-pixel tile
            tensor([[1, 1, 1, 0],
                    [1, 1, 1, 0]], dtype=torch.int32)
        """
        ph, pw = as_pair(patch, "patch")
        (gh, gw), (h, w) = self.grid, self.tile_size
        if ph > h or pw > w:
            raise ValueError(
                f"patch=({ph}, {pw}) is larger than the tile {self.tile_size}. Pass the backbone's patch size."
            )
        top, left, height, width = self.valid_box

        def covered(g, t, p, start, extent):
            # Pixel span of each token along one axis: tile i, patch r covers [i*t + r*p, i*t + (r+1)*p).
            first = (torch.arange(g)[:, None] * t + torch.arange(t // p)[None, :] * p).reshape(-1)
            return (first < start + extent) & (first + p > start)

        return covered(gh, h, ph, top, height)[:, None] & covered(gw, w, pw, left, width)[None, :]


@public
def candidate_grids(max_tiles: int, min_tiles: int = 1, *, image_size=None, tile_size=None, rule: str = "resolution"):
    """The grids ``(gh, gw)`` :func:`select_grid` chooses among, ordered by tile count then ``gh``.

    Without ``image_size``: all ``(gh, gw)`` with ``min_tiles <= gh*gw <= max_tiles`` (about
    ``max_tiles * ln(max_tiles)`` of them). With ``image_size`` ``(H0, W0)`` and ``tile_size``: only
    the grids that can be ``select_grid``'s answer for that image under ``rule``, a subset in the same
    order on which the rule gives the same grid as on all of them. Its size depends on the image, not
    on the cap: for ``"resolution"`` no grid needs more tiles than the smallest one that holds the
    image at native resolution (it keeps every pixel with the least canvas), and per row (column)
    only the narrowest (shortest) grid whose other side does not bind can win; for ``"aspect"`` only
    the grids whose ratio is, to 1e-9, the closest (found with one vectorized pass over the rows).
    This is what :func:`select_grid` examines, so ``max_tiles=10**6`` costs what the image needs.

    Example::

        >>> candidate_grids(4)
        [(1, 1), (1, 2), (2, 1), (1, 3), (3, 1), (1, 4), (2, 2), (4, 1)]
        >>> len(candidate_grids(10**6, image_size=(1008, 1344), tile_size=336))
        6
    """
    _check_tiles(max_tiles, min_tiles)
    if image_size is None and tile_size is None:
        return _all_grids(max_tiles, min_tiles)
    if image_size is None or tile_size is None:
        raise TypeError(
            f"image_size={image_size!r}, tile_size={tile_size!r}; pass both (the grids that can win for "
            f"that image) or neither (every grid within the tile counts)."
        )
    H0, W0 = as_image_size(image_size)
    h, w = as_pair(tile_size, "tile_size")
    _check_rule(rule)
    return list(_search_grids(H0, W0, h, w, int(max_tiles), int(min_tiles), rule))


def _all_grids(max_tiles: int, min_tiles: int) -> list[tuple[int, int]]:
    grids = [
        (gh, gw)
        for gh in range(1, max_tiles + 1)
        for gw in range(1, max_tiles // gh + 1)
        if min_tiles <= gh * gw <= max_tiles
    ]
    return sorted(grids, key=lambda g: (g[0] * g[1], g[0]))


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _cover_tiles(need_h: int, need_w: int, min_tiles: int) -> int:
    """Tiles of a grid that holds ``need_h x need_w`` tiles and has ``>= min_tiles``: a bound on the fewest."""
    return min(need_h * max(need_w, _ceil_div(min_tiles, need_h)), need_w * max(need_h, _ceil_div(min_tiles, need_w)))


@functools.lru_cache(maxsize=1024)
def _search_grids(H0: int, W0: int, h: int, w: int, max_tiles: int, min_tiles: int, rule: str):
    """The grids that can win (see :func:`candidate_grids`), as a tuple ordered by ``(gh*gw, gh)``."""
    if rule == "aspect":
        return _aspect_grids(H0, W0, h, w, max_tiles, min_tiles)
    # "resolution": the cover grid keeps all H0*W0 pixels; any grid with more tiles keeps no more and
    # wastes more canvas, so it cannot win (when the cover grid is itself within max_tiles).
    bound = min(max_tiles, _cover_tiles(_ceil_div(H0, h), _ceil_div(W0, w), min_tiles))
    # The score depends on the grid only through s = min(gh*h/H0, gw*w/W0) and the canvas area. In row gh,
    # every gw from ceil(gh*h*W0 / (w*H0)) on has the same s (height binds) and more area, so only the first
    # can win; likewise per column. Every grid is one of these or dominated by one.
    found = set()
    for gh in range(1, bound + 1):
        gw = max(_ceil_div(min_tiles, gh), _ceil_div(gh * h * W0, w * H0))
        if gh * gw <= bound:
            found.add((gh, gw))
    for gw in range(1, bound + 1):
        gh = max(_ceil_div(min_tiles, gw), _ceil_div(gw * w * H0, h * W0))
        if gh * gw <= bound:
            found.add((gh, gw))
    return tuple(sorted(found, key=lambda g: (g[0] * g[1], g[0])))


def _aspect_grids(H0: int, W0: int, h: int, w: int, max_tiles: int, min_tiles: int):
    """``"aspect"``: per row ``gh`` the closest ``gw`` is the floor or ceil of ``gh*W0/H0`` (clamped to the
    row's tile range); of those, the grids whose ratio is within a margin (1e-9, widened until no grid lies
    just outside it) of the closest. The rule's exact ties are then decided as over every grid.

    Rows beyond ``R`` cannot matter once a grid of the exact ratio exists: nothing beats a 0 difference,
    and a tie replaces it only while ``H0*W0 > 0.5*h*w*gh*gw``, false for ``gh > 2*H0*W0/(h*w)``."""
    target = W0 / H0
    g = math.gcd(H0, W0)
    q, p = H0 // g, W0 // g  # the exact ratio as a grid (q, p), and its multiples (k*q, k*p)
    k = max(1, math.isqrt(_ceil_div(min_tiles, p * q)))
    while k * k * p * q < min_tiles:
        k += 1
    rows_needed = max_tiles
    if k * k * p * q <= max_tiles:
        rows_needed = min(max_tiles, max(k * q, 2 * H0 * W0 // (h * w)))
    kept, chunk = [], 1 << 20
    for start in range(1, rows_needed + 1, chunk):
        gh = torch.arange(start, min(start + chunk, rows_needed + 1), dtype=torch.int64)
        lo = ((min_tiles + gh - 1) // gh).clamp(min=1)
        hi = max_tiles // gh
        rows = lo <= hi
        if not bool(rows.any()):
            continue
        gh, lo, hi = gh[rows], lo[rows], hi[rows]
        below = (gh * W0) // H0  # exact floor(gh * W0 / H0)
        gws = torch.stack([below, below + 1]).clamp(min=lo, max=hi).flatten()
        ghs = gh.repeat(2)
        diff = (target - gws.double() / ghs.double()).abs()
        near = diff <= diff.min() + 1e-8  # a superset of the final margin around the overall best
        kept.append(torch.stack([diff, ghs.double(), gws.double()])[:, near])
    diff, ghs, gws = torch.cat(kept, dim=1)
    best = diff.min().item()
    margin = 1e-9
    while margin < 5e-9 and bool(((diff > best + margin) & (diff <= best + margin + 1e-10)).any()):
        margin *= 2
    near = diff <= best + margin
    found = set(zip(ghs[near].long().tolist(), gws[near].long().tolist()))
    return tuple(sorted(found, key=lambda g: (g[0] * g[1], g[0])))


def _check_rule(rule) -> None:
    if rule not in _RULES:
        raise ValueError(
            f"rule={rule!r} is not one of {_RULES}. Pass one of them: 'resolution' (LLaVA-NeXT's best "
            f"resolution) or 'aspect' (InternVL's closest aspect ratio)."
        )


@public
def select_grid(image_size, tile_size, max_tiles: int = 9, min_tiles: int = 1, rule: str = "resolution"):
    """Best-fit grid ``(gh, gw)`` for an ``(H0, W0)`` image under ``max_tiles`` (see module docs).

    ``rule="resolution"`` is LLaVA-NeXT's ``select_best_resolution`` over the canvases
    ``(gh*h, gw*w)`` of :func:`candidate_grids` (same answer, ties included), except where it
    degenerates: for an image so thin (aspect ratio beyond about ``max_tiles*h : 1``) that every canvas
    truncates its short side to 0 pixels, it would keep "0 pixels" everywhere and return the smallest
    grid (a 100000 x 20 image: ``(1, 1)``, squashed thousands of times). There the kept area is
    computed without the truncation, so the grid that holds the thin image largest wins (``(12, 1)``
    for ``max_tiles=12``, as the aspect rule gives). ``rule="aspect"`` is InternVL's closest ratio.
    The search examines only :func:`candidate_grids` ``(..., image_size=, tile_size=, rule=)``, so its
    cost depends on the image, not on ``max_tiles``; results are cached.

    Example::

        >>> select_grid((1008, 1344), 336, max_tiles=12)
        (3, 4)
        >>> select_grid((400, 1600), 336, max_tiles=6, rule="aspect")
        (1, 4)
        >>> select_grid((100000, 20), 336, max_tiles=12)
        (12, 1)
    """
    H0, W0 = as_image_size(image_size)
    h, w = as_pair(tile_size, "tile_size")
    _check_tiles(max_tiles, min_tiles)
    _check_rule(rule)
    return _best_grid(H0, W0, h, w, int(max_tiles), int(min_tiles), rule)


@functools.lru_cache(maxsize=4096)
def _best_grid(H0: int, W0: int, h: int, w: int, max_tiles: int, min_tiles: int, rule: str) -> tuple[int, int]:
    grids = _search_grids(H0, W0, h, w, max_tiles, min_tiles, rule)
    if rule == "resolution":

        def score(g):  # select_best_resolution: most kept pixels, then least waste (then fewer tiles)
            ch, cw = g[0] * h, g[1] * w
            s = min(ch / H0, cw / W0)
            effective = min(int(H0 * s) * int(W0 * s), H0 * W0)
            return (-effective, ch * cw - effective, g[0] * g[1])

        best = min(grids, key=score)
        if score(best)[0] < 0:
            return best

        def exact(g):  # every canvas keeps int(...) = 0 pixels: compare the untruncated kept area instead
            ch, cw = g[0] * h, g[1] * w
            s = min(ch / H0, cw / W0)
            kept = min((H0 * s) * (W0 * s), H0 * W0)
            return (-kept, ch * cw - kept, g[0] * g[1])

        return min(grids, key=exact)
    # InternVL's find_closest_aspect_ratio, as transformers' get_optimal_tiled_canvas runs it: grids by tile
    # count, then columns; exact float comparisons (a tie is an exactly equal difference).
    target = W0 / H0
    best, best_diff = (1, 1), float("inf")
    for g in sorted(grids, key=lambda g: (g[0] * g[1], g[1])):
        diff = abs(target - g[1] / g[0])
        if diff < best_diff:
            best, best_diff = g, diff
        elif diff == best_diff and H0 * W0 > 0.5 * h * w * g[0] * g[1]:
            best = g
    return best


def _check_tiles(max_tiles, min_tiles):
    for name, v in (("max_tiles", max_tiles), ("min_tiles", min_tiles)):
        if not isinstance(v, numbers.Integral) or isinstance(v, bool):
            raise TypeError(
                f"{name}={v!r} is a {type(v).__name__}; it must be an integer >= 1 (a tile count). "
                f"Pass a whole number, e.g. {name}={int(v) if isinstance(v, float) and v.is_integer() else 9}."
            )
        if v < 1:
            raise ValueError(f"{name}={v!r}; it must be an integer >= 1 (a tile count). Pass e.g. {name}=1.")
    if min_tiles > max_tiles:
        raise ValueError(f"min_tiles={min_tiles} > max_tiles={max_tiles}. Lower min_tiles or raise max_tiles.")


def _check_fill(fill):
    """``fill`` as a plain Python number (int kept exact), or a TypeError."""
    if isinstance(fill, torch.Tensor) or not isinstance(fill, numbers.Real):
        raise TypeError(
            f"fill={fill!r} is a {type(fill).__name__}; it must be a Python number (the padding value). "
            f"Pass e.g. fill=0 (for a 0-d tensor, fill=t.item())."
        )
    if isinstance(fill, numbers.Integral):
        return int(fill)
    if not math.isfinite(fill):
        fill = float(fill)
        raise ValueError(
            f"fill={fill!r} is not a finite number; padded pixels would hold {fill!r} and poison every "
            f"token that sees them (nan) or overflow the normalisation (inf). Pass a finite fill, e.g. fill=0.0 "
            f"(black) or fill=0.5 (grey)."
        )
    return float(fill)


def _resize_image(
    img: torch.Tensor, size, mode: str = "bicubic", antialias: bool = True, *, scale_uint8: bool = False
) -> torch.Tensor:
    """:func:`resize_image` without a public boundary (for hrperc's own callers)."""
    antialias = as_bool(antialias, "antialias")
    scale_uint8 = as_bool(scale_uint8, "scale_uint8")
    if scale_uint8 and img.dtype != torch.uint8:
        raise TypeError(
            f"scale_uint8=True reads uint8 pixels, but img has dtype {img.dtype}. Pass "
            f"scale_uint8=False for it (float images are resized as they are)."
        )
    if tuple(img.shape[-2:]) == tuple(size):
        return img.float().div_(255.0) if scale_uint8 else img
    # Resampling in float32 keeps fp16/bf16 images accurate.
    kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    aa = antialias and mode in ("bilinear", "bicubic")
    out_dtype = torch.float32 if scale_uint8 else img.dtype

    def resize(part: torch.Tensor) -> torch.Tensor:
        part = part.float().div_(255.0) if scale_uint8 else part.float()
        return F.interpolate(part, size=tuple(size), mode=mode, antialias=aa, **kw).to(out_dtype)

    if img.dtype == torch.float32 or img.ndim != 4:
        return resize(img)  # no conversion: no temporary
    B, C, H, W = img.shape
    per_call = max(1, _RESIZE_CHUNK_BYTES // (4 * H * W))  # channels converted to float32 at once
    if per_call >= B * C:
        return resize(img)  # a small conversion: one call
    if per_call >= C:  # whole images at a time
        step = per_call // C
        parts = [resize(img[b : b + step]) for b in range(0, B, step)]
        return torch.cat(parts) if len(parts) > 1 else parts[0]
    # a few channels at a time (one loop step per channel chunk of a large image, not per tile)
    parts = [torch.cat([resize(img[b : b + 1, c : c + per_call]) for c in range(0, C, per_call)], 1) for b in range(B)]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


@public
def resize_image(
    img: torch.Tensor, size, mode: str = "bicubic", antialias: bool = True, *, scale_uint8: bool = False
) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, C, *size)`` by ``mode``, computed in float32 and cast back (as timm does).

    ``antialias`` applies to ``"bilinear"``/``"bicubic"`` only; an image already of ``size`` is returned
    as is. ``scale_uint8=True`` reads a uint8 image as ``[0, 255]`` pixels and returns float32 in ``[0, 1]``,
    bit-identical to ``resize_image(img.float() / 255, size, ...)``.

    Memory: a non-float32 image (fp16, bf16, uint8) is converted to float32 a few channels at a time
    (at most ``_RESIZE_CHUNK_BYTES`` of float32, or one channel), never as a whole: channels resize
    independently, so the result is bit-identical to converting the whole image first.

    Example::

        >>> resize_image(torch.rand(1, 3, 10, 20), (5, 10)).shape
        torch.Size([1, 3, 5, 10])
    """
    return _resize_image(img, size, mode, antialias, scale_uint8=scale_uint8)


def _place_on_canvas(
    img: torch.Tensor,
    geometry: CropGeometry,
    mode: str = "bicubic",
    antialias: bool = True,
    fill: float = 0.0,
    *,
    scale_uint8: bool = False,
) -> torch.Tensor:
    """:func:`place_on_canvas` without a public boundary (for hrperc's own callers)."""
    antialias = as_bool(antialias, "antialias")
    scale_uint8 = as_bool(scale_uint8, "scale_uint8")
    if geometry.fit == "resize":
        return _resize_image(img, geometry.canvas_size, mode, antialias, scale_uint8=scale_uint8)
    top, left, height, width = geometry.valid_box
    if scale_uint8:
        if img.dtype != torch.uint8:
            raise TypeError(
                f"scale_uint8=True reads uint8 pixels, but img has dtype {img.dtype}. Pass scale_uint8=False for it."
            )
        canvas = img.new_full((*img.shape[:2], *geometry.canvas_size), float(fill), dtype=torch.float32)
        region = canvas[..., top : top + height, left : left + width]
        if geometry.fit == "pad":
            region.copy_(img).div_(255.0)  # in place: the same values as img.float() / 255, no temporary
        else:
            region.copy_(_resize_image(img, (height, width), mode, antialias, scale_uint8=True))
        return canvas
    content = img if geometry.fit == "pad" else _resize_image(img, (height, width), mode, antialias)
    fill = fill if img.is_floating_point() or img.is_complex() else int(fill)  # integer fills are whole numbers
    canvas = img.new_full((*img.shape[:2], *geometry.canvas_size), fill)
    canvas[..., top : top + height, left : left + width] = content
    return canvas


@public
def place_on_canvas(
    img: torch.Tensor,
    geometry: CropGeometry,
    mode: str = "bicubic",
    antialias: bool = True,
    fill: float = 0.0,
    *,
    scale_uint8: bool = False,
) -> torch.Tensor:
    """``(B, C, H0, W0)`` -> ``(B, C, gh*h, gw*w)`` by the geometry's fit: stretched (``"resize"``), or
    the image (resized for ``"resize_pad"``) in ``geometry.valid_box`` and ``fill`` elsewhere.

    ``scale_uint8=True`` reads a uint8 image as ``[0, 255]`` pixels: the canvas is float32 in ``[0, 1]``
    (``fill`` in those units), bit-identical to ``place_on_canvas(img.float() / 255, ...)`` without a
    full-size float copy of the image (see :func:`resize_image`).

    Example::

        >>> from hrperc import DualPerspectiveCrop
        >>> geo = DualPerspectiveCrop(grid="auto", tile_size=4, fit="pad").plan((3, 6))
        >>> place_on_canvas(torch.ones(1, 1, 3, 6), geo, fill=0.0)[0, 0]
        tensor([[1., 1., 1., 1., 1., 1., 0., 0.],
                [1., 1., 1., 1., 1., 1., 0., 0.],
                [1., 1., 1., 1., 1., 1., 0., 0.],
                [0., 0., 0., 0., 0., 0., 0., 0.]])
    """
    return _place_on_canvas(img, geometry, mode, antialias, fill, scale_uint8=scale_uint8)
