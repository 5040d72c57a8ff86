"""Shared argument checks for hrperc's public boundary.

Every message names the argument, what was received, the rule, and the fix, e.g.
``local_crop: grid=(0, 3); grid entries must be integers >= 1. Pass e.g. grid=(3, 3).``
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "as_pair",
    "as_grid",
    "as_index",
    "as_int",
    "as_image_size",
    "as_bool",
    "as_sequence",
    "check_ndim",
    "check_divisible",
    "check_nonempty",
]


def as_pair(value, name: str, *, minimum: int = 1) -> tuple[int, int]:
    """Normalise an int or a pair of ints to ``(a, b)`` and check both are integers >= ``minimum``."""
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{name}={value!r} is a tensor; pass plain Python ints, e.g. {name}=(3, 3).")
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        pair = (int(value), int(value))
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        pair = tuple(value)
    else:
        raise TypeError(f"{name}={value!r}; expected an int or a pair of ints (rows, cols). Pass e.g. {name}=(3, 3).")
    for v in pair:
        if not isinstance(v, numbers.Integral) or isinstance(v, bool):
            raise TypeError(
                f"{name}={value!r}; entries must be integers, got {type(v).__name__}. "
                f"Pass whole numbers, e.g. {name}=(3, 3)."
            )
        if v < minimum:
            raise ValueError(f"{name}={value!r}; entries must be integers >= {minimum}. Pass e.g. {name}=(3, 3).")
    return int(pair[0]), int(pair[1])


def as_grid(grid) -> tuple[int, int]:
    """``grid`` as ``(gh, gw)`` with both >= 1."""
    return as_pair(grid, "grid")


def check_ndim(x, ndim: int, name: str, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}. "
            f"Convert it first, e.g. torch.as_tensor({name})."
        )
    if x.ndim != ndim:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)} ({x.ndim} dims); expected {ndim} dims {layout}. "
            f"Add or remove the batch dimension (e.g. x.unsqueeze(0)) or pick the matching layout=."
        )


def check_nonempty(x: torch.Tensor, name: str, dims) -> None:
    """Refuse a tensor with any zero-size dimension.

    ``dims`` gives, per dimension, ``(what it is, how to fix a zero there)``, e.g.
    ``("batch size B", "pass at least one image")``. An empty input would otherwise give an empty
    result silently (or an arithmetic error deep inside), hiding the bug that produced it.
    """
    for d, (extent, (what, fix)) in enumerate(zip(x.shape, dims)):
        if extent == 0:
            raise ValueError(
                f"{name} has shape {tuple(x.shape)}; its {what} (dim {d}) is 0, but every dimension must "
                f"be >= 1 (an empty input has no sub-images to cut or join). Fix: {fix}."
            )


def check_divisible(size: int, by: int, what: str, shape, fix: str) -> None:
    if size % by != 0:
        raise ValueError(f"{shape}; {what} {size} is not divisible by {by}. {fix}")


# --- sizes, counts and switches given by users ----------------------------------------------------
def as_index(value) -> int | None:
    """``value`` as a Python int when it is an integer scalar, else ``None``.

    Integer scalars are what Python itself takes as an index (``operator.index``): ints, numpy integers,
    0-dim integer arrays and tensors. Bools (``True`` is not a size), floats (even ``10.0``), strings and
    arrays or tensors with any dimension are not.
    """
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, torch.Tensor):
        if value.ndim != 0 or value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            return None
    elif isinstance(value, np.ndarray) and (value.ndim != 0 or value.dtype.kind not in "iu"):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def as_int(value, name: str, *, minimum: int = 1, example: str | None = None) -> int:
    """An integer option (``max_tiles=``, ``downsample=``, ...) as a Python int >= ``minimum``.

    Integer scalars are taken (see :func:`as_index`); anything else is a ``TypeError``, a value under
    ``minimum`` a ``ValueError``, both naming ``name`` and the value.
    """
    example = example or f"{name}={max(minimum, 1)}"
    n = as_index(value)
    if n is None:
        raise TypeError(
            f"{name}={value!r} is a {type(value).__name__}; it must be a whole number (an int) >= {minimum}. "
            f"Pass e.g. {example}."
        )
    if n < minimum:
        raise ValueError(f"{name}={value!r}; it must be an integer >= {minimum}. Pass e.g. {example}.")
    return n


def as_image_size(value, name: str = "image_size") -> tuple[int, int]:
    """An image size ``(H, W)`` as two Python ints >= 1.

    Accepted: a tuple, list or ``torch.Size`` of two integer scalars (ints, numpy integers, 0-dim integer
    tensors; see :func:`as_index`), or a 1-D integer array / tensor of two entries (e.g. a row of a
    processor's ``image_sizes``). Refused, naming the value: a bare int (``(H, W)`` is two numbers), any
    other length, bools, floats (``10.7``, but also ``10.0``), strings, and sides < 1 (an image of height 0
    has no pixels: a size that cannot be an image's is a bug upstream, never a token count).
    """
    shown = value
    if isinstance(value, (torch.Tensor, np.ndarray)):
        integer = (
            value.dtype.kind in "iu"
            if isinstance(value, np.ndarray)
            else not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
        )
        if value.ndim != 1 or not integer:
            raise TypeError(
                f"{name}={value!r} is a {type(value).__name__} of shape {tuple(value.shape)} and dtype "
                f"{value.dtype}; an image size is two whole numbers (H, W). Pass e.g. {name}=(480, 640), or "
                f"{name}=tuple(x.tolist()) for a 1-D integer tensor x."
            )
        value = value.tolist()
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)) or len(value) != 2:
        sequence = isinstance(value, Sequence) and not isinstance(value, (str, bytes))
        got = f"has length {len(value)}" if sequence else f"is of type {type(value).__name__}"
        raise TypeError(
            f"{name}={shown!r} {got}; an image size is a pair (H, W) of whole numbers. Pass e.g. "
            f"{name}=(480, 640) (img.shape[-2:] of a (C, H, W) tensor; (h, h) for a square)."
        )
    sides: list[int] = []
    for v in value:
        n = as_index(v)
        if n is None:
            raise TypeError(
                f"{name}={shown!r}; both sides must be whole numbers (ints), got a {type(v).__name__} "
                f"({v!r}). Pass integer pixel counts, e.g. {name}=(480, 640) (round or int() a computed size)."
            )
        sides.append(n)
    if min(sides) < 1:
        raise ValueError(
            f"{name}={shown!r}; both sides must be integers >= 1 (an image with a side of "
            f"{min(sides)} pixels has no pixels to encode). Pass the (H, W) of a non-empty image, e.g. "
            f"{name}=(480, 640)."
        )
    return sides[0], sides[1]


def as_bool(value, name: str) -> bool:
    """A switch (``dcm=``, ``newline=``, ``check_range=``, ...) as a Python bool.

    ``True``/``False`` and numpy's ``bool_`` (what a numpy comparison returns) are taken; anything else
    is a ``TypeError`` naming the option and the value: a string is truthy whatever it says
    (``"false"`` would turn the option on), and a number, a tensor or ``None`` given for a switch is
    more likely a mix-up of arguments than a truth value.
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(
        f"{name}={value!r} is a {type(value).__name__}, not a bool; pass {name}=True or {name}=False "
        f"(a string such as 'false' is truthy; convert a flag read from text or a tensor with an explicit test)."
    )


def as_sequence(value, name: str, *, example: str) -> tuple:
    """A list option (``pinpoints=``, ``scales=``) as a non-empty tuple.

    Tuples, lists and ranges are taken as they are; numpy arrays and tensors are converted with
    ``.tolist()`` (their entries are then checked by the caller like any list's). An empty sequence is
    a ``ValueError`` (it is never read as "use the defaults": leave the option out for those); a
    string, a set, a generator or a scalar is a ``TypeError``. ``example`` is a valid value for the fix.
    """
    shown = value
    if isinstance(value, (torch.Tensor, np.ndarray)):
        value = value.tolist()
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        raise TypeError(f"{name}={shown!r} is a {type(shown).__name__}; pass a list or tuple, e.g. {name}={example}.")
    if len(value) == 0:
        raise ValueError(
            f"{name}={shown!r} is empty; pass at least one entry, e.g. {name}={example}, or leave {name} "
            f"out for the recipe's default."
        )
    return tuple(value)
