"""Token reduction of an enhanced map back to a ViT-sized token grid (INF-LLaVA eq. 7), and its footprint.

Modes (all from ``(B, Ht, Wt, D)`` to ``(B, oh*ow, D)`` row-major, computed in float32 -- float64 for
float64 inputs -- and cast back):

=============  ==============================================================================
``bilinear``   released: ``F.interpolate(mode="bilinear", align_corners=False, antialias=False)``
``avg``        the paper: ``F.avg_pool2d`` with an integer factor per axis
``area``       ``F.adaptive_avg_pool2d`` (any sizes)
``none``       no reduction; ``oh, ow = Ht, Wt``
=============  ==============================================================================

Every mode is separable: output row ``o`` is a weighted sum of a few input rows ("taps"), likewise for
columns. :func:`axis_taps` gives them exactly as PyTorch computes them (float32 index arithmetic), so
:func:`reduction_footprint` -- which input tokens any output reads with a non-zero weight -- is exact:
bilinear by an odd integer factor ``n`` reads only the centre token of each ``n x n`` block, an even
factor 4 tokens per block, average pooling every token. The DEM uses this to skip work whose result
is never read.

Example::

    >>> import torch
    >>> x = torch.randn(2, 12, 12, 8)                                  # (B, Ht, Wt, D)
    >>> reduce_tokens(x, (4, 4), "bilinear").shape                     # (B, oh*ow, D)
    torch.Size([2, 16, 8])
    >>> reduction_footprint((12, 12), (4, 4), "bilinear").sum().item()  # centres of the 3x3 blocks
    16
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .._cache import tensor_cache
from .._errors import public
from .._validation import as_pair

__all__ = [
    "ReductionMode",
    "REDUCTIONS",
    "reduce_tokens",
    "reduction_footprint",
    "axis_taps",
    "ReductionPlan",
    "reduction_plan",
    "apply_reduction_plan",
]

ReductionMode = Literal["bilinear", "avg", "area", "none"]
REDUCTIONS = ("bilinear", "avg", "area", "none")


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def _check_mode(mode):
    if mode not in REDUCTIONS:
        raise ValueError(f"mode={mode!r} is not a known reduction; pass one of {REDUCTIONS}.")


def _check_sizes(n_in: int, n_out: int, mode: str, axis: str) -> None:
    if mode == "none" and n_out != n_in:
        raise ValueError(
            f"mode='none' keeps every token but the output {axis} {n_out} differs from the input {n_in}. "
            "Leave the output size unset or pick another mode."
        )
    if mode == "avg" and n_in % n_out != 0:
        raise ValueError(
            f"mode='avg' pools by an integer factor, but input {axis} {n_in} is not a multiple of output "
            f"{axis} {n_out}. Use mode='area' (adaptive average) for any size."
        )


@public
@functools.lru_cache(maxsize=256)
def axis_taps(n_in: int, n_out: int, mode: str) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[float, ...], ...]]:
    """Per output index ``o``: the input indices and weights it sums, ``(idx[o], w[o])``, equal length.

    Bilinear follows PyTorch's CPU/CUDA kernel in float32 (``src = max(0, (o + 0.5) * in/out - 0.5)``,
    taps ``floor(src)`` and the next one, clamped). A tap with weight exactly 0 is pointed at a tap
    that is read (weight 0 keeps the sum exact), so it never enlarges the footprint.

    Example::

        >>> axis_taps(9, 3, "bilinear")
        (((1,), (4,), (7,)), ((1.0,), (1.0,), (1.0,)))
    """
    _check_mode(mode)
    _check_sizes(n_in, n_out, mode, "size")
    idx: list[list[int]] = []
    wts: list[list[float]] = []
    for o in range(n_out):
        if mode == "none":
            i, w = [o], [1.0]
        elif mode == "bilinear":
            scale = _f32(n_in / n_out)
            src = _f32(_f32(scale * _f32(o + 0.5)) - 0.5)
            src = max(src, 0.0)
            i0 = min(int(src), n_in - 1)
            i1 = i0 + (1 if i0 < n_in - 1 else 0)
            l1 = _f32(src - i0)
            l0 = _f32(1.0 - l1)
            i, w = [i0, i1], [l0, l1]
        elif mode == "avg":
            f = n_in // n_out
            i, w = list(range(o * f, (o + 1) * f)), [1.0 / f] * f
        else:  # area == adaptive average pooling
            start = (o * n_in) // n_out
            end = -((-(o + 1) * n_in) // n_out)
            i, w = list(range(start, end)), [1.0 / (end - start)] * (end - start)
        idx.append(i)
        wts.append(w)
    # Drop taps that are zero for every output; redirect remaining zero-weight taps to a read index.
    k = max(len(i) for i in idx)
    for o in range(n_out):
        idx[o] += [idx[o][0]] * (k - len(idx[o]))
        wts[o] += [0.0] * (k - len(wts[o]))
    keep = [t for t in range(k) if any(wts[o][t] != 0.0 for o in range(n_out))]
    out_idx, out_w = [], []
    for o in range(n_out):
        live = next(idx[o][t] for t in range(k) if wts[o][t] != 0.0)
        out_idx.append(tuple(idx[o][t] if wts[o][t] != 0.0 else live for t in keep))
        out_w.append(tuple(wts[o][t] for t in keep))
    return tuple(out_idx), tuple(out_w)


def _out_size(in_hw, size, mode):
    if size is None:
        if mode != "none":
            raise ValueError(
                f"mode={mode!r} with size=None; this mode needs an output size. Pass size=(oh, ow), e.g. "
                "size=(24, 24) for CLIP ViT-L/14-336's token grid, or mode='none' to keep every token."
            )
        return in_hw
    return as_pair(size, "size")


@public
def reduction_footprint(in_hw, out_hw, mode: ReductionMode = "bilinear") -> torch.Tensor:
    """``(Ht, Wt)`` bool mask of the input tokens that reach the output of :func:`reduce_tokens`.

    Example::

        >>> reduction_footprint((8, 8), (2, 2), "bilinear").nonzero().tolist()[:4]   # even factor: 4 per block
        [[1, 1], [1, 2], [1, 5], [1, 6]]
    """
    _check_mode(mode)
    ht, wt = as_pair(in_hw, "in_hw")
    oh, ow = _out_size((ht, wt), out_hw, mode)
    for n_in, n_out, axis in ((ht, oh, "height"), (wt, ow, "width")):
        _check_sizes(n_in, n_out, mode, axis)
    rows = torch.zeros(ht, dtype=torch.bool)
    cols = torch.zeros(wt, dtype=torch.bool)
    rows[list(_read(ht, oh, mode))] = True
    cols[list(_read(wt, ow, mode))] = True
    return rows[:, None] & cols[None, :]


def _read(n_in, n_out, mode) -> tuple[int, ...]:
    idx, w = axis_taps(n_in, n_out, mode)
    return tuple(sorted({i for io, wo in zip(idx, w) for i, x in zip(io, wo) if x != 0.0}))


@public
def reduce_tokens(x: torch.Tensor, size=None, mode: ReductionMode = "bilinear") -> torch.Tensor:
    """Reduce a channels-last map ``(B, Ht, Wt, D)`` to ``(B, oh*ow, D)`` row-major tokens.

    The plain-torch reference (``F.interpolate`` / ``F.avg_pool2d`` / ``F.adaptive_avg_pool2d``),
    computed in float32 and cast back to ``x.dtype``. ``size=(oh, ow)``; ``mode="none"`` flattens.

    Example::

        >>> reduce_tokens(torch.randn(1, 6, 9, 4), (2, 3), "avg").shape
        torch.Size([1, 6, 4])
    """
    _check_mode(mode)
    # A wrong type is a TypeError and a wrong shape a ValueError, as for every tensor argument (check_ndim).
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"x is a {type(x).__name__}; expected a torch.Tensor channels-last map (B, Ht, Wt, D). "
            f"Convert it first, e.g. torch.as_tensor(x)."
        )
    if x.ndim != 4:
        raise ValueError(
            f"x has shape {tuple(x.shape)} ({x.ndim} dims); expected a channels-last map (B, Ht, Wt, D). "
            f"Pass the map as (B, Ht, Wt, D), e.g. tokens.view(B, Ht, Wt, D) for (B, Ht*Wt, D) row-major tokens."
        )
    b, ht, wt, d = x.shape
    oh, ow = _out_size((ht, wt), size, mode)
    for n_in, n_out, axis in ((ht, oh, "height"), (wt, ow, "width")):
        _check_sizes(n_in, n_out, mode, axis)
    if mode == "none":
        return x.reshape(b, ht * wt, d)
    y = x.permute(0, 3, 1, 2).to(_compute_dtype(x))
    if mode == "bilinear":
        y = F.interpolate(y, size=(oh, ow), mode="bilinear", align_corners=False, antialias=False)
    elif mode == "avg":
        y = F.avg_pool2d(y, kernel_size=(ht // oh, wt // ow))
    else:
        y = F.adaptive_avg_pool2d(y, (oh, ow))
    return y.permute(0, 2, 3, 1).reshape(b, oh * ow, d).to(x.dtype)


@dataclass(frozen=True)
class ReductionPlan:
    """The reduction restricted to its footprint: per axis, the read indices and taps into them.

    ``rows``/``cols``: input indices read (sorted). ``row_idx[o]`` / ``row_w[o]``: positions *within*
    ``rows`` and weights summed for output row ``o``; the same for columns.
    """

    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    rows: tuple[int, ...]
    cols: tuple[int, ...]
    row_idx: tuple[tuple[int, ...], ...]
    row_w: tuple[tuple[float, ...], ...]
    col_idx: tuple[tuple[int, ...], ...]
    col_w: tuple[tuple[float, ...], ...]


@functools.lru_cache(maxsize=256)
def _plan(in_hw, out_hw, mode) -> ReductionPlan:
    parts = []
    for n_in, n_out in zip(in_hw, out_hw):
        idx, w = axis_taps(n_in, n_out, mode)
        read = _read(n_in, n_out, mode)
        where = {r: j for j, r in enumerate(read)}
        parts.append((read, tuple(tuple(where[i] for i in io) for io in idx), w))
    (rows, ri, rw), (cols, ci, cw) = parts
    return ReductionPlan(in_hw, out_hw, rows, cols, ri, rw, ci, cw)


@public
def reduction_plan(in_hw, out_hw, mode: ReductionMode = "bilinear") -> ReductionPlan:
    """:class:`ReductionPlan` for reducing ``in_hw`` to ``out_hw`` (``None`` for ``mode="none"``). Cached.

    Example::

        >>> p = reduction_plan((9, 6), (3, 2), "bilinear")
        >>> p.rows, p.cols, p.row_w[0]
        ((1, 4, 7), (1, 4), (1.0,))
    """
    _check_mode(mode)
    in_hw = as_pair(in_hw, "in_hw")
    out_hw = _out_size(in_hw, out_hw, mode)
    for n_in, n_out, axis in ((in_hw[0], out_hw[0], "height"), (in_hw[1], out_hw[1], "width")):
        _check_sizes(n_in, n_out, mode, axis)
    return _plan(in_hw, out_hw, mode)


def apply_reduction_plan(read: torch.Tensor, plan: ReductionPlan) -> torch.Tensor:
    """Reduce the footprint tokens ``(B, len(rows)*len(cols), D)`` (row-major) to ``(B, oh*ow, D)``.

    Equal to :func:`reduce_tokens` on the full map (bit for bit when every weight is 1, as for an odd
    bilinear factor; to float32 rounding otherwise). Computed in float32, cast back.

    Example::

        >>> x = torch.randn(1, 9, 6, 4)
        >>> p = reduction_plan((9, 6), (3, 2), "bilinear")
        >>> read = x[:, list(p.rows)][:, :, list(p.cols)].reshape(1, -1, 4)
        >>> torch.equal(apply_reduction_plan(read, p), reduce_tokens(x, (3, 2)))
        True
    """
    b, _, d = read.shape
    nr, nc = len(plan.rows), len(plan.cols)
    x = read.reshape(b, nr, nc, d).to(_compute_dtype(read))
    x = _taps(x, plan.col_idx, plan.col_w, dim=2)
    x = _taps(x, plan.row_idx, plan.row_w, dim=1)
    return x.reshape(b, plan.out_hw[0] * plan.out_hw[1], d).to(read.dtype)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 as released (half types are upcast); float64 stays float64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _taps(x: torch.Tensor, idx, w, dim: int) -> torch.Tensor:
    kind, index, weight = _cached_tap_tensors(idx, w, x.shape[dim], x.device, x.dtype)
    if kind == "identity":
        return x
    if kind == "select":
        return x.index_select(dim, index[0])
    shape = [1] * x.ndim
    shape[dim] = len(idx)
    out = x.index_select(dim, index[0]) * weight[0].reshape(shape)
    for t in range(1, len(index)):  # k <= a few taps (2 for bilinear), not a loop over tiles or windows
        out = out + x.index_select(dim, index[t]) * weight[t].reshape(shape)
    return out


def _tap_tensors(idx, w, n_in: int, device, dtype):
    """``(kind, per-tap index tensors, per-tap weight tensors)`` for one axis of a :class:`ReductionPlan`.

    ``kind``: ``"identity"`` (every output reads its own input with weight 1), ``"select"`` (one tap of
    weight 1: a gather), else ``"weighted"``.
    """
    k = len(idx[0])
    if k == 1 and all(wo[0] == 1.0 for wo in w):
        if len(idx) == n_in and all(i[0] == o for o, i in enumerate(idx)):
            return "identity", (), ()
        return "select", (torch.tensor([i[0] for i in idx], device=device),), ()
    index = tuple(torch.tensor([i[t] for i in idx], device=device) for t in range(k))
    weight = tuple(torch.tensor([wo[t] for wo in w], dtype=dtype, device=device) for t in range(k))
    return "weighted", index, weight


@tensor_cache(maxsize=256)
def _cached_tap_tensors(idx, w, n_in: int, device, dtype):
    """:func:`_tap_tensors`, built once per (axis plan, device, dtype) rather than on every forward."""
    return _tap_tensors(idx, w, n_in, device, dtype)
