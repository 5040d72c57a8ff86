"""The one place hrperc's version is written; ``pyproject.toml`` reads it (``dynamic = ["version"]``).

The installed package's metadata is built from it::

    >>> from importlib.metadata import version
    >>> version("hrperc") == __version__
    True
"""

__version__ = "0.1.0"
