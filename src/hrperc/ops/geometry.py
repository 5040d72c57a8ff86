"""Window geometry: how a ``(gh*th, gw*tw)`` token map splits into ``N = gh*gw`` windows, written once.

Every part of hrperc that cuts, joins or indexes windows uses this module: the crops and merges
(:mod:`hrperc.ops.crop`), the attention backends and their argument checks, the DEM's index planner,
the fused Triton kernel (which compiles :func:`window_of` and :func:`map_position` into its index
arithmetic) and the attention pictures.

A map of ``Ht x Wt = (gh*th) x (gw*tw)`` tokens has two window kinds, each a way to cut it into
``N`` windows of ``th x tw`` tokens (window ``w = a*gw + e``, token ``t = u*tw + v`` inside it):

==============  =======================================  =============================================
kind            map position of token ``t`` of window ``w``  window holding map position ``(R, C)``
==============  =======================================  =============================================
``contiguous``  ``(a*th + u, e*tw + v)``                   ``w = (R//th)*gw + C//tw``, ``t = (R%th)*tw + C%tw``
``strided``     ``(a + u*gh, e + v*gw)``                   ``w = (R%gh)*gw + C%gw``, ``t = (R//gh)*tw + C//gw``
==============  =======================================  =============================================

``contiguous`` windows are the local crop of the map (tiles), ``strided`` windows its strided crop
(interleaved full-field views). A token stack ``(B*N, th*tw, ...)`` is in one *order*: the window
kind it was cut in (sub-image ``k`` of image ``b`` at ``b*N + k``); ``"map"`` names the row-major map
``(B, Ht*Wt, ...)`` itself, at row ``R*Wt + C``.

The index functions work on Python ints, on integer tensors (element-wise) and, compiled with
``triton.jit``, on Triton blocks: they only use ``+ - * // %`` and branch on the kind code (0 for
contiguous, 1 for strided; :data:`KIND_CODE`), which the kernel passes as a compile-time constant.

**Tile-size inference** (:func:`infer_tile_size`): a flat token count says nothing about the window's
shape, so the shape is inferred only when the count is a perfect square (``576 -> (24, 24)``);
anything else needs ``tile_size=(th, tw)``, and a count that is not a square says so and names the
argument.

Example::

    >>> from hrperc.ops.geometry import map_position, window_of, infer_tile_size
    >>> map_position(4, 0, 3, 3, 2, 2, 1)           # strided window 4 of a 3x3 grid starts at (1, 1)
    (1, 1)
    >>> window_of(1, 1, 3, 3, 2, 2, 1)
    (4, 0)
    >>> infer_tile_size(576)
    (24, 24)
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from .._errors import public
from .._validation import as_grid, as_pair

__all__ = [
    "WindowKind",
    "Order",
    "WINDOW_KINDS",
    "ORDERS",
    "KIND_CODE",
    "ORDER_CODE",
    "check_kind",
    "check_order",
    "infer_tile_size",
    "check_window_stacks",
    "axis_window",
    "axis_position",
    "window_of",
    "map_position",
    "window_mask",
]

WindowKind = Literal["contiguous", "strided"]
Order = Literal["contiguous", "strided", "map"]

#: The two window kinds of a map.
WINDOW_KINDS: tuple[str, ...] = ("contiguous", "strided")
#: The orders a token tensor can be in: a stack in one window kind, or the row-major map.
ORDERS: tuple[str, ...] = ("contiguous", "strided", "map")
#: Integer codes of the kinds for the index functions (and the Triton kernel's constexpr arguments).
KIND_CODE = {"contiguous": 0, "strided": 1}
ORDER_CODE = {"contiguous": 0, "strided": 1, "map": 2}

_KIND_FIX = "'contiguous' for local tiles, 'strided' for interleaved full-field views"


def check_kind(value, name: str) -> WindowKind:
    """``value`` if it is a window kind, else a ``ValueError`` naming ``name`` and the choices."""
    if value not in WINDOW_KINDS:
        raise ValueError(f"{name}={value!r} is not a window kind; pass one of {WINDOW_KINDS} ({_KIND_FIX}).")
    return value


def check_order(value, name: str, *, allow_map: bool = True) -> Order:
    """``value`` if it is an order (a window kind, or ``"map"`` when ``allow_map``), else a ``ValueError``."""
    choices = ORDERS if allow_map else WINDOW_KINDS
    if value not in choices:
        extra = ", or 'map' for the row-major map" if allow_map else ""
        raise ValueError(f"{name}={value!r} is not an order; pass one of {choices} ({_KIND_FIX}{extra}).")
    return value


def _resolve_tile_size(
    tokens: int, tile_size=None, *, shape=None, arg: str = "tile_size", what: str = "tokens per sub-image"
) -> tuple[int, int]:
    """:func:`infer_tile_size` without a public boundary, for hrperc's own callers (the crops and merges, the
    window checks) on their hot paths: the same checks, named by the caller's boundary (``local_crop: ...``)."""
    where = f"input has shape {tuple(shape)}; " if shape is not None else ""
    if tile_size is None:
        side = math.isqrt(tokens) if tokens >= 0 else -1
        if side < 1 or side * side != tokens:
            raise ValueError(
                f"{where}{tokens} {what} is not a perfect square, so the 2D size cannot be inferred "
                f"(only square sizes are). Pass {arg}=(rows, cols)."
            )
        return side, side
    th, tw = as_pair(tile_size, arg)
    if th * tw != tokens:
        raise ValueError(
            f"{where}{tokens} {what}, but {arg}=({th}, {tw}) holds {th * tw}. Pass the true (rows, cols), "
            f"e.g. {arg}=(24, 24) for 576 tokens."
        )
    return th, tw


