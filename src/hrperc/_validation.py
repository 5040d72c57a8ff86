"""Shared argument checks for hrperc's public boundary.

Every message names the argument, what was received, the rule, and the fix, e.g.
``local_crop: grid=(0, 3); grid entries must be integers >= 1. Pass e.g. grid=(3, 3).``
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

__all__ = ["as_pair", "as_grid", "check_ndim", "check_divisible", "check_nonempty"]


def as_pair(value, name: str, fn: str, *, minimum: int = 1) -> tuple[int, int]:
    """Normalise an int or a pair of ints to ``(a, b)`` and check both are integers >= ``minimum``."""
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{fn}: {name}={value!r} is a tensor; pass plain Python ints, e.g. {name}=(3, 3).")
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        pair = (int(value), int(value))
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        pair = tuple(value)
    else:
        raise TypeError(
            f"{fn}: {name}={value!r}; expected an int or a pair of ints (rows, cols). Pass e.g. {name}=(3, 3)."
        )
    for v in pair:
        if not isinstance(v, numbers.Integral) or isinstance(v, bool):
            raise TypeError(
                f"{fn}: {name}={value!r}; entries must be integers, got {type(v).__name__}. "
                f"Pass whole numbers, e.g. {name}=(3, 3)."
            )
        if v < minimum:
            raise ValueError(
                f"{fn}: {name}={value!r}; entries must be integers >= {minimum}. Pass e.g. {name}=(3, 3)."
            )
    return int(pair[0]), int(pair[1])


def as_grid(grid, fn: str) -> tuple[int, int]:
    """``grid`` as ``(gh, gw)`` with both >= 1."""
    return as_pair(grid, "grid", fn)


def check_ndim(x, ndim: int, name: str, fn: str, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{fn}: {name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}. "
            f"Convert it first, e.g. torch.as_tensor({name})."
        )
    if x.ndim != ndim:
        raise ValueError(
            f"{fn}: {name} has shape {tuple(x.shape)} ({x.ndim} dims); expected {ndim} dims {layout}. "
            f"Add or remove the batch dimension (e.g. x.unsqueeze(0)) or pick the matching layout=."
        )


def check_nonempty(x: torch.Tensor, name: str, fn: str, dims) -> None:
    """Refuse a tensor with any zero-size dimension.

    ``dims`` gives, per dimension, ``(what it is, how to fix a zero there)``, e.g.
    ``("batch size B", "pass at least one image")``. An empty input would otherwise give an empty
    result silently (or an arithmetic error deep inside), hiding the bug that produced it.
    """
    for d, (extent, (what, fix)) in enumerate(zip(x.shape, dims)):
        if extent == 0:
            raise ValueError(
                f"{fn}: {name} has shape {tuple(x.shape)}; its {what} (dim {d}) is 0, but every dimension must "
                f"be >= 1 (an empty input has no sub-images to cut or join). Fix: {fix}."
            )


def check_divisible(size: int, by: int, what: str, fn: str, shape, fix: str) -> None:
    if size % by != 0:
        raise ValueError(f"{fn}: {shape}; {what} {size} is not divisible by {by}. {fix}")
