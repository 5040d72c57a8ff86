"""A synthetic high-resolution task, generated on the fly: find a small coloured glyph on a large canvas.

Each sample is a noisy grey canvas ``(3, H, W)`` with one small glyph (a few pixels: a square, a
cross, a ring or a bar, in one of six colours) somewhere in one of the 3 x 3 regions, and one of three
questions: *what* is in the image, *where* is it, or *describe* it (what and where)::

    >>> from inf_llava.data import GlyphTask
    >>> task = GlyphTask(image_size=(96, 96))
    >>> s = task.sample(7)                 # deterministic in (seed, index): any rank can make sample 7
    >>> s.image.shape, s.question, s.answer
    (torch.Size([3, 96, 96]), 'describe the image .', 'a yellow square at the middle right')

Samples depend only on ``(seed, index)``, so a global batch is the same whatever the number of
processes that share it. :func:`collate` tokenizes with the config's prompt template, masks the
prompt out of the labels (``-100``) and right-pads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .model import IGNORE_INDEX

__all__ = ["GlyphSample", "GlyphTask", "collate", "COLOURS", "SHAPES", "ROWS", "COLUMNS"]

COLOURS = {
    "red": (1.0, 0.1, 0.1),
    "green": (0.1, 0.9, 0.1),
    "blue": (0.1, 0.2, 1.0),
    "yellow": (1.0, 0.95, 0.1),
    "white": (1.0, 1.0, 1.0),
    "magenta": (1.0, 0.1, 1.0),
}
SHAPES = ("square", "cross", "ring", "bar")
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "center", "right")


def _glyph_mask(shape: str, size: int) -> torch.Tensor:
    """``(size, size)`` bool stencil of a glyph."""
    m = torch.zeros(size, size, dtype=torch.bool)
    mid = size // 2
    if shape == "square":
        m[:] = True
    elif shape == "cross":
        m[mid, :] = True
        m[:, mid] = True
    elif shape == "ring":
        m[[0, -1], :] = True
        m[:, [0, -1]] = True
    elif shape == "bar":
        m[mid - 1 : mid + 1, :] = True
    else:
        raise ValueError(f"_glyph_mask: unknown shape {shape!r}; choose one of {SHAPES}.")
    return m


@dataclass
class GlyphSample:
    image: torch.Tensor  # (3, H, W) in [0, 1]
    question: str
    answer: str
    colour: str
    shape: str
    row: int
    column: int


class GlyphTask:
    """Samples of the glyph task on an ``image_size`` canvas; ``glyph_size`` pixels per glyph side."""

    def __init__(
        self, image_size=(96, 96), glyph_size: int | None = None, seed: int = 0, noise: float = 0.08
    ):
        self.image_size = tuple(image_size)
        H, W = self.image_size
        self.glyph_size = glyph_size or max(5, min(H, W) // 14)
        if self.glyph_size * 3 > min(H, W):
            raise ValueError(
                f"GlyphTask: glyph_size {self.glyph_size} does not fit three times into image_size {self.image_size}; "
                "use a smaller glyph or a larger canvas."
            )
        self.seed = int(seed)
        self.noise = float(noise)

    def sample(self, index: int) -> GlyphSample:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(index))
        H, W = self.image_size
        pick = lambda n: int(torch.randint(n, (1,), generator=g))  # noqa: E731
        colour, shape = list(COLOURS)[pick(len(COLOURS))], SHAPES[pick(len(SHAPES))]
        row, col = pick(3), pick(3)
        s = self.glyph_size
        # Top-left corner anywhere inside region (row, col), glyph fully inside it.
        y = row * H // 3 + pick(H // 3 - s + 1)
        x = col * W // 3 + pick(W // 3 - s + 1)
        grey = 0.35 + 0.2 * torch.rand((), generator=g)
        image = (grey + self.noise * torch.randn(3, H, W, generator=g)).clamp(0, 1)
        stencil = _glyph_mask(shape, s)
        patch = image[:, y : y + s, x : x + s]
        colour_t = torch.tensor(COLOURS[colour])[:, None, None].expand(3, s, s)
        image[:, y : y + s, x : x + s] = torch.where(stencil, colour_t, patch)
        where = f"{ROWS[row]} {COLUMNS[col]}"
        kind = pick(3)
        if kind == 0:
            question, answer = "what is in the image ?", f"a {colour} {shape}"
        elif kind == 1:
            question, answer = f"where is the {colour} {shape} ?", where
        else:
            question, answer = "describe the image .", f"a {colour} {shape} at the {where}"
        return GlyphSample(image, question, answer, colour, shape, row, col)

    def batch(self, indices) -> list[GlyphSample]:
        return [self.sample(i) for i in indices]


def normalize(images: torch.Tensor, cfg) -> torch.Tensor:
    """``(M, 3, H, W)`` in [0, 1] -> the encoder's normalisation (``cfg.image_mean``/``cfg.image_std``)."""
    mean = torch.tensor(cfg.image_mean, dtype=images.dtype)[:, None, None]
    std = torch.tensor(cfg.image_std, dtype=images.dtype)[:, None, None]
    return (images - mean) / std


def collate(samples: list[GlyphSample], tokenizer, cfg) -> dict[str, torch.Tensor]:
    """Tokenize ``prompt + answer + eos``; labels are ``-100`` on the prompt and the padding.

    Returns ``input_ids``, ``attention_mask``, ``labels`` ``(B, L)`` (right-padded) and ``images``
    ``(B, 3, H, W)`` normalised for the encoder.
    """
    rows, labels = [], []
    for s in samples:
        prompt = cfg.prompt_template.format(image=cfg.image_token, question=s.question)
        p = tokenizer(prompt).input_ids
        a = tokenizer(s.answer + cfg.answer_suffix, add_special_tokens=False).input_ids
        if not cfg.answer_suffix:
            a = a + [tokenizer.eos_token_id]
        rows.append(p + a)
        labels.append([IGNORE_INDEX] * len(p) + a)
    L = max(map(len, rows))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (L - len(r)) for r in rows])
    attention_mask = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows])
    label_t = torch.tensor([lab + [IGNORE_INDEX] * (L - len(lab)) for lab in labels])
    images = normalize(torch.stack([s.image for s in samples]), cfg)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_t, "images": images}
