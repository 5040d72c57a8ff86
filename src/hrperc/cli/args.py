"""Argument types and file reading shared by the ``hrperc`` subcommands."""

from __future__ import annotations

import argparse

import torch

from ..ops.pixels import pil_to_pixels
from .inputs import bomb_error, pil_pixel_limit

__all__ = [
    "load_image",
    "read_image",
    "parse_grid",
    "parse_max_batch",
    "parse_query",
    "parse_device",
    "positive_int",
    "parse_max_image_pixels",
    "parse_max_canvas_pixels",
]


def load_image(path) -> torch.Tensor:
    """Read an image file as a float ``(3, H, W)`` tensor in ``[0, 1]``, upright (EXIF orientation applied).

    16-bit and float files are scaled by their mode's range (see :func:`hrperc.ops.pixels.pil_to_pixels`). A
    file PIL cannot decode (truncated, corrupt, not an image) raises an ``OSError`` naming it; a missing
    file is PIL's ``FileNotFoundError``, and PIL's decompression-bomb refusal passes through unchanged.
    """
    from PIL import Image

    name = f"image file {str(path)!r}"
    try:
        with Image.open(path) as im:
            im.load()  # decode now, so that a truncated file fails here, with its name
            return pil_to_pixels(im, name=name)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except (OSError, SyntaxError, EOFError) as exc:  # PIL's decode errors (UnidentifiedImageError is an OSError)
        raise OSError(
            f"{name} cannot be decoded ({type(exc).__name__}: {exc}): it is truncated, corrupt or not an image "
            f"format PIL reads. Check the file (re-download or re-export it), or pass another image."
        ) from exc


def parse_grid(text: str):
    """``--grid``: ``auto``, ``floor`` or ``ROWSxCOLS`` (both at least 1)."""
    if text in ("auto", "floor"):
        return text
    try:
        gh, gw = (int(v) for v in text.lower().split("x"))
    except ValueError:
        gh = gw = 0
    if gh < 1 or gw < 1:
        raise argparse.ArgumentTypeError(
            f"--grid {text!r}: use 'auto', 'floor' or ROWSxCOLS with ROWS and COLS at least 1, e.g. 3x3"
        )
    return (gh, gw)


def parse_max_batch(text: str):
    """``--max-batch``: ``auto`` or a positive integer."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"--max-batch {text!r}: use 'auto' or a positive integer, e.g. 16")
    return value


def parse_query(text: str):
    """``--query``: ``ROW,COL`` on the token map."""
    try:
        r, c = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--query {text!r}: use ROW,COL on the token map, e.g. 36,48") from None
    return (r, c)


def positive_int(flag: str, maximum: int | None = None, why: str = ""):
    """An argparse ``type`` for ``flag`` (e.g. ``"--tile-size"``): a positive integer, at most ``maximum`` when
    given (``why`` says where that limit comes from), else a one-line error naming the flag and the value."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < 1:
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: use a positive integer, e.g. {flag} 336")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(
                f"{flag} {text!r} is over the limit of {maximum}{f' ({why})' if why else ''}; use at most "
                f"{flag} {maximum}, e.g. {flag} 336"
            )
        return value

    parse.__name__ = flag.lstrip("-").replace("-", "_")  # argparse names the type in its messages
    return parse


def _pixel_count(flag: str, example: int, doc: str):
    """An argparse ``type`` for ``flag``: a pixel count >= 0 (0: no limit)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = -1
        if value < 0:
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: use a pixel count, e.g. {example}, or 0 for no limit")
        return value

    parse.__doc__ = doc
    parse.__name__ = flag.lstrip("-").replace("-", "_")  # argparse names the type in its messages
    return parse


parse_max_image_pixels = _pixel_count(
    "--max-image-pixels",
    400000000,
    "``--max-image-pixels``: a positive integer (PIL's ``Image.MAX_IMAGE_PIXELS`` for this run), or 0 for no limit.",
)
parse_max_canvas_pixels = _pixel_count(
    "--max-canvas-pixels",
    50000000,
    "``--max-canvas-pixels``: the most canvas pixels an image may get (0: no limit); see :mod:`hrperc.cli.limits`.",
)


def parse_device(text: str) -> str:
    """``--device``: a torch device that holds data and is there: ``cpu``, ``cuda``, ``cuda:N``, ``mps``, ...

    ``meta`` (no data: every timing would be of nothing) is refused, and so are ``cuda``/``mps``/``xpu``
    when torch finds no such device, up front in one line instead of a traceback at the first tensor.
    """
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"--device {text!r} is not a torch device; use cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "meta":
        raise argparse.ArgumentTypeError(
            f"--device {text!r} holds no data (shapes only), so nothing would be computed or timed; use cpu or cuda"
        )
    if device.type == "cuda":
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            raise argparse.ArgumentTypeError(
                f"--device {text!r}: this torch build has no CUDA support (torch {torch.__version__}); use --device "
                "cpu, or install a CUDA build of torch"
            )
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(
                f"--device {text!r}: torch finds no CUDA GPU (no GPU visible, or no NVIDIA driver); use --device cpu"
            )
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(
                f"--device {text!r}: there are {count} CUDA GPU(s), cuda:0..cuda:{count - 1}; use one of them"
            )
    elif device.type in ("mps", "xpu"):
        module = getattr(torch.backends, "mps", None) if device.type == "mps" else getattr(torch, "xpu", None)
        if module is None or not module.is_available():
            raise argparse.ArgumentTypeError(
                f"--device {text!r}: torch finds no {device.type} device; use --device cpu"
            )
    return text


def read_image(path, max_pixels: int | None = None) -> torch.Tensor:
    """:func:`load_image` for the command line: ``(3, H, W)`` float in ``[0, 1]``, with PIL's pixel limit.

    ``max_pixels``: ``PIL.Image.MAX_IMAGE_PIXELS`` while reading (``None``: PIL's own, ``0``: no limit).
    PIL warns above it and refuses twice it as a possible decompression bomb (a small file declaring a huge
    image); that refusal becomes a ``ValueError`` naming the file, the limit and how to raise it.
    """
    from PIL import Image

    with pil_pixel_limit(max_pixels):
        try:
            return load_image(path)
        except Image.DecompressionBombError as exc:
            raise bomb_error(path, exc) from exc
