"""Errors get their context once, at the public boundary (einops adds its pattern to every error in one place).

Helpers raise ``ValueError`` / ``TypeError`` saying what is wrong and how to fix it, without saying who
called them; the public function, constructor or ``forward`` the user called adds its name, once, on the
way out. So a helper shared by ten public functions never names the wrong one, and no caller name is
threaded down by hand.

* Only errors raised by hrperc's own code get the name (an error raised inside torch keeps its message).
* The outermost public boundary names it: the function the user called (``HighResEncoder`` when its
  ``forward`` refuses an image through ``to_pixels``; ``pack_images`` when that is what was called).
* The exception is the same object, re-raised with its traceback: only its message changes.

Example::

    >>> from hrperc._errors import public
    >>> from hrperc._validation import as_grid
    >>> @public
    ... def tile(grid):  # as_grid raises without a caller name; the boundary adds "tile: "
    ...     return as_grid(grid)
    >>> tile((0, 3))
    Traceback (most recent call last):
    ...
    ValueError: tile: grid=(0, 3); entries must be integers >= 1. Pass e.g. grid=(3, 3).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import TypeVar, overload

import torch

__all__ = ["public", "add_context"]

F = TypeVar("F", bound=Callable)

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_MESSAGE_ATTR = "_hrperc_message"  # the message before any boundary named it


def _raised_here(err: BaseException) -> bool:
    """Whether ``err`` was raised by a frame of hrperc's own source (its innermost traceback frame)."""
    tb, last = err.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    if last is None:  # raised from C or constructed by hand: not ours to rename
        return False
    return os.path.abspath(last.tb_frame.f_code.co_filename).startswith(_PACKAGE_DIR)


def add_context(err: BaseException, name: str) -> None:
    """Prefix ``err``'s message with ``name: `` (replacing an inner boundary's name: the outermost one
    stays), unless hrperc did not raise it."""
    message = getattr(err, _MESSAGE_ATTR, None)
    if message is None:
        if not (_raised_here(err) and err.args and isinstance(err.args[0], str)):
            return
        message = err.args[0]
        setattr(err, _MESSAGE_ATTR, message)
    err.args = (f"{name}: {message}", *err.args[1:])


@overload
def public(fn: F) -> F: ...
@overload
def public(*, name: str | Callable[..., str]) -> Callable[[F], F]: ...
def public(fn=None, *, name=None):
    """Mark ``fn`` as a public boundary: hrperc's ``ValueError`` / ``TypeError`` / ``FileNotFoundError``
    raised inside it are prefixed with ``name`` (default: the function's ``__name__``). Use
    ``name="HighResEncoder"`` on a class's ``__init__`` / ``forward``; a callable ``name`` gets the call's
    arguments and returns the name (``create_encoder('internvl')``: the recipe the user asked for)."""

    def decorate(f: F) -> F:

        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            try:
                return f(*args, **kwargs)
            except (ValueError, TypeError, FileNotFoundError) as err:
                # Under torch.compile the handler is traced too: leave the error as raised (dynamo reports it
                # as is; naming it would need a graph break inside the handler, or hide it behind Unsupported).
                if not torch.compiler.is_compiling():
                    add_context(err, name(*args, **kwargs) if callable(name) else name or f.__name__)
                raise

        return wrapper  # type: ignore[return-value]

    return decorate if fn is None else decorate(fn)
