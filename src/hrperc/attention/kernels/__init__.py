"""Fused GPU kernels (Triton), loaded lazily so ``import hrperc`` works, and stays light, without Triton.

Triton is imported on first use, not at ``import hrperc``: it decides at import time whether to run
kernels on the GPU or in its CPU interpreter (``TRITON_INTERPRET=1``), so the variable may still be
set after ``import hrperc``. :data:`TRITON` declares the kernel as a backend of
:func:`hrperc.window_attention` (``hrperc.attention`` registers it as ``"triton"``): CUDA, or CPU in
the interpreter; fp16/bf16/fp32; head dim <= 256; whole windows only (no query-subset form);
``backend="auto"`` picks it for CUDA tensors. If Triton is installed but fails to import (with any
exception), ``"auto"`` falls back to SDPA with one ``RuntimeWarning``, :func:`triton_import_error`
gives the reason, and a forced ``backend="triton"`` raises with it.

Example::

    >>> import hrperc
    >>> from hrperc.attention import get_backend
    >>> get_backend("triton").query_subset is None, get_backend("triton").auto_devices   # whole windows; auto on CUDA
    (True, ('cuda',))
"""

from __future__ import annotations

import importlib.util
import warnings

import torch

from ..backend import AttentionBackend

__all__ = ["HAS_TRITON", "TRITON", "triton_window_attention", "triton_import_error"]

#: Whether a ``triton`` package is installed (it may still fail to import; the backend then says why).
HAS_TRITON = importlib.util.find_spec("triton") is not None

# Why importing the kernels failed (first failure, kept so the import is not retried on every call).
_IMPORT_ERROR: BaseException | None = None


def _import_kernels():
    from . import window_attention

    return window_attention


def triton_import_error() -> str | None:
    """Why the Triton kernels could not be imported (``"RuntimeError: ..."``), or None if they were not tried or loaded.

    A broken Triton install can fail with any exception, not only ``ImportError`` (e.g. a ``RuntimeError``
    from a driver or compiler mismatch); ``backend="auto"`` then falls back to SDPA and keeps the reason here.
    """
    return None if _IMPORT_ERROR is None else f"{type(_IMPORT_ERROR).__name__}: {_IMPORT_ERROR}"


def _kernel_module():
    global _IMPORT_ERROR
    if not HAS_TRITON:
        raise ImportError(
            "hrperc's fused window-attention kernel needs Triton, which is not installed. Install it with "
            "`pip install triton` (Linux), or use backend='sdpa'."
        )
    if _IMPORT_ERROR is None:
        try:
            return _import_kernels()
        except Exception as exc:  # noqa: BLE001 -- a broken install may raise anything, not just ImportError
            _IMPORT_ERROR = exc
            warnings.warn(
                f"hrperc: the Triton window-attention kernel failed to import ({triton_import_error()}): "
                "backend='auto' uses SDPA instead and backend='triton' raises. Reinstall Triton to match torch "
                "and the CUDA driver.",
                RuntimeWarning,
                stacklevel=3,
            )
    raise ImportError(
        f"hrperc's fused window-attention kernel could not import Triton ({triton_import_error()}). Reinstall "
        "Triton to match torch and the CUDA driver, or use backend='sdpa'."
    ) from _IMPORT_ERROR


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
    """Fused per-window attention; see :func:`hrperc.attention.kernels.window_attention.triton_window_attention`.

    ``q, k, v``: ``(B*N, T, heads, head_dim)`` stacks in ``q_order``/``kv_order`` window order, or
    ``(B, Ht*Wt, heads, head_dim)`` maps for order ``"map"``; returns the same forms per ``out_order``.

    Example::

        >>> q = torch.randn(9, 16, 2, 32, device="cuda", dtype=torch.bfloat16)     # doctest: +SKIP
        >>> triton_window_attention(q, q, q, (3, 3), window="strided", q_order="contiguous",
        ...                         kv_order="contiguous", out_order="map").shape  # doctest: +SKIP
        torch.Size([1, 144, 2, 32])
    """
    return _kernel_module().triton_window_attention(
        q, k, v, grid, window=window, q_order=q_order, kv_order=kv_order, out_order=out_order,
        tile_size=tile_size, scale=scale,
    )  # fmt: skip


def _check(q, k, v, **kw) -> str | None:
    """What the declared fields cannot say: Triton must import, and a CPU tensor needs the interpreter."""
    try:
        module = _kernel_module()
    except ImportError as exc:
        return f"Triton is unavailable ({exc})"
    return module.triton_supports(q, k, v, **kw)


def _backend(q, k, v, grid, *, window, q_order, kv_order, out_order, tile_size, scale):
    return _kernel_module().triton_window_attention(
        q, k, v, grid, window=window, q_order=q_order, kv_order=kv_order, out_order=out_order,
        tile_size=tile_size, scale=scale,
    )  # fmt: skip


#: The fused kernel as a backend (registered as ``"triton"`` by :mod:`hrperc.attention`).
TRITON = AttentionBackend(
    "triton", _backend, query_subset=None, devices=("cuda", "cpu"),
    dtypes=(torch.float16, torch.bfloat16, torch.float32), max_head_dim=256, auto_devices=("cuda",), priority=10,
    check=_check,
)  # fmt: skip
