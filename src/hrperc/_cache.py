"""One cache for the small constant tensors (gather indices, interpolation weights) built from shapes."""

from __future__ import annotations

import functools

import torch


def tensor_cache(maxsize: int):
    """``functools.lru_cache`` for a function of hashable shape arguments that returns constant tensors.

    The tensors are built outside inference mode: a first call under ``torch.inference_mode()`` must
    not cache inference tensors that a later training step would have to save for backward. Callers
    only read the cached tensors (they are shared between calls). Under ``torch.compile`` the function
    is traced instead of looked up, so its tensors become constants of the graph (a cache hit would
    hand the compiler an opaque tensor built outside the trace).

    Example::

        >>> @tensor_cache(maxsize=8)
        ... def ramp(n, device=None):
        ...     return torch.arange(n, device=device)
        >>> with torch.inference_mode():
        ...     r = ramp(3)
        >>> r.is_inference(), ramp(3) is r
        (False, True)
    """

    def decorate(fn):
        @functools.lru_cache(maxsize=maxsize)
        def lookup(*args):
            with torch.inference_mode(False):
                return fn(*args)

        @functools.wraps(fn)
        def cached(*args):
            if torch.compiler.is_compiling():
                return fn(*args)
            return lookup(*args)

        cached.cache_info, cached.cache_clear = lookup.cache_info, lookup.cache_clear
        return cached

    return decorate
