"""Per-window cross-attention between two recombined token maps (INF-LLaVA DEM, Sec. 4.3.2-4.3.3).

Both maps ``(B, Ht, Wt, D)`` (``Ht = gh*th``) are partitioned the same way into ``N = gh*gw``
windows of ``th*tw`` tokens, either **contiguous** (the local crop of the map) or **strided** (the
strided crop); window ``w``'s queries attend to window ``w``'s keys/values only::

    contiguous windows (2x2 grid, 4x4 map)      strided windows (same map)
    +-----+-----+                               a b a b
    | a a | b b |                               c d c d
    | a a | b b |                               a b a b
    +-----+-----+                               c d c d
    | c c | d d |
    | c c | d d |
    +-----+-----+

The inputs are not maps but the stacks a ViT returns, ``(B*N, th*tw, ...)``, each in one window
order of its own map (``q_order`` / ``kv_order``): local sub-features are the contiguous windows of
``F_loc``, strided (global) sub-features the strided windows of ``F_glo``. A stack already in the
attention's window order is read as is; the other is re-ordered with one gather
(:func:`hrperc.permute_windows`), never by merging the map and cropping it again.

Three layers, as in timm/flash-attn:

* :func:`window_attention` -- attention core on projected ``(B*N, T, heads, head_dim)`` tensors with a
  backend switch: ``"reference"`` (plain math, the spec), ``"sdpa"``
  (:func:`torch.nn.functional.scaled_dot_product_attention`), and any registered one (the Triton
  kernel registers ``"triton"``). ``backend="auto"`` picks triton for CUDA tensors when it can run,
  else sdpa; ``HRPERC_ATTN_BACKEND=<name>`` or ``with hrperc.attention_backend("<name>"):`` force one.
  A backend may also register a *query-subset* form (:class:`QuerySubsetFn`: some queries of each
  window against the whole window), which the DEM's skipping path needs; ``"reference"`` and
  ``"sdpa"`` have one, the Triton kernel (whole windows only) has not.
* :func:`window_cross_attention` -- the functional form with q/k/v/out projections (with bias).
* :class:`WindowCrossAttention` -- the module holding the four ``Linear(D, D)`` (released key order
  ``linears.0..3`` = q, k, v, out) and the released residual + LayerNorm (``ln``).

Example::

    >>> import torch, hrperc
    >>> loc, glo = torch.randn(2 * 4, 16, 32), torch.randn(2 * 4, 16, 32)   # B=2, grid 2x2, 4x4 tiles
    >>> attn = hrperc.WindowCrossAttention(32, heads=4)
    >>> out = attn(glo, loc, (2, 2), window="contiguous", q_order="strided", kv_order="contiguous")
    >>> out.shape                                                         # (B, Ht*Wt, D)
    torch.Size([2, 64, 32])
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ._validation import as_grid, as_pair
from .crop import crop, merge, permute_windows

__all__ = [
    "window_attention",
    "window_cross_attention",
    "WindowCrossAttention",
    "register_backend",
    "available_backends",
    "attention_backend",
    "resolve_backend",
    "forced_backend",
    "query_subset_fn",
    "reference_window_attention",
    "sdpa_window_attention",
    "AttentionBackendFn",
    "SupportsFn",
    "QuerySubsetFn",
]

WindowKind = Literal["contiguous", "strided"]
OutOrder = Literal["contiguous", "strided", "map"]
_KINDS = ("contiguous", "strided")
_OUT_ORDERS = ("contiguous", "strided", "map")
ENV_VAR = "HRPERC_ATTN_BACKEND"


class AttentionBackendFn(Protocol):
    """A backend: ``fn(q, k, v, *, grid, tile_size, window, q_order, kv_order, out_order, scale) -> Tensor``.

    Arguments arrive validated and normalised: ``grid``/``tile_size`` are int pairs, ``scale`` a float,
    ``out_order`` one of ``"contiguous"|"strided"|"map"``. Must return ``(B*N, T, heads, head_dim)`` for
    a window order or ``(B, Ht*Wt, heads, head_dim)`` for ``"map"``, in ``q``'s dtype, differentiable.
    """

    def __call__(self, q, k, v, *, grid, tile_size, window, q_order, kv_order, out_order, scale): ...


#: ``supports(q, k, v, **same keywords) -> None`` if the backend can run these inputs, else a reason.
SupportsFn = Callable[..., "str | None"]


class QuerySubsetFn(Protocol):
    """Optional second form of a backend: ``fn(q, k, v, *, scale) -> Tensor``, windows already gathered.

    ``q``: ``(G, heads, M, head_dim)``, ``M`` queries of each of ``G`` windows (a subset of the window's
    ``T`` tokens); ``k``, ``v``: ``(G, heads, T, head_dim)``, the whole window. Returns
    ``softmax(q k^T * scale) v``, ``(G, heads, M, head_dim)``, in ``q``'s dtype, differentiable. The
    DEM's skipping path (``skip_unread=True``) needs it; a backend without it makes the DEM compute every
    token through ``fn`` instead.
    """

    def __call__(self, q, k, v, *, scale): ...


@dataclass(frozen=True)
class _Backend:
    fn: AttentionBackendFn
    supports: SupportsFn
    query_subset: QuerySubsetFn | None = None


_REGISTRY: dict[str, _Backend] = {}
_FORCED = threading.local()


def register_backend(
    name: str, fn: AttentionBackendFn, supports: SupportsFn | None = None, *, query_subset: QuerySubsetFn | None = None
) -> None:
    """Add (or replace) a window-attention backend under ``name``.

    ``supports(q, k, v, **kw)`` returns ``None`` when ``fn`` can run the inputs, else a short reason
    (shown when a forced backend cannot run). ``query_subset`` (optional, :class:`QuerySubsetFn`)
    attends a subset of each window's queries; with it, the DEM's skipping path runs on this backend,
    without it a DEM forced onto this backend computes every token through ``fn``. The Triton kernel
    registers itself as ``"triton"`` (whole windows only).

    Example::

        >>> register_backend("sdpa_copy", sdpa_window_attention, lambda q, k, v, **kw: None)
        >>> "sdpa_copy" in available_backends()
        True
        >>> _ = _REGISTRY.pop("sdpa_copy")
    """
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"register_backend: name={name!r}; give a non-empty name other than 'auto'.")
    if not callable(fn):
        raise TypeError(f"register_backend: fn for {name!r} must be callable, got {type(fn).__name__}.")
    if query_subset is not None and not callable(query_subset):
        raise TypeError(
            f"register_backend: query_subset for {name!r} must be callable or None, got {type(query_subset).__name__}."
        )
    _REGISTRY[name] = _Backend(fn, supports or (lambda q, k, v, **kw: None), query_subset)


def available_backends() -> tuple[str, ...]:
    """Names of the registered window-attention backends, e.g. ``('reference', 'sdpa', 'triton')``."""
    return tuple(_REGISTRY)


@contextlib.contextmanager
def attention_backend(name: str | None):
    """Force a window-attention backend inside a ``with`` block (this thread); ``None`` or ``"auto"`` un-forces.

    Takes precedence over ``HRPERC_ATTN_BACKEND``; an explicit ``backend=`` argument other than
    ``"auto"`` takes precedence over both.

    Example::

        >>> with attention_backend("reference"):
        ...     resolve_backend("auto", *([torch.zeros(4, 4, 1, 8)] * 3), grid=(2, 2), tile_size=(2, 2),
        ...                     window="contiguous", q_order="contiguous", kv_order="contiguous",
        ...                     out_order="contiguous", scale=1.0)
        'reference'
    """
    if name is not None and name != "auto" and name not in _REGISTRY:
        raise ValueError(
            f"attention_backend: name={name!r} is not a registered backend; pass one of "
            f"{available_backends()}, 'auto' or None."
        )
    previous = getattr(_FORCED, "name", None)
    _FORCED.name = None if name == "auto" else name
    try:
        yield
    finally:
        _FORCED.name = previous


def forced_backend(backend: str | None = "auto") -> str | None:
    """The backend forced by ``backend=``, else :func:`attention_backend`, else ``$HRPERC_ATTN_BACKEND``; None if none.

    Raises ``ValueError`` for a name that is not registered, saying where it came from.

    Example::

        >>> forced_backend("reference")
        'reference'
        >>> with attention_backend("sdpa"):
        ...     forced_backend("auto")
        'sdpa'
    """
    if backend is not None and not isinstance(backend, str):
        raise TypeError(
            f"window_attention: backend={backend!r} is not a backend name; pass one of {available_backends()} "
            "or 'auto'."
        )
    forced, source = backend, "backend="
    if backend is None or backend == "auto":
        forced, source = getattr(_FORCED, "name", None), "attention_backend("
        if forced is None:
            forced, source = os.environ.get(ENV_VAR) or None, f"${ENV_VAR}="
            if forced == "auto":
                forced = None
    if forced is not None and forced not in _REGISTRY:
        raise ValueError(
            f"window_attention: {source}{forced!r} is not a registered backend; pass one of "
            f"{available_backends()} or 'auto'."
        )
    return forced


def resolve_backend(backend: str, q, k, v, *, query_subset: bool = False, **kw) -> str:
    """The backend name ``window_attention`` will run for these inputs (see :func:`attention_backend`).

    A forced backend (:func:`forced_backend`) is returned if its ``supports`` accepts the inputs, else
    ``NotImplementedError`` explains why. Unforced (``"auto"``): ``"triton"`` for CUDA tensors it can
    run, else ``"sdpa"``; with ``query_subset=True`` (the DEM's skipping path, which attends a subset
    of each window's queries and so needs a :class:`QuerySubsetFn`) always ``"sdpa"``. A forced backend
    is returned even if it has no ``query_subset`` form: the caller then computes whole windows.
    """
    forced = forced_backend(backend)
    if forced is not None:
        reason = _REGISTRY[forced].supports(q, k, v, **kw)
        if reason is not None:
            raise NotImplementedError(_cannot_run(forced, reason, q, k, v, kw))
        return forced
    if query_subset:
        return "sdpa"
    if q.is_cuda and "triton" in _REGISTRY and _REGISTRY["triton"].supports(q, k, v, **kw) is None:
        return "triton"
    return "sdpa"


def query_subset_fn(name: str) -> QuerySubsetFn | None:
    """The registered :class:`QuerySubsetFn` of backend ``name``, or None when it attends whole windows only."""
    return _REGISTRY[name].query_subset


def _cannot_run(name, reason, q, k, v, kw) -> str:
    lines = [f"window_attention: backend {name!r} cannot run these inputs: {reason}."]
    for label, t in (("q", q), ("k", k), ("v", v)):
        lines.append(f"  {label}: shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}")
    lines.append(f"  window={kw.get('window')!r}, grid={kw.get('grid')}, tile_size={kw.get('tile_size')}")
    for other, b in _REGISTRY.items():
        r = b.supports(q, k, v, **kw)
        lines.append(f"  {other}: {'can run' if r is None else r}")
    lines.append("Pick a backend that can run them, or backend='auto'.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Backends


def _to_window(x, grid, tile_size, order, window):
    """``(B*N, T, h, d)`` in ``order`` -> same stack in ``window`` order (spec form: merge, then crop)."""
    if order == window:
        return x
    bn, t = x.shape[:2]
    flat = x.reshape(bn, t, -1)
    whole = merge(flat, grid, order, layout="nlc", tile_size=tile_size)
    ht, wt = grid[0] * tile_size[0], grid[1] * tile_size[1]
    return crop(whole, grid, window, layout="nlc", size=(ht, wt)).reshape(x.shape)


def _from_window(out, grid, tile_size, window, out_order, permute):
    if out_order == window:
        return out
    if out_order == "map":
        bn, t = out.shape[:2]
        flat = merge(out.reshape(bn, t, -1), grid, window, layout="nlc", tile_size=tile_size)
        return flat.reshape(flat.shape[0], flat.shape[1], *out.shape[2:])
    if permute:
        return permute_windows(out, grid, window, out_order, tile_size=tile_size)
    return _to_window(out, grid, tile_size, window, out_order)


def reference_window_attention(q, k, v, *, grid, tile_size, window, q_order, kv_order, out_order, scale):
    """The spec, in plain math and in the inputs' dtype: merge to maps, crop to windows, softmax(q k^T s) v.

    Shapes: ``q, k, v`` ``(B*N, T, heads, head_dim)`` -> ``(B*N, T, heads, head_dim)`` in ``out_order``
    window order, or ``(B, Ht*Wt, heads, head_dim)`` for ``out_order="map"``.

    Example::

        >>> q = torch.randn(4, 9, 2, 8)
        >>> reference_window_attention(q, q, q, grid=(2, 2), tile_size=(3, 3), window="strided",
        ...     q_order="contiguous", kv_order="contiguous", out_order="map", scale=8**-0.5).shape
        torch.Size([1, 36, 2, 8])
    """
    qw = _to_window(q, grid, tile_size, q_order, window).transpose(1, 2)  # (B*N, h, T, d)
    kw = _to_window(k, grid, tile_size, kv_order, window).transpose(1, 2)
    vw = _to_window(v, grid, tile_size, kv_order, window).transpose(1, 2)
    out = reference_query_subset(qw, kw, vw, scale=scale).transpose(1, 2)  # (B*N, T, h, d)
    return _from_window(out, grid, tile_size, window, out_order, permute=False)


def sdpa_window_attention(q, k, v, *, grid, tile_size, window, q_order, kv_order, out_order, scale):
    """Gather only the stacks not already in window order, then ``F.scaled_dot_product_attention``.

    Same shapes and semantics as :func:`reference_window_attention`.

    Example::

        >>> q = torch.randn(4, 9, 2, 8)
        >>> sdpa_window_attention(q, q, q, grid=(2, 2), tile_size=(3, 3), window="strided",
        ...     q_order="contiguous", kv_order="strided", out_order="strided", scale=0.3).shape
        torch.Size([4, 9, 2, 8])
    """
    qw = permute_windows(q, grid, q_order, window, tile_size=tile_size).transpose(1, 2)
    kw = permute_windows(k, grid, kv_order, window, tile_size=tile_size).transpose(1, 2)
    vw = permute_windows(v, grid, kv_order, window, tile_size=tile_size).transpose(1, 2)
    out = sdpa_query_subset(qw, kw, vw, scale=scale).transpose(1, 2)
    return _from_window(out, grid, tile_size, window, out_order, permute=True)


def reference_query_subset(q, k, v, *, scale):
    """:class:`QuerySubsetFn` of ``"reference"``: plain ``softmax(q k^T * scale) v`` in the inputs' dtype.

    ``q`` ``(G, heads, M, head_dim)``, ``k``/``v`` ``(G, heads, T, head_dim)`` -> ``(G, heads, M, head_dim)``.
    """
    return torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1) @ v


def sdpa_query_subset(q, k, v, *, scale):
    """:class:`QuerySubsetFn` of ``"sdpa"``: :func:`torch.nn.functional.scaled_dot_product_attention`; shapes as
    :func:`reference_query_subset`."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _always(q, k, v, **kw):
    return None


register_backend("reference", reference_window_attention, _always, query_subset=reference_query_subset)
register_backend("sdpa", sdpa_window_attention, _always, query_subset=sdpa_query_subset)


# ----------------------------------------------------------------------------------------------------
# Public core


def _check_choice(value, name, choices, fn):
    if value not in choices:
        raise ValueError(f"{fn}: {name}={value!r} is not a known {name}; pass one of {choices}.")


def _tile_from_tokens(t: int, tile_size, fn: str, shape) -> tuple[int, int]:
    if tile_size is None:
        side = math.isqrt(t)
        if side * side != t:
            raise ValueError(
                f"{fn}: stacks have shape {shape}; {t} tokens per sub-image is not a perfect square, so the tile "
                "size cannot be inferred. Pass tile_size=(th, tw)."
            )
        return side, side
    th, tw = as_pair(tile_size, "tile_size", fn)
    if th * tw != t:
        raise ValueError(
            f"{fn}: stacks have shape {shape}; {t} tokens per sub-image but tile_size=({th}, {tw}) holds "
            f"{th * tw}. Pass the ViT's token grid, e.g. tile_size=(24, 24) for 576 tokens."
        )
    return th, tw


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
    ``window``), or ``(B, Ht*Wt, heads, head_dim)`` row-major for ``out_order="map"``.

    Example::

        >>> q = k = v = torch.randn(2 * 9, 16, 4, 8)                # B=2, grid 3x3, 4x4 tiles
        >>> o = window_attention(q, k, v, (3, 3), window="strided", q_order="contiguous",
        ...                      kv_order="strided", out_order="map")
        >>> o.shape
        torch.Size([2, 144, 4, 8])
    """
    fn = "window_attention"
    gh, gw = as_grid(grid, fn)
    _check_choice(window, "window", _KINDS, fn)
    _check_choice(q_order, "q_order", _KINDS, fn)
    _check_choice(kv_order, "kv_order", _KINDS, fn)
    out_order = window if out_order is None else out_order
    _check_choice(out_order, "out_order", _OUT_ORDERS, fn)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{fn}: {name} must be (B*N, T, heads, head_dim), got {got}. Split heads first.")
    if k.shape != v.shape or q.shape != k.shape:
        raise ValueError(
            f"{fn}: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must have the same shape "
            "(B*N, T, heads, head_dim): both maps are partitioned into the same windows."
        )
    if q.dtype != k.dtype or q.dtype != v.dtype or q.device != k.device or q.device != v.device:
        raise TypeError(
            f"{fn}: q/k/v must share dtype and device, got dtypes {q.dtype}/{k.dtype}/{v.dtype} on devices "
            f"{q.device}/{k.device}/{v.device}. Cast and move them together, e.g. k, v = k.to(q), v.to(q)."
        )
    n = gh * gw
    if q.shape[0] % n != 0 or q.shape[0] == 0:
        raise ValueError(
            f"{fn}: q has shape {tuple(q.shape)}; its first dimension must be a positive multiple of "
            f"N = {gh}*{gw} = {n} (B*N sub-images). Check grid=."
        )
    th, tw = _tile_from_tokens(q.shape[1], tile_size, fn, tuple(q.shape))
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    kw = dict(
        grid=(gh, gw), tile_size=(th, tw), window=window, q_order=q_order, kv_order=kv_order,
        out_order=out_order, scale=scale,
    )  # fmt: skip
    name = resolve_backend(backend, q, k, v, **kw)
    return _REGISTRY[name].fn(q, k, v, **kw)


# ----------------------------------------------------------------------------------------------------
# Projections


def _check_stacks(query_feats, kv_feats, grid, tile_size, fn):
    gh, gw = as_grid(grid, fn)
    for name, t in (("query_feats", query_feats), ("kv_feats", kv_feats)):
        if not isinstance(t, torch.Tensor) or t.ndim != 3:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{fn}: {name} must be a (B*N, ht*wt, D) stack, got {got}.")
    if query_feats.shape != kv_feats.shape:
        raise ValueError(
            f"{fn}: query_feats {tuple(query_feats.shape)} and kv_feats {tuple(kv_feats.shape)} must have the same "
            "shape (B*N, ht*wt, D): the local and global stacks come from the same grid and ViT."
        )
    n = gh * gw
    if query_feats.shape[0] % n != 0 or query_feats.shape[0] == 0:
        raise ValueError(
            f"{fn}: stacks have shape {tuple(query_feats.shape)}; the first dimension must be a positive multiple "
            f"of N = {gh}*{gw} = {n}. Pass the grid the sub-images were cut with."
        )
    th, tw = _tile_from_tokens(query_feats.shape[1], tile_size, fn, tuple(query_feats.shape))
    return (gh, gw), (th, tw)


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
    fn = "window_cross_attention"
    grid, tile_size = _check_stacks(query_feats, kv_feats, grid, tile_size, fn)
    d = query_feats.shape[-1]
    if not isinstance(heads, int) or heads < 1 or d % heads != 0:
        raise ValueError(f"{fn}: heads={heads!r} must be a positive int dividing D={d}; e.g. heads=8 for D=1024.")
    out = _project_attend(
        query_feats, kv_feats, grid, window, q_order, kv_order, q_weight, q_bias, k_weight, k_bias, v_weight,
        v_bias, heads=heads, out_order=out_order, tile_size=tile_size, scale=scale, backend=backend,
    )  # fmt: skip
    return F.linear(out, out_weight, out_bias)


def _project_attend(query_feats, kv_feats, grid, window, q_order, kv_order, q_weight, q_bias, k_weight, k_bias,
                    v_weight, v_bias, *, heads, out_order, tile_size, scale, backend):  # fmt: skip
    """Validated inputs -> q/k/v projections -> :func:`window_attention` -> heads merged, before ``out_proj``."""
    bn, t, d = query_feats.shape
    hd = d // heads
    q = F.linear(query_feats, q_weight, q_bias).view(bn, t, heads, hd)
    # Two matmuls on the same input (no per-call concatenation of the k and v weights).
    k = F.linear(kv_feats, k_weight, k_bias).view(bn, t, heads, hd)
    v = F.linear(kv_feats, v_weight, v_bias).view(bn, t, heads, hd)
    out = window_attention(
        q, k, v, grid, window=window, q_order=q_order, kv_order=kv_order, out_order=out_order,
        tile_size=tile_size, scale=scale, backend=backend,
    )  # fmt: skip
    return out.reshape(*out.shape[:2], d)


class WindowCrossAttention(nn.Module):
    """Module form of :func:`window_cross_attention` with the released residual + LayerNorm.

    Parameters: ``linears.0..3`` = q, k, v, out ``Linear(dim, dim)`` with bias (the released key
    order), and ``ln`` = ``LayerNorm(dim)`` when ``residual_norm=True``, giving
    ``ln(out_proj(attn) + query)`` -- the residual is the *un-projected* query input, as released.
    Forward: ``query_feats, kv_feats`` ``(B*N, ht*wt, D)`` -> ``(B, Ht*Wt, D)`` (``out_order="map"``)
    or ``(B*N, ht*wt, D)`` in a window order.

    Example::

        >>> attn = WindowCrossAttention(64, heads=2)
        >>> x = torch.randn(4, 25, 64)                                  # B=1, grid 2x2, 5x5 tiles
        >>> attn(x, x, (2, 2), window="strided", q_order="contiguous", kv_order="strided").shape
        torch.Size([1, 100, 64])
    """

    def __init__(self, dim: int, heads: int = 8, *, residual_norm: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(dim, int) or not isinstance(heads, int) or dim < 1 or heads < 1 or dim % heads:
            raise ValueError(
                f"WindowCrossAttention: dim={dim!r}, heads={heads!r}; heads must be a positive int dividing dim "
                "(e.g. dim=1024, heads=8)."
            )
        self.dim, self.heads, self.residual_norm = dim, heads, residual_norm
        self.linears = nn.ModuleList(nn.Linear(dim, dim, device=device, dtype=dtype) for _ in range(4))
        self.ln = nn.LayerNorm(dim, device=device, dtype=dtype) if residual_norm else None

    def forward(
        self,
        query_feats: torch.Tensor,
        kv_feats: torch.Tensor,
        grid,
        *,
        window: WindowKind,
        q_order: WindowKind,
        kv_order: WindowKind,
        out_order: OutOrder = "map",
        tile_size=None,
        backend: str = "auto",
    ) -> torch.Tensor:
        """Windowed cross-attention, then ``ln(out_proj(attn) + query)`` (or ``out_proj(attn)`` without ``ln``).

        Args:
            query_feats: ``(B*N, ht*wt, D)`` stack in ``q_order`` window order of the query map.
            kv_feats: ``(B*N, ht*wt, D)`` stack in ``kv_order`` window order of the key/value map.
            grid: ``(gh, gw)`` (or an int), ``N = gh*gw``.
            window: the window kind attended in, ``"contiguous"`` or ``"strided"``.
            out_order: ``"map"`` (default) or a window order for the output.
            tile_size: ``(ht, wt)``; inferred when ``ht*wt`` is a perfect square.
            backend: :func:`window_attention` backend (``"auto"`` honours :func:`attention_backend` and
                ``$HRPERC_ATTN_BACKEND``).

        Returns:
            ``(B, Ht*Wt, D)`` row-major for ``out_order="map"``, else ``(B*N, ht*wt, D)`` in that window
            order; ``Ht*Wt = N*ht*wt``.
        """
        grid, tile_size = self._check(query_feats, kv_feats, grid, tile_size)
        out = self._attend(query_feats, kv_feats, grid, window, q_order, kv_order, out_order, tile_size, backend)
        lo = self.linears[3]
        out = F.linear(out, lo.weight, lo.bias)
        if self.ln is None:
            return out
        return self.ln(out + _reorder_stack(query_feats, grid, tile_size, q_order, out_order))

    def attend(
        self,
        query_feats: torch.Tensor,
        kv_feats: torch.Tensor,
        grid,
        *,
        window: WindowKind,
        q_order: WindowKind,
        kv_order: WindowKind,
        out_order: OutOrder = "map",
        tile_size=None,
        backend: str = "auto",
    ) -> torch.Tensor:
        """The attention with heads merged, *before* the output projection; arguments and shapes as :meth:`forward`.

        ``forward`` is ``ln(linears[3](attend(...)) + query)``. The DEM average-pools this output before
        the (affine) output projection when nothing non-linear follows.
        """
        grid, tile_size = self._check(query_feats, kv_feats, grid, tile_size)
        return self._attend(query_feats, kv_feats, grid, window, q_order, kv_order, out_order, tile_size, backend)

    def _check(self, query_feats, kv_feats, grid, tile_size):
        fn = "WindowCrossAttention"
        grid, tile_size = _check_stacks(query_feats, kv_feats, grid, tile_size, fn)
        if query_feats.shape[-1] != self.dim:
            raise ValueError(
                f"{fn}: inputs have D={query_feats.shape[-1]} (shape {tuple(query_feats.shape)}) but the module was "
                f"built with dim={self.dim}. Pass features of width {self.dim}, or build "
                f"WindowCrossAttention({query_feats.shape[-1]}, heads=...) for these."
            )
        return grid, tile_size

    def _attend(self, query_feats, kv_feats, grid, window, q_order, kv_order, out_order, tile_size, backend):
        lq, lk, lv, _ = self.linears
        return _project_attend(
            query_feats, kv_feats, grid, window, q_order, kv_order, lq.weight, lq.bias, lk.weight, lk.bias,
            lv.weight, lv.bias, heads=self.heads, out_order=out_order, tile_size=tile_size, scale=None,
            backend=backend,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, residual_norm={self.residual_norm}"


def _reorder_stack(x, grid, tile_size, order, out_order):
    """``(B*N, T, D)`` stack in ``order`` -> ``out_order`` (a window order, or ``"map"`` ``(B, Ht*Wt, D)``)."""
    if out_order == "map":
        return merge(x, grid, order, layout="nlc", tile_size=tile_size)
    return permute_windows(x, grid, order, out_order, tile_size=tile_size)
