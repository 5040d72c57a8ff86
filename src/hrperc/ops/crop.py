"""Dual-perspective crops (INF-LLaVA DCM, eq. 11-17) and their exact inverses (Sec. 4.3.1).

Two ways to cut an image (or a token map) into ``N = gh * gw`` sub-images of ``(h, w)``:

* **local** / contiguous: tile ``k = i*gw + j`` is the block ``x[..., i*h:(i+1)*h, j*w:(j+1)*w]``;
* **strided** / global: sub-image ``k`` is the interleaved full-field view ``x[..., i::gh, j::gw]``,
  i.e. its pixel ``(r, c)`` is ``x[..., i + r*gh, j + c*gw]``.

Both return ``(B*N, ...)`` stacks where sub-image ``k`` of image ``b`` sits at index ``b*N + k``.
The merges are the exact inverses (the paper's "2D-prior recombination"), bit for bit, for every
dtype. Three layouts are supported through ``layout=``:

====================  =========================  =============================
layout                whole map                   sub-image stack
====================  =========================  =============================
``"nchw"`` (default)  ``(B, C, H, W)``            ``(B*N, C, h, w)``
``"nhwc"``            ``(B, H, W, C)``            ``(B*N, h, w, C)``
``"nlc"``             ``(B, H*W, C)`` row-major   ``(B*N, h*w, C)`` (a ViT's tokens)
====================  =========================  =============================

Example::

    >>> import torch, hrperc
    >>> x = torch.arange(2 * 3 * 6 * 8).reshape(2, 3, 6, 8)
    >>> tiles = hrperc.local_crop(x, grid=(2, 4))        # (2*8, 3, 3, 2)
    >>> torch.equal(hrperc.local_merge(tiles, (2, 4)), x)
    True
    >>> hrperc.stride_crop(x, (2, 4))[1, 0, 0, 0] == x[0, 0, 0, 1]
    tensor(True)

The module also gives the direct map between the two orders (:func:`window_permutation`,
:func:`permute_windows`): the token permutation that takes a map's contiguous windows to its
strided windows without materialising the map. The DEM and the fused kernel gather with it.
"""

from __future__ import annotations

from typing import Literal

import torch
from einops import rearrange

from .._cache import tensor_cache
from .._errors import public
from .._validation import as_grid, as_pair, check_ndim, check_nonempty
from .geometry import WindowKind, _resolve_tile_size, check_kind

__all__ = [
    "Layout",
    "local_crop",
    "stride_crop",
    "local_merge",
    "stride_merge",
    "crop",
    "merge",
    "window_permutation",
    "permute_windows",
]

Layout = Literal["nchw", "nhwc", "nlc"]

_LAYOUTS = ("nchw", "nhwc", "nlc")

# einops patterns: map side <-> stack side. `i, j` index the sub-image, `h, w` the pixel inside it.
# Contiguous tiles factor each axis as (i h); strided views factor it as (h i).
_PATTERNS = {
    ("nchw", "contiguous"): ("b c (i h) (j w)", "(b i j) c h w"),
    ("nchw", "strided"): ("b c (h i) (w j)", "(b i j) c h w"),
    ("nhwc", "contiguous"): ("b (i h) (j w) c", "(b i j) h w c"),
    ("nhwc", "strided"): ("b (h i) (w j) c", "(b i j) h w c"),
    ("nlc", "contiguous"): ("b (i h j w) c", "(b i j) (h w) c"),
    ("nlc", "strided"): ("b (h i w j) c", "(b i j) (h w) c"),
}
_LAYOUT_DOC = {"nchw": "(B, C, H, W)", "nhwc": "(B, H, W, C)", "nlc": "(B, H*W, C)"}
_STACK_DOC = {"nchw": "(B*N, C, h, w)", "nhwc": "(B*N, h, w, C)", "nlc": "(B*N, h*w, C)"}


