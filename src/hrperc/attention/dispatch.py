"""The backend registry and the dispatcher of :func:`hrperc.window_attention`.

Backends are :class:`~hrperc.attention.AttentionBackend` objects, registered by
:func:`register_backend` and removed by :func:`unregister_backend`. The dispatcher knows none of them
by name: a forced choice runs (or says why it cannot), and ``"auto"`` takes, among the backends that
declare the input's device type in ``auto_devices`` and can run the inputs, the one with the highest
``priority`` (with ``query_subset=True`` only backends that have a query-subset form).

A choice is forced, in this precedence, by an explicit ``backend="name"`` argument, by
``with attention_backend("name"):`` (scoped to the block, per thread and per async task), or by the
environment variable ``HRPERC_ATTN_BACKEND``. Unknown names raise ``ValueError``.

Example::

    >>> import torch
    >>> from hrperc.attention import attention_backend, resolve_backend
    >>> q = torch.zeros(4, 4, 1, 8)
    >>> kw = dict(grid=(2, 2), tile_size=(2, 2), window="contiguous", q_order="contiguous",
    ...           kv_order="contiguous", out_order="contiguous", scale=1.0)
    >>> resolve_backend("auto", q, q, q, **kw).name
    'sdpa'
    >>> with attention_backend("reference"):
    ...     resolve_backend("auto", q, q, q, **kw).name
    'reference'
"""

from __future__ import annotations

import contextlib
import contextvars
import os

from .._errors import public
from .backend import AttentionBackend

__all__ = [
    "register_backend",
    "unregister_backend",
    "available_backends",
    "get_backend",
    "attention_backend",
    "forced_backend",
    "resolve_backend",
    "ENV_VAR",
    "BackendUnavailableError",
]

ENV_VAR = "HRPERC_ATTN_BACKEND"

_REGISTRY: dict[str, AttentionBackend] = {}


class BackendUnavailableError(NotImplementedError):
    """No backend can run the inputs: the forced one cannot (the message says why), or none ``"auto"`` may pick.

    A ``NotImplementedError``, so ``except NotImplementedError`` still catches it.
    """


_FORCED: contextvars.ContextVar[str | None] = contextvars.ContextVar("hrperc_attention_backend", default=None)


@public
def register_backend(backend: AttentionBackend, *, replace: bool = False) -> AttentionBackend:
    """Add ``backend`` under ``backend.name``; returns it. A taken name raises unless ``replace=True``.

    Example::

        >>> from hrperc.attention import AttentionBackend, register_backend, unregister_backend
        >>> from hrperc.attention.reference import sdpa_window_attention
        >>> _ = register_backend(AttentionBackend("sdpa_copy", sdpa_window_attention))
        >>> "sdpa_copy" in available_backends()
        True
        >>> unregister_backend("sdpa_copy")
    """
    if not isinstance(backend, AttentionBackend):
        raise TypeError(
            f"backend is a {type(backend).__name__}; pass an AttentionBackend, e.g. "
            f"register_backend(AttentionBackend('mine', fn, devices=('cuda',)))."
        )
    if backend.name in _REGISTRY and not replace:
        raise ValueError(
            f"a backend named {backend.name!r} is already registered. Pick another name, pass "
            f"replace=True, or unregister_backend({backend.name!r}) first."
        )
    _REGISTRY[backend.name] = backend
    return backend


def unregister_backend(name: str) -> None:
    """Remove the backend ``name``; a name that is not registered raises ``KeyError``."""
    if name not in _REGISTRY:
        raise KeyError(f"unregister_backend: no backend named {name!r}; registered: {available_backends()}.")
    del _REGISTRY[name]


def available_backends() -> tuple[str, ...]:
    """Names of the registered backends, e.g. ``('reference', 'sdpa', 'triton')``."""
    return tuple(_REGISTRY)


@public
def get_backend(name: str) -> AttentionBackend:
    """The registered :class:`~hrperc.attention.AttentionBackend` called ``name``."""
    return _REGISTRY[_registered(name, "name=")]


def _registered(name, shown: str, others: str = "") -> str:
    """``name`` when a backend of that name is registered: else a ``TypeError`` for a non-string (one rule,
    one type, wherever a backend name is taken) or a ``ValueError`` for an unknown name. ``shown`` says
    where the name came from (``"backend="``); ``others`` adds the choices besides the registered names."""
    if not isinstance(name, str):
        raise TypeError(f"{shown}{name!r} is not a backend name (a str); pass one of {available_backends()}{others}.")
    if name not in _REGISTRY:
        raise ValueError(f"{shown}{name!r} is not a registered backend; pass one of {available_backends()}{others}.")
    return name


