"""Argument types and file reading shared by the ``hrperc`` subcommands."""

from __future__ import annotations

import argparse

import torch

from ..ops.pixels import pil_to_pixels

__all__ = ["load_image", "parse_grid", "parse_max_batch", "parse_query"]


def load_image(path) -> torch.Tensor:
    """Read an image file as a float ``(3, H, W)`` tensor in ``[0, 1]``."""
    from PIL import Image

    with Image.open(path) as im:
        return pil_to_pixels(im)


def parse_grid(text: str):
    """``--grid``: ``auto``, ``floor`` or ``ROWSxCOLS``."""
    if text in ("auto", "floor"):
        return text
    try:
        gh, gw = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--grid {text!r}: use 'auto', 'floor' or ROWSxCOLS, e.g. 3x3") from None
    return (gh, gw)


def parse_max_batch(text: str):
    """``--max-batch``: ``auto`` or a positive integer."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--max-batch {text!r}: use 'auto' or a positive integer") from None


def parse_query(text: str):
    """``--query``: ``ROW,COL`` on the token map."""
    try:
        r, c = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--query {text!r}: use ROW,COL on the token map, e.g. 36,48") from None
    return (r, c)