@public
def infer_tile_size(
    tokens: int,
    tile_size=None,
    *,
    shape=None,
    arg: str = "tile_size",
    what: str = "tokens per sub-image",
) -> tuple[int, int]:
    """The ``(rows, cols)`` of a window (or map) of ``tokens`` flat tokens.

    ``tile_size`` given: checked to hold exactly ``tokens`` and returned. ``None``: the square
    ``(s, s)`` when ``tokens = s*s``, else a ``ValueError`` saying the count is not a square and naming
    ``arg`` (the caller's argument name, ``tile_size`` or ``size``). ``shape`` is the caller's input
    shape, quoted in messages.

    Example::

        >>> infer_tile_size(24, (4, 6))
        (4, 6)
        >>> infer_tile_size(24)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: infer_tile_size: 24 tokens per sub-image is not a perfect square, ... Pass tile_size=(rows, cols).
    """
    return _resolve_tile_size(tokens, tile_size, shape=shape, arg=arg, what=what)


def check_window_stacks(grid, tile_size=None, *, ndim: int = 3, layout: str = "(B*N, T, D)", **stacks):
    """Check window stacks that must describe the same maps; return ``((gh, gw), (th, tw))``.

    Each of ``stacks`` (by name, e.g. ``q=q, k=k``) must be a tensor of ``ndim`` dims, all of the same
    shape ``(B*N, T, ...)`` with ``B*N`` a positive multiple of ``N = gh*gw``; ``T = th*tw`` is checked
    against ``tile_size`` or inferred when square (:func:`infer_tile_size`). Errors name no caller: the
    caller's public boundary adds its name (:func:`hrperc._errors.public`).

    Example::

        >>> check_window_stacks((2, 2), local=torch.zeros(8, 9, 4), strided=torch.zeros(8, 9, 4))
        ((2, 2), (3, 3))
    """
    gh, gw = as_grid(grid)
    if not stacks:
        raise TypeError("check_window_stacks needs at least one stack, passed by name (e.g. q=q).")
    first_name, first = next(iter(stacks.items()))  # checked first in the loop, before any comparison
    for name, t in stacks.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"{name} is a {type(t).__name__}; expected a torch.Tensor of shape {layout}. "
                f"Convert it first, e.g. torch.as_tensor({name})."
            )
        if t.ndim != ndim:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} ({t.ndim} dims); expected {ndim} dims {layout}."
                + (" Split heads first, e.g. x.unflatten(-1, (heads, -1))." if ndim == 4 else "")
            )
        if t.shape != first.shape:
            raise ValueError(
                f"{first_name} {tuple(first.shape)} and {name} {tuple(t.shape)} must have the same shape "
                f"{layout}: both describe maps cut into the same windows."
            )
    n = gh * gw
    if first.shape[0] == 0 or first.shape[0] % n != 0:
        raise ValueError(
            f"{first_name} has shape {tuple(first.shape)}; its first dimension {first.shape[0]} must be a "
            f"positive multiple of N = gh*gw = {gh}*{gw} = {n} (sub-image k of image b at b*N + k). Pass the grid "
            f"the sub-images were cut with."
        )
    th, tw = _resolve_tile_size(first.shape[1], tile_size, shape=tuple(first.shape))
    return (gh, gw), (th, tw)