def _check_layout(layout) -> None:
    if layout not in _LAYOUTS:
        raise ValueError(
            f"layout={layout!r} is not one of {_LAYOUTS}. Pass one of them, the one matching the input: "
            f"'nchw' for (B, C, H, W) images, 'nhwc' for (B, H, W, C) maps, 'nlc' for (B, H*W, C) tokens."
        )


def _check_nlc_only(value, arg: str, layout: str, name: str) -> None:
    """``size=``/``tile_size=`` describe flat token stacks only; refuse them elsewhere instead of ignoring them."""
    if value is not None and layout != "nlc":
        raise ValueError(
            f"{arg}={value!r} was given with layout={layout!r}, but {arg}= applies only to layout='nlc' "
            f"(flat tokens, whose 2D size the shape cannot tell). With layout={layout!r} the size is read from "
            f"the shape of {name}. Drop {arg}=, or pass flat tokens with layout='nlc'."
        )


_ONE_IMAGE = "pass at least one image (skip the call for an empty batch)"
_ONE_TILE = "pass at least one image's N = gh*gw sub-images (skip the call for an empty batch)"
_ONE_CHANNEL = "pass at least one channel"
_ONE_ROW = "pass a map with at least one row and one column"
_ONE_TOKEN = "pass at least one token per map (H, W >= 1)"
_ONE_TILE_TOKEN = "pass at least one token per sub-image (h, w >= 1)"
_MAP_DIMS = {
    "nchw": (
        ("batch size B", _ONE_IMAGE),
        ("channel count C", _ONE_CHANNEL),
        ("height H", _ONE_ROW),
        ("width W", _ONE_ROW),
    ),
    "nhwc": (
        ("batch size B", _ONE_IMAGE),
        ("height H", _ONE_ROW),
        ("width W", _ONE_ROW),
        ("channel count C", _ONE_CHANNEL),
    ),
    "nlc": (("batch size B", _ONE_IMAGE), ("token count H*W", _ONE_TOKEN), ("channel count C", _ONE_CHANNEL)),
}
_STACK_DIMS = {
    "nchw": (
        ("first dimension B*N", _ONE_TILE),
        ("channel count C", _ONE_CHANNEL),
        ("height h", _ONE_ROW),
        ("width w", _ONE_ROW),
    ),
    "nhwc": (
        ("first dimension B*N", _ONE_TILE),
        ("height h", _ONE_ROW),
        ("width w", _ONE_ROW),
        ("channel count C", _ONE_CHANNEL),
    ),
    "nlc": (
        ("first dimension B*N", _ONE_TILE),
        ("token count h*w", _ONE_TILE_TOKEN),
        ("channel count C", _ONE_CHANNEL),
    ),
}