@public
def attention_backend(name: str | None) -> contextlib.AbstractContextManager[None]:
    """Force a window-attention backend inside a ``with`` block; ``None`` or ``"auto"`` un-forces.

    Scoped to the block (and to this thread or async task); nested blocks restore the outer choice.
    Takes precedence over ``$HRPERC_ATTN_BACKEND``; an explicit ``backend=`` argument other than
    ``"auto"`` takes precedence over both. An unknown name raises here, when called.

    Example::

        >>> with attention_backend("reference"):
        ...     forced_backend()
        'reference'
        >>> forced_backend() is None
        True
    """
    if name is not None and name != "auto":
        _registered(name, "name=", ", 'auto' or None")
    return _forcing(None if name == "auto" else name)


@contextlib.contextmanager
def _forcing(name: str | None):
    """The scope of :func:`attention_backend` (the name is checked before the block is entered)."""
    token = _FORCED.set(name)
    try:
        yield
    finally:
        _FORCED.reset(token)


def forced_backend(backend: str | None = "auto") -> str | None:
    """The backend name forced by ``backend=``, else :func:`attention_backend`, else ``$HRPERC_ATTN_BACKEND``.

    ``None`` when nothing is forced. Raises ``ValueError`` for a name that is not registered (``TypeError``
    for a ``backend=`` that is not a string), saying where it came from.

    Example::

        >>> forced_backend("sdpa")
        'sdpa'
    """
    if backend is not None and backend != "auto":
        return _registered(backend, "backend=", " or 'auto'")
    forced, source = _FORCED.get(), "attention_backend("
    if forced is None:
        forced, source = os.environ.get(ENV_VAR) or None, f"${ENV_VAR}="
        if forced == "auto":
            forced = None
    return None if forced is None else _registered(forced, source, " or 'auto'")


@public
def resolve_backend(backend: str | None, q, k, v, *, query_subset: bool = False, **kw) -> AttentionBackend:
    """The backend :func:`hrperc.window_attention` runs for these inputs (see the module docs).

    A forced backend is returned when it can run the inputs, else :class:`BackendUnavailableError` (a
    ``NotImplementedError``) says why, where the choice came from, and every registered backend's verdict.
    A forced backend is returned even without a query-subset form (the DEM then computes whole windows),
    and without its ``auto_check`` (e.g. the Triton kernel's self-check). ``"auto"`` with
    ``query_subset=True`` only considers backends that have one, and takes a backend only when
    :meth:`~hrperc.attention.AttentionBackend.auto_supports` (``supports``, then ``auto_check``) says yes.
    ``kw`` are the normalised keywords a backend receives (``grid``, ``tile_size``, ``window``, ...).
    """
    forced = forced_backend(backend)
    if forced is not None:
        chosen = _REGISTRY[forced]
        reason = chosen.supports(q, k, v, **kw)
        if reason is not None:
            raise BackendUnavailableError(_cannot_run(forced, _forced_source(backend), reason, q, k, v, kw))
        return chosen
    candidates = [
        b
        for b in _REGISTRY.values()
        if b.auto_eligible(q.device.type) and (b.query_subset is not None or not query_subset)
    ]
    for b in sorted(candidates, key=lambda b: -b.priority):
        if b.auto_supports(q, k, v, **kw) is None:
            return b
    lines = [f"window_attention: no registered backend can run these inputs automatically ({_describe(q)})."]
    lines += [f"  {name}: {_verdict(b, q, k, v, kw)}" for name, b in _REGISTRY.items()]
    lines.append("Register one that can (hrperc.attention.register_backend), or force one with backend=.")
    raise BackendUnavailableError("\n".join(lines))


def _describe(t) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _verdict(b: AttentionBackend, q, k, v, kw) -> str:
    reason = b.supports(q, k, v, **kw)
    if reason is not None:
        return reason
    if not b.auto_eligible(q.device.type):
        return f"can run when forced (auto_devices={b.auto_devices})"
    reason = b.auto_supports(q, k, v, **kw)
    return "can run" if reason is None else f"can run when forced (not for auto: {reason})"


def _forced_source(backend) -> str:
    """Where the forced choice came from, for messages: ``backend=``, ``attention_backend(...)`` or the variable."""
    if backend is not None and backend != "auto":
        return "backend="
    return "attention_backend(...)" if _FORCED.get() is not None else f"${ENV_VAR}"


def _cannot_run(name, source, reason, q, k, v, kw) -> str:
    lines = [f"window_attention: backend {name!r} (forced by {source}) cannot run these inputs: {reason}."]
    for label, t in (("q", q), ("k", k), ("v", v)):
        lines.append(f"  {label}: {_describe(t)}")
    lines.append(f"  window={kw.get('window')!r}, grid={kw.get('grid')}, tile_size={kw.get('tile_size')}")
    for other, b in _REGISTRY.items():
        r = b.supports(q, k, v, **kw)
        lines.append(f"  {other}: {'can run' if r is None else r}")
    fix = f" (unset ${ENV_VAR} or set it to 'auto')" if source.startswith("$") else ""
    lines.append(f"Pick a backend that can run them, or backend='auto'{fix}.")
    return "\n".join(lines)
