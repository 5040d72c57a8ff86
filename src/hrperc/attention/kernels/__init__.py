"""Fused GPU kernels (Triton), loaded lazily so ``import hrperc`` works, and stays light, without Triton.

Triton is imported on first use, not at ``import hrperc``: it decides at import time whether to run
kernels on the GPU or in its CPU interpreter (``TRITON_INTERPRET=1``), so the variable may still be
set after ``import hrperc``. :data:`TRITON` declares the kernel as a backend of
:func:`hrperc.window_attention` (``hrperc.attention`` registers it as ``"triton"``): CUDA, or CPU in
the interpreter; the dtypes and head dims of :mod:`~hrperc.attention.kernels.limits` (where the
kernel's limits are stated, once); whole windows only (no query-subset form);
``backend="auto"`` picks it for CUDA tensors. If Triton is installed but fails to import (with any
exception), ``"auto"`` falls back to SDPA with one ``RuntimeWarning``, :func:`triton_import_error`
gives the reason, and a forced ``backend="triton"`` raises with it.

``"auto"`` does not trust the kernel blindly: on its first use per (device, dtype, head dim, window,
orders), :func:`triton_self_check` runs it on small inputs (forward and backward) against SDPA and
caches the verdict; on any error or mismatch ``"auto"`` uses SDPA for those inputs, with one
``RuntimeWarning`` naming the reason. A forced ``backend="triton"`` skips the self-check. While
``torch.compile`` traces, an unchecked key cannot be checked (no real tensors), so ``"auto"`` uses SDPA
there; one eager call first (or ``backend="triton"``) lets compiled code use the kernel.

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
from .limits import DTYPES, MAX_HEAD_DIM

__all__ = ["HAS_TRITON", "TRITON", "triton_window_attention", "triton_import_error", "triton_self_check"]

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
    )


def _check(q, k, v, **kw) -> str | None:
    """Triton must import, and the inputs be within the kernel's limits
    (:func:`~hrperc.attention.kernels.limits.kernel_supports`; a CPU tensor needs the interpreter)."""
    try:
        module = _kernel_module()
    except ImportError as exc:
        return f"Triton is unavailable ({exc})"
    return module.triton_supports(q, k, v, **kw)


# The self-check's verdict per (device, dtype, head_dim, window, q_order, kv_order, out_order): None = passed.
_SELF_CHECKS: dict[tuple, str | None] = {}

# Small self-check inputs: B=1, a 2x2 grid of 5x13 tiles (T = 65: not square, not a power of two, over 64).
_CHECK_GRID, _CHECK_TILE, _CHECK_HEADS = (2, 2), (5, 13), 2

# |kernel - float64| <= factor * |reference in dtype - float64| + atol * max(1, |float64|): flash-attn's rule,
# loosened (a self-check must catch a wrong kernel, never flag rounding), as in tests/_tolerance.py. One atol
# per kernel dtype (limits.DTYPES); the self-check only runs for inputs the kernel supports.
_CHECK_FACTOR = 4.0
_CHECK_ATOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-1}


def triton_self_check(q, k=None, v=None, *, window, q_order, kv_order, out_order=None, **kw) -> str | None:
    """``None`` when the kernel matches SDPA, forward and backward, on small inputs like ``q``; else why not.

    The ``auto_check`` of :data:`TRITON`: consulted by ``backend="auto"`` only. Runs once per (device,
    dtype, head dim, window, q_order, kv_order, out_order) on fresh ``(N, 65, 2, head_dim)`` inputs (a
    2x2 grid of 5x13 tiles, fixed seed; the global RNG is untouched) and caches the verdict; the first
    failing verdict of a key warns once (``RuntimeWarning``). ``q`` (``(B*N, T, heads, head_dim)``) only
    gives the device, dtype and head dim; ``k``, ``v`` and the other keywords are ignored.
    """
    out_order = window if out_order is None else out_order
    key = (q.device, q.dtype, q.shape[-1], window, q_order, kv_order, out_order)
    if key in _SELF_CHECKS:
        return _SELF_CHECKS[key]
    if torch.compiler.is_compiling():  # fake tensors: nothing can run; not cached, the first eager call checks
        return (
            "not self-checked yet for these inputs, and the self-check cannot run while torch.compile traces; "
            "run one eager call first, or force backend='triton'"
        )
    reason = _run_self_check(q, window=window, q_order=q_order, kv_order=kv_order, out_order=out_order)
    _SELF_CHECKS[key] = reason
    if reason is not None:
        warnings.warn(
            f"hrperc: the Triton window-attention kernel failed its self-check against SDPA on {q.device} "
            f"({q.dtype}, head_dim {q.shape[-1]}, window={window!r}, q_order={q_order!r}, kv_order={kv_order!r}, "
            f"out_order={out_order!r}): {reason}. backend='auto' uses SDPA for these inputs instead; "
            "backend='triton' still forces the kernel. Please report this with your GPU, torch and Triton versions.",
            RuntimeWarning,
            stacklevel=4,
        )
    return reason


def _run_self_check(q, *, window, q_order, kv_order, out_order) -> str | None:
    """Run the kernel and SDPA on small random inputs like ``q``; ``None`` if they agree, else the reason."""
    from ..reference import reference_window_attention, sdpa_window_attention

    (gh, gw), (th, tw) = _CHECK_GRID, _CHECK_TILE
    n, t, heads, d = gh * gw, th * tw, _CHECK_HEADS, q.shape[-1]
    # SDPA takes window-order stacks only; for a "map" input the one definition stands in.
    oracle = reference_window_attention if "map" in (q_order, kv_order) else sdpa_window_attention
    kw = dict(window=window, q_order=q_order, kv_order=kv_order, out_order=out_order, tile_size=(th, tw), scale=d**-0.5)
    gen = torch.Generator().manual_seed(0)

    def make(shape):  # on q's device, in q's dtype
        return torch.randn(shape, generator=gen).to(q)

    try:
        with torch.inference_mode(False), torch.enable_grad():
            xs = [make((1, n * t, heads, d) if o == "map" else (n, t, heads, d)) for o in (q_order, kv_order, kv_order)]
            xs = [x.requires_grad_() for x in xs]
            out = _kernel_module().triton_window_attention(*xs, _CHECK_GRID, **kw)
            grad_out = make(tuple(out.shape))
            got = (out, *torch.autograd.grad(out, xs, grad_out))
            refs = []
            for cast in (lambda x: x, torch.Tensor.double):
                ys = [cast(x.detach()).requires_grad_() for x in xs]
                o = oracle(ys[0], ys[1], ys[2], _CHECK_GRID, **kw)
                refs.append((o, *torch.autograd.grad(o, ys, cast(grad_out))))
    except Exception as exc:  # noqa: BLE001 -- a failed compile or launch may raise anything
        return f"it raised {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    for what, fast, lowp, ref64 in zip(("output", "dq", "dk", "dv"), got, *refs):
        if fast.shape != ref64.shape:
            return f"its {what} has shape {tuple(fast.shape)}, SDPA's {tuple(ref64.shape)}"
        fast, lowp, ref64 = fast.detach().double(), lowp.detach().double(), ref64.detach()
        if not torch.isfinite(fast).all():
            return f"its {what} has NaN or Inf values where SDPA's are finite"
        err = (fast - ref64).abs().max().item()
        bound = _CHECK_FACTOR * (lowp - ref64).abs().max().item()
        bound += _CHECK_ATOL.get(q.dtype, 1e-4) * max(1.0, ref64.abs().max().item())
        if not err <= bound:
            return f"its {what} differs from SDPA's by {err:.3g} (max abs), over the bound {bound:.3g}"
    return None


def _backend(q, k, v, grid, *, window, q_order, kv_order, out_order, tile_size, scale):
    # Checked by hrperc.window_attention, and within the kernel's limits (the dispatch asked _check): launch.
    return _kernel_module().launch(q, k, v, grid, tile_size, window, q_order, kv_order, out_order, scale)


#: The fused kernel as a backend (registered as ``"triton"`` by :mod:`hrperc.attention`).
TRITON = AttentionBackend(
    "triton",
    _backend,
    query_subset=None,
    devices=("cuda", "cpu"),
    dtypes=DTYPES,
    max_head_dim=MAX_HEAD_DIM,
    auto_devices=("cuda",),
    priority=10,
    check=_check,
    auto_check=triton_self_check,
)
