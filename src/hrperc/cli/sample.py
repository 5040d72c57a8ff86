"""A high-resolution sample image that a single low-resolution view cannot read.

The picture (default 1344 x 1008, i.e. a 3 x 4 grid of 336 tiles) holds fine text a few pixels tall,
one-pixel lines and gratings, and small coloured marks: downsampled to one 336 tile (a 4x reduction)
the text and gratings turn to grey, while every local tile or strided sub-image keeps them.

Example::

    >>> from hrperc.cli.sample import make_sample_image
    >>> img = make_sample_image()            # PIL.Image, RGB, 1344 x 1008
    >>> img.size
    (1344, 1008)
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .._errors import public

__all__ = ["make_sample_image"]

_TEXT = (
    "INF-LLaVA reads fine print: the quick brown fox jumps over the lazy dog 0123456789",
    "Dual-perspective cropping keeps local detail and global context at every tile",
    "Invoice 2026-11-22  total 1,344.08  tax 8.5%  ref HRPERC-336-1008",
)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


@public
def make_sample_image(width: int = 1344, height: int = 1008, seed: int = 0) -> Image.Image:
    """Return an RGB ``PIL.Image`` of ``(width, height)`` with fine text, thin lines and small marks."""
    if width < 64 or height < 64:
        raise ValueError(f"size ({width}, {height}) is too small; use at least 64 x 64.")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    # A soft colour gradient as background, so the global view has something to see.
    base = np.stack([200 + 40 * xx / width, 210 + 30 * yy / height, 235 - 40 * xx / width], axis=-1).astype(np.uint8)
    img = Image.fromarray(base, "RGB")
    draw = ImageDraw.Draw(img)

    # Fine text in several sizes: 7-10 px glyphs become ~2 px in a 336 thumbnail of the whole image.
    y = 12
    for size in (8, 9, 10, 12):
        font = _font(size)
        for line in _TEXT:
            draw.text((14, y), line, fill=(20, 20, 30), font=font)
            y += size + 4
    # A second block of small print low in the frame, so several tiles hold text.
    y = height - 150
    for line in _TEXT:
        draw.text((40, y), line.upper(), fill=(40, 0, 60), font=_font(8))
        draw.text((width // 2 - 120, y + 60), line, fill=(0, 50, 30), font=_font(9))
        y += 14
    # One-pixel gratings at 2-4 px period: aliased away by a 4x downsample.
    for k, period in enumerate((2, 3, 4)):
        x0, y0 = 40 + 300 * k, height // 2
        for x in range(x0, x0 + 240, period):
            draw.line([(x, y0), (x, y0 + 160)], fill=(0, 0, 0), width=1)
    # Thin diagonal lines and a fine checkerboard patch.
    for k in range(12):
        draw.line([(width - 400 + 25 * k, height - 300), (width - 40, height - 300 + 22 * k)], fill=(90, 0, 0))
    board = ((np.indices((96, 96)).sum(0) % 2) * 255).astype(np.uint8)
    img.paste(Image.fromarray(board, "L").convert("RGB"), (width - 160, 40))
    # Small coloured marks (3-6 px) scattered across the canvas: "find the red dot" questions.
    colours = [(220, 30, 30), (30, 160, 40), (30, 60, 220), (240, 180, 0)]
    for k in range(24):
        cx, cy = int(rng.integers(20, width - 20)), int(rng.integers(height // 3, height - 20))
        r = int(rng.integers(2, 4))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colours[k % len(colours)])
    # Tile-scale structure: a large circle and a frame, visible in every view.
    cx, cy = width // 2, height // 2
    draw.ellipse([cx - 150, cy - 150, cx + 150, cy + 150], outline=(0, 90, 160), width=3)
    draw.rectangle([2, 2, width - 3, height - 3], outline=(0, 0, 0), width=2)
    return img
