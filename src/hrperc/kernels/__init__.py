"""Fused GPU kernels (Triton), loaded lazily so ``import hrperc`` works, and stays light, without Triton.

Triton is imported on first use, not at ``import hrperc``: it decides at import time whether to run
kernels on the GPU or in its CPU interpreter (``TRITON_INTERPRET=1``), so the variable may still be
set after ``import hrperc``. Importing this package registers the ``"triton"`` backend of
:func:`hrperc.window_attention`; ``backend="auto"`` picks it for CUDA tensors.

Example::

    >>> import hrperc
    >>> "triton" in hrperc.available_backends()
    True
"""

from __future__ import annotations

import importlib.util

import torch

__all__ = ["HAS_TRITON", "triton_window_attention", "register_triton_backend"]

#: Whether a ``triton`` package is installed (it may still fail to import; the backend then says why).
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _kernel_module():
    if not HAS_TRITON:
        raise ImportError(
            "hrperc's fused window-attention kernel needs Triton, which is not installed. Install it with "
            "`pip install triton` (Linux), or use backend='sdpa'."
        )
    from . import window_attention

    return window_attention


def triton_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid,
    *,
    window: str,
    q_order: str,
    kv_order: str,
    out_order: str | None = None,
    tile_size=None,
    scale: float | None = None,
) -> torch.Tensor:
    """Fused per-window attention; see :func:`hrperc.kernels.window_attention.triton_window_attention`.

    ``q, k, v``: ``(B*N, T, heads, head_dim)`` stacks in ``q_order``/``kv_order`` window order, or
    ``(B, Ht*Wt, heads, head_dim)`` maps for order ``"map"``; returns the same forms per ``out_order``.

    Example::

        >>> q = torch.randn(9, 16, 2, 32, device="cuda", dtype=torch.bfloat16)
        >>> triton_window_attention(q, q, q, (3, 3), window="strided", q_order="contiguous",
        ...                         kv_order="contiguous", out_order="map").shape
        torch.Size([1, 144, 2, 32])
    """
    return _kernel_module().triton_window_attention(
        q, k, v, grid, window=window, q_order=q_order, kv_order=kv_order, out_order=out_order,
        tile_size=tile_size, scale=scale,
    )  # fmt: skip


def _supports(q, k, v, **kw) -> str | None:
    try:
        module = _kernel_module()
    except ImportError as exc:
        return f"Triton is unavailable ({exc})"
    return module.triton_supports(q, k, v, **kw)


def _backend(q, k, v, *, grid, tile_size, window, q_order, kv_order, out_order, scale):
    return _kernel_module().triton_window_attention(
        q, k, v, grid, window=window, q_order=q_order, kv_order=kv_order, out_order=out_order,
        tile_size=tile_size, scale=scale,
    )  # fmt: skip


def register_triton_backend() -> None:
    """Register the fused kernel as the ``"triton"`` backend of :func:`hrperc.window_attention` (idempotent)."""
    from ..attention import register_backend

    register_backend("triton", _backend, _supports)


register_triton_backend()
