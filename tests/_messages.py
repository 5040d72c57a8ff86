"""Error-message checks: the names and values a message must contain, never its wording.

A message is checked for the argument it refuses with the value received (``"combine='sum'"``), the
limits or choices (``"'mean'"``), the shapes and numbers, and the argument its fix names; the sentence
around them is free to change.
"""

from __future__ import annotations

import contextlib
import re

import pytest

# Every error message must say how to fix it, not only what is wrong (a project rule): one of these verbs.
FIX = re.compile(r"\b(Pass|pass|Use|use|Drop|Add|Resize|Check|Convert|Skip|Raise|Lower|Pick|Fix)\b")


def assert_names(msg: str, *fragments: str | re.Pattern) -> None:
    """Assert that ``msg`` contains every fragment, in any order: a ``str`` as a literal substring, a
    compiled pattern by ``search`` (for a short name that must stand as a word, e.g. ``re.compile(r"\\bk\\b")``).
    """
    missing = [f for f in fragments if (f.search(msg) is None if isinstance(f, re.Pattern) else f not in msg)]
    assert not missing, f"message lacks {missing}: {msg}"


@contextlib.contextmanager
def raises_naming(exc, *fragments: str | re.Pattern):
    """``pytest.raises(exc)`` whose message must contain every fragment (see :func:`assert_names`)."""
    with pytest.raises(exc) as info:
        yield info
    assert_names(str(info.value), *fragments)


@contextlib.contextmanager
def warns_naming(category, *fragments: str):
    """``pytest.warns(category)`` where one warning of that category contains every fragment."""
    with pytest.warns(category) as record:
        yield record
    texts = [str(w.message) for w in record if issubclass(w.category, category)]
    assert any(all(f in t for f in fragments) for t in texts), f"no warning names {list(fragments)}: {texts}"
