"""Per-window cross-attention between two recombined token maps (INF-LLaVA DEM, Sec. 4.3.2-4.3.3).

The window kinds, the stack orders and the index maths are described in :mod:`hrperc.attention`
and :mod:`hrperc.ops.geometry`.

Three layers, as in timm/flash-attn:

* :func:`window_attention` -- attention core on projected ``(B*N, T, heads, head_dim)`` tensors,
  dispatched to a registered :class:`~hrperc.attention.AttentionBackend` (:mod:`hrperc.attention.dispatch`):
  ``"reference"`` (plain math, the definition), ``"sdpa"``
  (:func:`torch.nn.functional.scaled_dot_product_attention`), ``"triton"`` (the fused kernel) and
  any you register. ``backend="auto"`` takes the highest-priority backend that may run automatically
  on the inputs' device and supports them (the kernel on CUDA, else SDPA);
  ``HRPERC_ATTN_BACKEND=<name>`` or ``with hrperc.attention_backend("<name>"):`` force one.
* :func:`window_cross_attention` -- the functional form with q/k/v/out projections (with bias).
* :class:`~hrperc.WindowCrossAttention` (:mod:`hrperc.attention.module`) -- the module holding the
  four ``Linear(D, D)`` (released key order ``linears.0..3`` = q, k, v, out) and the released
  residual + LayerNorm (``ln``).

Arguments are checked once, by the public function the user called (:func:`check_options` and
:func:`as_scale` shared by the three); the backends receive them checked and normalised
(:class:`~hrperc.attention.WindowAttentionFn`) and check nothing again.

Example::

    >>> import torch, hrperc
    >>> q, kv = torch.randn(2 * 4, 16, 2, 8), torch.randn(2 * 4, 16, 2, 8)  # B=2, grid 2x2, 4x4 tiles, 2 heads
    >>> hrperc.window_attention(q, kv, kv, (2, 2), window="contiguous", q_order="strided",
    ...                         kv_order="contiguous", out_order="map").shape   # (B, Ht*Wt, heads, head_dim)
    torch.Size([2, 64, 2, 8])
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from .._errors import public
from .._validation import as_int
from ..ops.geometry import WindowKind, check_kind, check_order, check_window_stacks
from .backend import check_output
from .dispatch import resolve_backend

__all__ = ["window_attention", "window_cross_attention", "OutOrder"]

OutOrder = Literal["contiguous", "strided", "map"]

_QKV_LAYOUT = "(B*N, T, heads, head_dim)"


@public
def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid,
    *,
    window: WindowKind,
    q_order: WindowKind,
    kv_order: WindowKind,
    out_order: OutOrder | None = None,
    tile_size=None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention inside each window of kind ``window``, on projected sub-feature stacks.

    ``q, k, v``: ``(B*N, T, heads, head_dim)``, ``T = th*tw`` (``tile_size`` inferred when square),
    sub-image ``k`` of image ``b`` at ``b*N + k``. ``q`` is in ``q_order`` window order of the query
    map, ``k``/``v`` in ``kv_order`` order of the key/value map. Window ``w``'s queries attend to window
    ``w``'s keys/values, no mask, ``scale`` default ``1/sqrt(head_dim)``. Returns
    ``(B*N, T, heads, head_dim)`` in ``out_order`` window order of the output map (default
    ``window``), or ``(B, Ht*Wt, heads, head_dim)`` row-major for ``out_order="map"``. The backend's
    result is checked: another shape (one that would broadcast included), dtype or device, or
    something other than one tensor, raises ``ValueError`` / ``TypeError`` naming the backend.

    Every argument is checked here, once, for every backend: a backend gets them checked and
    normalised. What a backend cannot run (a dtype, a head dim, a device) it says through
    :meth:`~hrperc.attention.AttentionBackend.supports` (``NotImplementedError``).

    Example::

        >>> q = k = v = torch.randn(2 * 9, 16, 4, 8)                # B=2, grid 3x3, 4x4 tiles
        >>> o = window_attention(q, k, v, (3, 3), window="strided", q_order="contiguous",
        ...                      kv_order="strided", out_order="map")
        >>> o.shape
        torch.Size([2, 144, 4, 8])
    """
    out_order = check_options(window, q_order, kv_order, out_order)
    grid, tile_size = check_window_stacks(grid, tile_size, ndim=4, layout=_QKV_LAYOUT, q=q, k=k, v=v)
    check_same_dtype_device(q, k, v)
    scale = as_scale(scale, q.shape[-1])
    return run_backend(
        q,
        k,
        v,
        grid,
        window=window,
        q_order=q_order,
        kv_order=kv_order,
        out_order=out_order,
        tile_size=tile_size,
        scale=scale,
        backend=backend,
    )