# ----------------------------------------------------------------------------------------------------
# Index maths. Per axis (used by the DEM planner) and per map position (also compiled by the Triton
# kernel, so these two are self-contained: plain + - * // % and a branch on the kind code).


def axis_window(r, g, t, kind):
    """Along one axis (``g`` windows of ``t`` tokens): map row ``r`` -> (window index, index inside it).

    ``kind``: 0 contiguous, 1 strided (:data:`KIND_CODE`).

    Example::

        >>> axis_window(5, 3, 2, 0), axis_window(5, 3, 2, 1)
        ((2, 1), (2, 1))
    """
    if kind == 0:
        a = r // t
        u = r % t
    else:
        a = r % g
        u = r // g
    return a, u


def axis_position(a, u, g, t, kind):
    """Inverse of :func:`axis_window`: index ``u`` inside window ``a`` -> map row.

    Example::

        >>> axis_position(2, 1, 3, 2, 0), axis_position(2, 1, 3, 2, 1)
        (5, 5)
    """
    if kind == 0:
        r = a * t + u
    else:
        r = u * g + a
    return r


def window_of(row, col, GH, GW, TH, TW, KIND):  # noqa: N803 - the kernel's constexpr names
    """Map position ``(row, col)`` -> ``(window, token)`` for windows of ``KIND`` (0 contiguous, 1 strided).

    Example::

        >>> window_of(3, 5, 2, 2, 2, 3, 0), window_of(3, 5, 2, 2, 2, 3, 1)
        ((3, 5), (3, 5))
    """
    if KIND == 0:
        win = (row // TH) * GW + col // TW
        tok = (row % TH) * TW + col % TW
    else:
        win = (row % GH) * GW + col % GW
        tok = (row // GH) * TW + col // GW
    return win, tok


def map_position(win, tok, GH, GW, TH, TW, KIND):  # noqa: N803 - the kernel's constexpr names
    """Inverse of :func:`window_of`: token ``tok`` of window ``win`` -> map position ``(row, col)``.

    Example::

        >>> map_position(3, 5, 2, 2, 2, 3, 0), map_position(3, 5, 2, 2, 2, 3, 1)
        ((3, 5), (3, 5))
    """
    a = win // GW
    e = win % GW
    u = tok // TW
    v = tok % TW
    if KIND == 0:
        row = a * TH + u
        col = e * TW + v
    else:
        row = a + u * GH
        col = e + v * GW
    return row, col


@public
def window_mask(position, grid, tile_size, kind: str) -> torch.Tensor:
    """``(Ht, Wt)`` bool map of the window of ``kind`` that holds map ``position = (R, C)``.

    Example::

        >>> window_mask((0, 0), (2, 2), (2, 2), "strided").int()
        tensor([[1, 0, 1, 0],
                [0, 0, 0, 0],
                [1, 0, 1, 0],
                [0, 0, 0, 0]], dtype=torch.int32)
    """
    (gh, gw), (th, tw) = as_grid(grid), as_pair(tile_size, "tile_size")
    code = KIND_CODE[check_kind(kind, "kind")]
    R, C = as_pair(position, "position", minimum=0)
    if R >= gh * th or C >= gw * tw:
        raise ValueError(
            f"position=({R}, {C}) is outside the {gh * th}x{gw * tw} map of grid {(gh, gw)} and tile "
            f"{(th, tw)}. Pass a position with 0 <= R < {gh * th} and 0 <= C < {gw * tw}."
        )
    rows, cols = torch.arange(gh * th)[:, None], torch.arange(gw * tw)[None, :]
    target, _ = window_of(R, C, gh, gw, th, tw, code)
    win, _ = window_of(rows, cols, gh, gw, th, tw, code)
    return win == target
