"""What a window-attention backend is: :class:`AttentionBackend`, a function plus what it supports.

A backend declares its capabilities as data (device types, dtypes, the largest head dim, whether it
has a query-subset form, where ``backend="auto"`` may choose it and with which priority) so the
dispatcher (:mod:`hrperc.attention.dispatch`) can choose among backends without knowing any by name,
and can say why each one cannot run given inputs.

Example::

    >>> import torch
    >>> from hrperc.attention import AttentionBackend
    >>> from hrperc.attention.reference import reference_window_attention
    >>> b = AttentionBackend("mine", reference_window_attention, dtypes=(torch.float64,))
    >>> b.supports(torch.zeros(4, 9, 1, 8))
    'dtype torch.float32 is not one of (torch.float64,)'
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from .._errors import public

__all__ = ["AttentionBackend", "WindowAttentionFn", "QuerySubsetFn", "check_output"]


class WindowAttentionFn(Protocol):
    """``fn(q, k, v, grid, *, window, q_order, kv_order, out_order, tile_size, scale) -> Tensor``.

    The signature of :func:`hrperc.window_attention`. Arguments arrive validated and normalised:
    ``q, k, v`` are ``(B*N, T, heads, head_dim)`` stacks in ``q_order``/``kv_order`` window order,
    ``grid``/``tile_size`` int pairs, ``scale`` a float, ``out_order`` one of
    ``"contiguous"|"strided"|"map"``. Returns ``(B*N, T, heads, head_dim)`` for a window order or
    ``(B, Ht*Wt, heads, head_dim)`` for ``"map"``, in ``q``'s dtype, differentiable. The result is
    checked after every call (:func:`check_output`): anything else raises, naming the backend.
    """

    def __call__(self, q, k, v, grid, *, window, q_order, kv_order, out_order, tile_size, scale): ...


class QuerySubsetFn(Protocol):
    """Optional second form of a backend: ``fn(q, k, v, *, scale) -> Tensor``, windows already gathered.

    ``q``: ``(G, heads, M, head_dim)``, ``M`` queries of each of ``G`` windows (a subset of the window's
    ``T`` tokens); ``k``, ``v``: ``(G, heads, T, head_dim)``, the whole window. Returns
    ``softmax(q k^T * scale) v``, ``(G, heads, M, head_dim)``, in ``q``'s dtype, differentiable. The
    DEM's skipping path needs it; a backend without it makes a DEM forced onto it compute every token.
    The result is checked after every call (:func:`check_output`).
    """

    def __call__(self, q, k, v, *, scale): ...


@dataclass(frozen=True)
class AttentionBackend:
    """A window-attention backend and what it supports.

    Args:
        name: the name ``backend=`` / :func:`~hrperc.attention_backend` / ``$HRPERC_ATTN_BACKEND`` use.
        fn: the whole-window attention, :class:`WindowAttentionFn`.
        query_subset: the query-subset form, :class:`QuerySubsetFn`, or ``None``.
        devices: device types it runs on (``("cuda",)``), ``None`` for any.
        dtypes: input dtypes it runs on, ``None`` for any.
        max_head_dim: the largest ``head_dim`` it runs, ``None`` for any.
        auto_devices: device types on which ``backend="auto"`` may choose it (``None``: any device it
            supports; ``()``: never chosen automatically, only when forced).
        priority: among the backends ``"auto"`` may choose that can run the inputs, the highest wins.
        check: ``check(q, k, v, **kw) -> None | reason`` for conditions the fields cannot state
            (e.g. an optional package that failed to import); ``None`` when there are none.
        auto_check: ``auto_check(q, k, v, **kw) -> None | reason``, consulted only by ``backend="auto"``
            after :meth:`supports` says yes, never for a forced backend: trust that must be earned before
            ``"auto"`` picks the backend (the Triton kernel's self-check against SDPA). A reason makes
            ``"auto"`` pass over it; ``None`` when there is nothing to earn.
    """

    name: str
    fn: WindowAttentionFn
    query_subset: QuerySubsetFn | None = None
    devices: tuple[str, ...] | None = None
    dtypes: tuple[torch.dtype, ...] | None = None
    max_head_dim: int | None = None
    auto_devices: tuple[str, ...] | None = ()
    priority: int = 0
    check: Callable[..., str | None] | None = None
    auto_check: Callable[..., str | None] | None = None

    @public(name="AttentionBackend")
    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or self.name == "auto":
            raise ValueError(f"name={self.name!r}; give a non-empty name other than 'auto'.")
        if not callable(self.fn):
            raise TypeError(f"backend {self.name!r}: fn must be callable, got {type(self.fn).__name__}.")
        for field in ("query_subset", "check", "auto_check"):
            value = getattr(self, field)
            if value is not None and not callable(value):
                raise TypeError(f"backend {self.name!r}: {field} must be callable or None, got {type(value).__name__}.")

    def supports(self, q: torch.Tensor, k=None, v=None, **kw) -> str | None:
        """``None`` when this backend can run these inputs, else the reason (shown to users)."""
        if self.devices is not None and q.device.type not in self.devices:
            return f"device {q.device.type!r} is not one of {self.devices}"
        if self.dtypes is not None and q.dtype not in self.dtypes:
            return f"dtype {q.dtype} is not one of {self.dtypes}"
        if self.max_head_dim is not None and q.shape[-1] > self.max_head_dim:
            return f"head_dim {q.shape[-1]} exceeds {self.max_head_dim}"
        return None if self.check is None else self.check(q, k, v, **kw)

    def auto_supports(self, q: torch.Tensor, k=None, v=None, **kw) -> str | None:
        """``None`` when ``backend="auto"`` may run these inputs on this backend: :meth:`supports`, then ``auto_check``.

        (``auto_devices`` is checked separately, by :meth:`auto_eligible`.)
        """
        reason = self.supports(q, k, v, **kw)
        if reason is None and self.auto_check is not None:
            reason = self.auto_check(q, k, v, **kw)
        return reason

    def auto_eligible(self, device_type: str) -> bool:
        """Whether ``backend="auto"`` may choose this backend for tensors on ``device_type``."""
        return self.auto_devices is None or device_type in self.auto_devices


def check_output(backend: AttentionBackend, out, shape, q: torch.Tensor, *, form: str, layout: str):
    """``out`` when it is what ``backend``'s ``form`` (``"fn"`` / ``"query_subset"``) must return, else raise.

    What it must return: a tensor of exactly ``shape`` (``layout`` names its dims for the message), in
    ``q``'s dtype (or, under :func:`torch.autocast` for ``q``'s device, the autocast dtype, as the built-in
    backends give) and on ``q``'s device. A shape that would merely broadcast (``(1, T, heads, head_dim)``)
    is refused, not spread into a normal-looking wrong result. ``TypeError`` for something other than a
    tensor or a wrong dtype or device, ``ValueError`` for a wrong shape; the message names the backend,
    what it returned, what was expected and the fix.

    One shape, dtype and device comparison: nothing measurable on the hot path. Under ``torch.compile``
    it is decided while tracing (a guard for dynamic shapes), so a correct backend adds no graph break.
    The public function that ran the backend adds its name to the message (:func:`hrperc._errors.public`).

    Example::

        >>> b = AttentionBackend("mine", lambda q, k, v, grid, **kw: q[:1])
        >>> q = torch.zeros(4, 9, 1, 8)
        >>> check_output(b, b.fn(q, q, q, (2, 2)), q.shape, q, form="fn", layout="(B*N, T, heads, head_dim)")
        Traceback (most recent call last):
        ...
        ValueError: attention backend 'mine' returned a tensor of shape (1, 9, 1, 8)...(4, 9, 1, 8)...
    """
    if isinstance(out, torch.Tensor) and out.shape == shape and out.device == q.device:
        if out.dtype == q.dtype or _autocast_dtype(q) == out.dtype:
            return out
    raise _bad_output(backend, out, shape, q, form, layout)


def _autocast_dtype(q: torch.Tensor) -> torch.dtype | None:
    """The dtype :func:`torch.autocast` computes in for ``q``'s device, or None outside autocast."""
    kind = q.device.type
    try:
        return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
    except RuntimeError:  # a device type autocast does not know
        return None


def _bad_output(backend, out, shape, q, form, layout) -> Exception:
    cast = _autocast_dtype(q)
    dtype = f"{q.dtype}" if cast in (None, q.dtype) else f"{q.dtype} (or {cast}, the autocast dtype)"
    expected = f"a tensor of shape {tuple(shape)} {layout}, dtype {dtype}, on {q.device}"
    if isinstance(out, torch.Tensor):
        got = f"a tensor of shape {tuple(out.shape)}, dtype {out.dtype}, on {out.device}"
        exc = ValueError if out.shape != shape else TypeError
    elif isinstance(out, tuple | list):
        got = f"a {type(out).__name__} of {len(out)} ({', '.join(type(x).__name__ for x in out[:4])})"
        exc = TypeError
    else:
        got = "None" if out is None else f"a {type(out).__name__}"
        exc = TypeError
    protocol = "WindowAttentionFn" if form == "fn" else "QuerySubsetFn"
    return exc(
        f"attention backend {backend.name!r} returned {got} from its {form}; expected {expected} "
        f"(hrperc.attention.{protocol}). Fix the backend's {form} to return that (one tensor, not a tuple; no "
        f"broadcasting), or use another backend: backend='auto', or unregister_backend({backend.name!r})."
    )
