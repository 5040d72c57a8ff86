"""Per-window cross-attention between two token maps (INF-LLaVA's DEM core) and its backends.

Both maps ``(B, Ht, Wt, D)`` (``Ht = gh*th``) are partitioned the same way into ``N = gh*gw``
windows of ``th*tw`` tokens, either **contiguous** (the local crop of the map) or **strided** (the
strided crop; :mod:`hrperc.ops.geometry`); window ``w``'s queries attend to window ``w``'s keys and
values only::

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
(:func:`hrperc.permute_windows`), or, by the fused kernel, not at all.

================================  ==========================================================
:mod:`~hrperc.attention.functional`  :func:`window_attention` (dispatched), :func:`window_cross_attention`
:mod:`~hrperc.attention.module`      :class:`WindowCrossAttention`
:mod:`~hrperc.attention.backend`     :class:`AttentionBackend`: a backend and what it supports
:mod:`~hrperc.attention.dispatch`    the registry, ``"auto"``, :func:`attention_backend`
:mod:`~hrperc.attention.reference`   ``"reference"`` (the definition) and ``"sdpa"``
:mod:`~hrperc.attention.kernels`     ``"triton"``: the fused Triton kernels, forward and backward
================================  ==========================================================

Example::

    >>> import torch, hrperc
    >>> from hrperc.attention import AttentionBackend, register_backend, unregister_backend
    >>> from hrperc.attention.reference import sdpa_window_attention
    >>> _ = register_backend(AttentionBackend("mine", sdpa_window_attention, devices=("cpu",)))
    >>> q = torch.randn(4, 9, 2, 8)                                   # B=1, grid 2x2, 3x3 tokens
    >>> with hrperc.attention_backend("mine"):
    ...     out = hrperc.window_attention(q, q, q, (2, 2), window="strided", q_order="contiguous",
    ...                                   kv_order="strided", out_order="map")
    >>> out.shape
    torch.Size([1, 36, 2, 8])
    >>> unregister_backend("mine")
"""

from .backend import AttentionBackend, QuerySubsetFn, WindowAttentionFn
from .dispatch import (
    BackendUnavailableError,
    attention_backend,
    available_backends,
    get_backend,
    register_backend,
    resolve_backend,
    unregister_backend,
)
from .functional import window_attention, window_cross_attention
from .kernels import TRITON
from .module import WindowCrossAttention
from .reference import REFERENCE, SDPA

# The built-in backends; the dispatcher itself knows none of them by name.
for _backend in (REFERENCE, SDPA, TRITON):
    register_backend(_backend, replace=True)
del _backend

__all__ = [
    "window_attention",
    "window_cross_attention",
    "WindowCrossAttention",
    "AttentionBackend",
    "WindowAttentionFn",
    "QuerySubsetFn",
    "register_backend",
    "unregister_backend",
    "available_backends",
    "get_backend",
    "attention_backend",
    "resolve_backend",
    "BackendUnavailableError",
]