def _crop(x: torch.Tensor, grid, kind: WindowKind, layout: Layout, size) -> torch.Tensor:
    """:func:`crop` without a public boundary: the public function that calls it names its errors."""
    check_kind(kind, "kind")
    _check_layout(layout)
    gh, gw = as_grid(grid)
    ndim = 3 if layout == "nlc" else 4
    check_ndim(x, ndim, "x", _LAYOUT_DOC[layout])
    _check_nlc_only(size, "size", layout, "x")
    check_nonempty(x, "x", _MAP_DIMS[layout])
    shape = f"x has shape {tuple(x.shape)}"
    if layout == "nchw":
        H, W = x.shape[2], x.shape[3]
    elif layout == "nhwc":
        H, W = x.shape[1], x.shape[2]
    else:
        H, W = _resolve_tile_size(x.shape[1], size, shape=tuple(x.shape), arg="size", what="tokens per map")
    for dim_name, extent, g, gname in (("height", H, gh, "grid height"), ("width", W, gw, "grid width")):
        if extent % g != 0:
            raise ValueError(
                f"{shape}; {dim_name} {extent} is not divisible by {gname} {g}. "
                f"Resize or pad to a multiple of {g} (DualPerspectiveCrop does this)."
            )
    src, dst = _PATTERNS[(layout, kind)]
    return rearrange(x, f"{src} -> {dst}", i=gh, j=gw, h=H // gh)


def _merge(tiles: torch.Tensor, grid, kind: WindowKind, layout: Layout, tile_size) -> torch.Tensor:
    """:func:`merge` without a public boundary: the public function that calls it names its errors."""
    check_kind(kind, "kind")
    _check_layout(layout)
    gh, gw = as_grid(grid)
    ndim = 3 if layout == "nlc" else 4
    check_ndim(tiles, ndim, "tiles", _STACK_DOC[layout])
    _check_nlc_only(tile_size, "tile_size", layout, "tiles")
    check_nonempty(tiles, "tiles", _STACK_DIMS[layout])
    n = gh * gw
    if tiles.shape[0] % n != 0:
        raise ValueError(
            f"tiles has shape {tuple(tiles.shape)}; its first dimension {tiles.shape[0]} must be a "
            f"positive multiple of N = gh*gw = {gh}*{gw} = {n} (index b*N + k). Check the grid or the stack."
        )
    if layout == "nchw":
        h = tiles.shape[2]
    elif layout == "nhwc":
        h = tiles.shape[1]
    else:
        h, _ = _resolve_tile_size(tiles.shape[1], tile_size, shape=tuple(tiles.shape))
    src, dst = _PATTERNS[(layout, kind)]
    return rearrange(tiles, f"{dst} -> {src}", i=gh, j=gw, h=h)


@public
def crop(x: torch.Tensor, grid, kind: WindowKind = "contiguous", *, layout: Layout = "nchw", size=None):
    """Cut ``x`` into ``N = gh*gw`` sub-images, contiguous (local) or strided (global).

    Shapes by ``layout``: ``"nchw"`` ``(B, C, H, W) -> (B*N, C, H//gh, W//gw)``; ``"nhwc"``
    ``(B, H, W, C) -> (B*N, H//gh, W//gw, C)``; ``"nlc"`` ``(B, H*W, C) -> (B*N, h*w, C)`` with
    ``size=(H, W)`` (inferred when ``H*W`` is a perfect square; ``size=`` is refused for the other
    layouts, whose size is in the shape). Sub-image ``k = i*gw + j`` of image ``b`` is at index
    ``b*N + k``. Exactly one copy at most (none when a view suffices). Every dimension of ``x`` must be
    >= 1: an empty input raises instead of returning an empty stack.

    Example::

        >>> x = torch.randn(1, 3, 672, 1008)
        >>> crop(x, (2, 3), "strided").shape
        torch.Size([6, 3, 336, 336])
    """
    return _crop(x, grid, kind, layout, size)


@public
def merge(tiles: torch.Tensor, grid, kind: WindowKind = "contiguous", *, layout: Layout = "nchw", tile_size=None):
    """Exact inverse of :func:`crop`: put ``(B*N, ...)`` sub-images back into ``B`` whole maps.

    Shapes by ``layout``: ``"nchw"`` ``(B*N, C, h, w) -> (B, C, gh*h, gw*w)``; ``"nhwc"``
    ``(B*N, h, w, C) -> (B, gh*h, gw*w, C)``; ``"nlc"`` ``(B*N, h*w, C) -> (B, gh*h*gw*w, C)``
    (row-major) with ``tile_size=(h, w)`` (inferred when ``h*w`` is a perfect square; refused for the
    other layouts). Every dimension of ``tiles`` must be >= 1.

    Example::

        >>> t = torch.randn(2 * 4, 576, 1024)       # 2 images, grid 2x2, 24x24 tokens each
        >>> merge(t, (2, 2), "strided", layout="nlc").shape
        torch.Size([2, 2304, 1024])
    """
    return _merge(tiles, grid, kind, layout, tile_size)


@public
def local_crop(x: torch.Tensor, grid, *, layout: Layout = "nchw", size=None) -> torch.Tensor:
    """Contiguous tiles (paper eq. 11-13): ``(B, C, H, W) -> (B*N, C, H//gh, W//gw)``.

    Tile ``k = i*gw + j`` of image ``b`` (index ``b*N + k``) is ``x[b, :, i*h:(i+1)*h, j*w:(j+1)*w]``.
    ``layout="nhwc"`` takes ``(B, H, W, C)``; ``layout="nlc"`` takes ``(B, H*W, C)`` tokens (with
    ``size=(H, W)`` when not square) and returns ``(B*N, h*w, C)``.

    Example::

        >>> x = torch.arange(24).reshape(1, 1, 4, 6)
        >>> local_crop(x, (2, 3))[4, 0]                 # row 1, column 1
        tensor([[14, 15],
                [20, 21]])
    """
    return _crop(x, grid, "contiguous", layout, size)


@public
def stride_crop(x: torch.Tensor, grid, *, layout: Layout = "nchw", size=None) -> torch.Tensor:
    """Strided global sub-images (paper eq. 16-17): ``(B, C, H, W) -> (B*N, C, H//gh, W//gw)``.

    Pixel ``(r, c)`` of sub-image ``k = i*gw + j`` of image ``b`` (index ``b*N + k``) is
    ``x[b, :, i + r*gh, j + c*gw]``: each sub-image is a full-field, sub-sampled view. Other layouts
    as in :func:`local_crop`.

    Example::

        >>> x = torch.arange(24).reshape(1, 1, 4, 6)
        >>> stride_crop(x, (2, 3))[4, 0]                # offsets (1, 1)
        tensor([[ 7, 10],
                [19, 22]])
    """
    return _crop(x, grid, "strided", layout, size)


@public
def local_merge(tiles: torch.Tensor, grid, *, layout: Layout = "nchw", tile_size=None) -> torch.Tensor:
    """Exact inverse of :func:`local_crop`: ``(B*N, C, h, w) -> (B, C, gh*h, gw*w)``.

    The local half of the 2D-prior recombination: ``F[:, i*h + r, j*w + c] = tiles[b*N + k][:, r, c]``.

    Example::

        >>> x = torch.randn(2, 3, 6, 9)
        >>> torch.equal(local_merge(local_crop(x, (2, 3)), (2, 3)), x)
        True
    """
    return _merge(tiles, grid, "contiguous", layout, tile_size)


@public
def stride_merge(tiles: torch.Tensor, grid, *, layout: Layout = "nchw", tile_size=None) -> torch.Tensor:
    """Exact inverse of :func:`stride_crop`: ``(B*N, C, h, w) -> (B, C, gh*h, gw*w)``.

    The global half of the 2D-prior recombination: ``F[:, i + r*gh, j + c*gw] = tiles[b*N + k][:, r, c]``.

    Example::

        >>> x = torch.randn(2, 6, 9, 5)
        >>> torch.equal(stride_merge(stride_crop(x, (3, 1), layout="nhwc"), (3, 1), layout="nhwc"), x)
        True
    """
    return _merge(tiles, grid, "strided", layout, tile_size)


def _permutation(
    gh: int, gw: int, th: int, tw: int, source: WindowKind, target: WindowKind, device=None
) -> torch.Tensor:
    n, t = gh * gw, th * tw
    ids = torch.arange(n * t, device=device).view(n, t, 1)
    whole = _merge(ids, (gh, gw), source, "nlc", (th, tw))
    return _crop(whole, (gh, gw), target, "nlc", (gh * th, gw * tw)).reshape(n * t)


@tensor_cache(maxsize=64)
def _cached_permutation(gh, gw, th, tw, source, target, device) -> torch.Tensor:
    # Internal: the cached tensor is shared between calls, so it is only ever read (index_select);
    # window_permutation hands out a clone, never this object.
    return _permutation(gh, gw, th, tw, source, target, device)


@public
def window_permutation(grid, tile_size, source: WindowKind, target: WindowKind, device=None) -> torch.Tensor:
    """Token permutation from one window order of a map to the other, without building the map.

    Let ``M`` be a ``(gh*th, gw*tw)`` token map, ``S = crop(M, grid, source)`` and
    ``T = crop(M, grid, target)``, both flattened per image to ``(N*th*tw,)``. The returned
    ``perm`` (``(N*th*tw,)`` int64) satisfies ``T == S[perm]``. With ``source="contiguous",
    target="strided"`` it takes the local sub-features a ViT returns straight to the strided windows
    of the recombined local map (the released DEM's local-as-query side); the reverse takes global
    sub-features to contiguous windows of the recombined global map. Computed once per device and
    cached; each call returns a fresh copy, so modifying the result cannot corrupt later calls.

    Example::

        >>> p = window_permutation((3, 3), (24, 24), "contiguous", "strided")
        >>> p.shape, p[:3]
        (torch.Size([5184]), tensor([0, 3, 6]))
    """
    gh, gw = as_grid(grid)
    th, tw = as_pair(tile_size, "tile_size")
    check_kind(source, "source")
    check_kind(target, "target")
    device = torch.device(device) if device is not None else torch.device("cpu")
    return _cached_permutation(gh, gw, th, tw, source, target, device).clone()


@public
def permute_windows(tokens: torch.Tensor, grid, source: WindowKind, target: WindowKind, *, tile_size=None):
    """Re-order a sub-feature stack from ``source`` windows to ``target`` windows of the same map.

    ``tokens`` is ``(B*N, T, *rest)`` (e.g. ``(B*N, ht*wt, D)`` from a ViT, or ``(B*N, T, heads,
    head_dim)``), sub-image ``k`` of image ``b`` at ``b*N + k``; every dimension must be >= 1. Equal,
    bit for bit, to ``crop(merge(tokens, grid, source), grid, target)`` but done as one gather.

    Example::

        >>> loc = torch.randn(9, 576, 64)               # local_crop order, one image, grid 3x3
        >>> win = permute_windows(loc, (3, 3), "contiguous", "strided")
        >>> torch.equal(win, stride_crop(local_merge(loc, (3, 3), layout="nlc"), (3, 3), layout="nlc"))
        True
    """
    gh, gw = as_grid(grid)
    check_kind(source, "source")
    check_kind(target, "target")
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(
            f"tokens is a {type(tokens).__name__}; expected a torch.Tensor of shape (B*N, T, ...). "
            f"Convert it first, e.g. torch.as_tensor(tokens)."
        )
    if tokens.ndim < 2:
        raise ValueError(
            f"tokens has shape {tuple(tokens.shape)} ({tokens.ndim} dims); expected at least 2 dims "
            f"(B*N, T, ...). Pass the ViT's sub-image stack, e.g. reshape to (B*N, ht*wt, D)."
        )
    rest = tuple(("trailing dimension", "drop or fill the empty feature dimension") for _ in tokens.shape[2:])
    check_nonempty(tokens, "tokens", _STACK_DIMS["nlc"][:2] + rest)
    n = gh * gw
    if tokens.shape[0] % n != 0:
        raise ValueError(
            f"tokens has shape {tuple(tokens.shape)}; its first dimension {tokens.shape[0]} must be a "
            f"positive multiple of N = gh*gw = {gh}*{gw} = {n} (index b*N + k). Check that grid is the one the "
            f"stack was cropped with, and pass whole images' stacks."
        )
    t = tokens.shape[1]
    th, tw = _resolve_tile_size(t, tile_size, shape=tuple(tokens.shape))
    if source == target:
        return tokens
    perm = _cached_permutation(gh, gw, th, tw, source, target, tokens.device)  # read only: no clone needed
    b = tokens.shape[0] // n
    flat = tokens.reshape(b, n * t, *tokens.shape[2:])
    return flat.index_select(1, perm).reshape(tokens.shape)
