"""The plain-torch backends of :func:`hrperc.window_attention`: ``"reference"`` (the definition) and ``"sdpa"``.

``reference_window_attention`` is *the* reference every fast path is tested against: it builds each
stack's windows the definitional way -- merge the stack into its map, crop the map into the
attention's windows -- and runs ``softmax(q k^T * scale) v`` in the inputs' dtype (float64 gives the
ground truth). ``sdpa_window_attention`` gathers only the stacks not already in window order, in one
index per stack (:func:`hrperc.permute_windows`), then calls
:func:`torch.nn.functional.scaled_dot_product_attention`. Both have a query-subset form.

Neither checks its arguments: :func:`hrperc.window_attention` checks them once, for every backend, and
passes them normalised. Called directly, they fill in the defaults (``tile_size``, ``out_order``,
``scale``) and take the rest as given.

Example::

    >>> import torch
    >>> from hrperc.attention.reference import reference_window_attention, sdpa_window_attention
    >>> q = torch.randn(4, 9, 2, 8, dtype=torch.float64)                # B=1, grid 2x2, 3x3 tokens
    >>> kw = dict(window="strided", q_order="contiguous", kv_order="contiguous", out_order="map")
    >>> torch.allclose(reference_window_attention(q, q, q, (2, 2), **kw), sdpa_window_attention(q, q, q, (2, 2), **kw))
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.crop import crop, merge, permute_windows
from ..ops.geometry import infer_tile_size
from .backend import AttentionBackend

__all__ = [
    "reference_window_attention",
    "sdpa_window_attention",
    "reference_query_subset",
    "sdpa_query_subset",
    "REFERENCE",
    "SDPA",
]


def _to_window(x, grid, tile_size, order, window):
    """``x`` in ``order`` (a ``(B*N, T, h, d)`` stack, or the ``(B, Ht*Wt, h, d)`` map) -> ``window`` stack."""
    if order == window:
        return x
    heads, dim = x.shape[-2:]
    flat = x.reshape(*x.shape[:2], heads * dim)
    if order != "map":
        flat = merge(flat, grid, order, layout="nlc", tile_size=tile_size)
    out = crop(flat, grid, window, layout="nlc", size=(grid[0] * tile_size[0], grid[1] * tile_size[1]))
    return out.reshape(out.shape[0], out.shape[1], heads, dim)


def _from_window(out, grid, tile_size, window, out_order, permute):
    if out_order == window:
        return out
    bn, t = out.shape[:2]
    if out_order == "map":
        flat = merge(out.reshape(bn, t, -1), grid, window, layout="nlc", tile_size=tile_size)
        return flat.reshape(flat.shape[0], flat.shape[1], *out.shape[2:])
    if permute:
        return permute_windows(out, grid, window, out_order, tile_size=tile_size)
    return _to_window(out, grid, tile_size, window, out_order)


def _defaults(q, grid, q_order, window, out_order, tile_size, scale):
    """The defaults a direct call may leave out; nothing is checked (:func:`hrperc.window_attention` checks
    every argument, and passes them all)."""
    if tile_size is None:
        tokens = q.shape[1] // (grid[0] * grid[1]) if q_order == "map" else q.shape[1]
        tile_size = infer_tile_size(tokens, shape=tuple(q.shape))
    out_order = window if out_order is None else out_order
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    return tile_size, out_order, scale


def reference_window_attention(
    q, k, v, grid, *, window, q_order, kv_order, out_order=None, tile_size=None, scale=None
) -> torch.Tensor:
    """The definition, in plain math and in the inputs' dtype: merge to maps, crop to windows, attend.

    Shapes: ``q, k, v`` ``(B*N, T, heads, head_dim)`` stacks in ``q_order``/``kv_order`` (or, for
    order ``"map"``, the ``(B, Ht*Wt, heads, head_dim)`` map) -> ``(B*N, T, heads, head_dim)`` in
    ``out_order`` (default ``window``), or ``(B, Ht*Wt, heads, head_dim)`` for ``"map"``.
    ``scale`` defaults to ``1/sqrt(head_dim)``; ``tile_size`` is inferred when square. ``grid`` is a
    pair ``(gh, gw)``; the arguments are taken as checked (:func:`hrperc.window_attention` checks them).

    Example::

        >>> q = torch.randn(4, 9, 2, 8)
        >>> reference_window_attention(q, q, q, (2, 2), window="strided", q_order="contiguous",
        ...     kv_order="contiguous", out_order="map").shape
        torch.Size([1, 36, 2, 8])
    """
    tile_size, out_order, scale = _defaults(q, grid, q_order, window, out_order, tile_size, scale)
    qw = _to_window(q, grid, tile_size, q_order, window).transpose(1, 2)  # (B*N, h, T, d)
    kw = _to_window(k, grid, tile_size, kv_order, window).transpose(1, 2)
    vw = _to_window(v, grid, tile_size, kv_order, window).transpose(1, 2)
    out = reference_query_subset(qw, kw, vw, scale=scale).transpose(1, 2)  # (B*N, T, h, d)
    return _from_window(out, grid, tile_size, window, out_order, permute=False)


def sdpa_window_attention(
    q, k, v, grid, *, window, q_order, kv_order, out_order=None, tile_size=None, scale=None
) -> torch.Tensor:
    """Gather only the stacks not already in window order, then ``F.scaled_dot_product_attention``.

    Window-order stacks only (no ``"map"`` inputs); otherwise as :func:`reference_window_attention`.

    Example::

        >>> q = torch.randn(4, 9, 2, 8)
        >>> sdpa_window_attention(q, q, q, (2, 2), window="strided", q_order="contiguous",
        ...     kv_order="strided", out_order="strided", scale=0.3).shape
        torch.Size([4, 9, 2, 8])
    """
    tile_size, out_order, scale = _defaults(q, grid, q_order, window, out_order, tile_size, scale)
    qw = permute_windows(q, grid, q_order, window, tile_size=tile_size).transpose(1, 2)
    kw = permute_windows(k, grid, kv_order, window, tile_size=tile_size).transpose(1, 2)
    vw = permute_windows(v, grid, kv_order, window, tile_size=tile_size).transpose(1, 2)
    out = sdpa_query_subset(qw, kw, vw, scale=scale).transpose(1, 2)
    return _from_window(out, grid, tile_size, window, out_order, permute=True)


def reference_query_subset(q, k, v, *, scale):
    """Query-subset form of ``"reference"``: plain ``softmax(q k^T * scale) v`` in the inputs' dtype.

    ``q`` ``(G, heads, M, head_dim)``, ``k``/``v`` ``(G, heads, T, head_dim)`` -> ``(G, heads, M, head_dim)``.
    """
    return torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1) @ v


def sdpa_query_subset(q, k, v, *, scale):
    """Query-subset form of ``"sdpa"``: :func:`torch.nn.functional.scaled_dot_product_attention`; shapes as
    :func:`reference_query_subset`."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


#: Plain math on any device and dtype; never chosen by ``"auto"``.
REFERENCE = AttentionBackend("reference", reference_window_attention, reference_query_subset, auto_devices=())
#: SDPA on any device and dtype; ``"auto"``'s choice wherever nothing of higher priority can run.
SDPA = AttentionBackend("sdpa", sdpa_window_attention, sdpa_query_subset, auto_devices=None, priority=0)