@public
def window_cross_attention(
    query_feats: torch.Tensor,
    kv_feats: torch.Tensor,
    grid,
    window: WindowKind,
    q_order: WindowKind,
    kv_order: WindowKind,
    *,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    v_weight: torch.Tensor,
    out_weight: torch.Tensor,
    q_bias: torch.Tensor | None = None,
    k_bias: torch.Tensor | None = None,
    v_bias: torch.Tensor | None = None,
    out_bias: torch.Tensor | None = None,
    heads: int,
    out_order: OutOrder = "map",
    tile_size=None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Windowed multi-head cross-attention on ViT sub-feature stacks, with q/k/v/out projections.

    ``query_feats``, ``kv_feats``: ``(B*N, ht*wt, D)`` in ``q_order`` / ``kv_order`` window order of
    their maps (local sub-features: ``"contiguous"``; strided sub-features: ``"strided"``). Weights are
    ``Linear`` weights ``(D, D)`` (biases ``(D,)``); ``D % heads == 0``. Returns
    ``out_proj(attention)`` as ``(B, Ht*Wt, D)`` for ``out_order="map"`` (default) or
    ``(B*N, ht*wt, D)`` in a window order. The projections run on the stacks as given (a projection
    is per token, so it commutes with the window gather, which then moves ``heads*head_dim`` rows).

    Example::

        >>> D, h = 32, 4
        >>> w = [torch.randn(D, D) * D**-0.5 for _ in range(4)]
        >>> x = torch.randn(9, 16, D)                                  # B=1, grid 3x3, 4x4 tiles
        >>> window_cross_attention(x, x, (3, 3), "strided", "contiguous", "strided", q_weight=w[0],
        ...     k_weight=w[1], v_weight=w[2], out_weight=w[3], heads=h).shape
        torch.Size([1, 144, 32])
    """
    grid, tile_size = check_window_stacks(
        grid, tile_size, layout="(B*N, ht*wt, D)", query_feats=query_feats, kv_feats=kv_feats
    )
    d = query_feats.shape[-1]
    heads = as_int(heads, "heads", example="heads=8")
    if d % heads != 0:
        raise ValueError(f"heads={heads!r} must be a positive int dividing D={d}; e.g. heads=8 for D=1024.")
    out_order = check_options(window, q_order, kv_order, out_order)
    out = project_attend(
        query_feats,
        kv_feats,
        grid,
        window,
        q_order,
        kv_order,
        q_weight,
        q_bias,
        k_weight,
        k_bias,
        v_weight,
        v_bias,
        heads=heads,
        out_order=out_order,
        tile_size=tile_size,
        scale=as_scale(scale, d // heads),
        backend=backend,
    )
    return F.linear(out, out_weight, out_bias)


# --- the one check of each argument, shared by the three public forms --------------------------------


def check_options(window, q_order, kv_order, out_order) -> OutOrder:
    """Check the window kind and the three orders; return ``out_order`` (default: ``window``).

    ``q_order`` / ``kv_order`` are window orders (stacks); ``out_order`` may also be ``"map"``.
    """
    check_kind(window, "window")
    check_order(q_order, "q_order", allow_map=False)
    check_order(kv_order, "kv_order", allow_map=False)
    return window if out_order is None else check_order(out_order, "out_order")


def as_scale(scale, head_dim: int) -> float:
    """``scale`` as a Python float: ``None`` gives ``1/sqrt(head_dim)``; else a finite real number.

    A string, a bool or anything ``float()`` refuses is a ``TypeError``, a NaN or infinity a ``ValueError``.
    While ``torch.compile`` traces, a float argument may be symbolic: its finiteness is then not tested
    (that would guard on its value).
    """
    if scale is None:
        return float(head_dim**-0.5)
    fix = "pass a finite float, e.g. scale=0.125, or None (the default, 1/sqrt(head_dim))."
    if isinstance(scale, (str, bytes, bool)):  # float() would take "0.5" and True
        raise TypeError(f"scale={scale!r} is a {type(scale).__name__}; {fix}")
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise TypeError(f"scale={scale!r} is a {type(scale).__name__}, not a number; {fix}") from None
    if not torch.compiler.is_compiling() and not math.isfinite(value):
        raise ValueError(f"scale={scale!r} is not finite; {fix}")
    return value


def check_same_dtype_device(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """``q``, ``k``, ``v`` share one dtype and one device (a backend is handed them as one set)."""
    if q.dtype != k.dtype or q.dtype != v.dtype or q.device != k.device or q.device != v.device:
        raise TypeError(
            f"q/k/v must share dtype and device, got dtypes {q.dtype}/{k.dtype}/{v.dtype} on devices "
            f"{q.device}/{k.device}/{v.device}. Cast and move them together, e.g. k, v = k.to(q), v.to(q)."
        )


# --- after the checks ---------------------------------------------------------------------------


def run_backend(q, k, v, grid, *, window, q_order, kv_order, out_order, tile_size, scale, backend) -> torch.Tensor:
    """Checked, normalised arguments -> the chosen backend -> its result, checked (never trusted)."""
    kw = dict(window=window, q_order=q_order, kv_order=kv_order, out_order=out_order, tile_size=tile_size, scale=scale)
    chosen = resolve_backend(backend, q, k, v, grid=grid, **kw)
    out = chosen.fn(q, k, v, grid, **kw)
    # a registered backend's result is checked, never trusted: a wrong shape would broadcast downstream
    if out_order == "map":
        n = grid[0] * grid[1]
        shape, layout = (q.shape[0] // n, q.shape[1] * n, *q.shape[2:]), "(B, Ht*Wt, heads, head_dim)"
    else:
        shape, layout = q.shape, _QKV_LAYOUT
    return check_output(chosen, out, shape, q, form="fn", layout=layout)


def project_attend(
    query_feats,
    kv_feats,
    grid,
    window,
    q_order,
    kv_order,
    q_weight,
    q_bias,
    k_weight,
    k_bias,
    v_weight,
    v_bias,
    *,
    heads,
    out_order,
    tile_size,
    scale,
    backend,
):
    """Checked inputs -> q/k/v projections -> :func:`run_backend` -> heads merged, before ``out_proj``.

    The public caller has checked the stacks, ``grid``, ``tile_size``, ``heads``, the options
    (:func:`check_options`) and ``scale`` (:func:`as_scale`); only the projections' dtypes and devices,
    which the weights decide, are checked here.
    """
    bn, t, d = query_feats.shape
    hd = d // heads
    q = F.linear(query_feats, q_weight, q_bias).view(bn, t, heads, hd)
    # Two matmuls on the same input (no per-call concatenation of the k and v weights).
    k = F.linear(kv_feats, k_weight, k_bias).view(bn, t, heads, hd)
    v = F.linear(kv_feats, v_weight, v_bias).view(bn, t, heads, hd)
    check_same_dtype_device(q, k, v)
    out = run_backend(
        q,
        k,
        v,
        grid,
        window=window,
        q_order=q_order,
        kv_order=kv_order,
        out_order=out_order,
        tile_size=tile_size,
        scale=scale,
        backend=backend,
    )
    return out.reshape(*out.shape[:2], d)
