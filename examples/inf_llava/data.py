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
processes that share it. Real instruction data in LLaVA's JSON format (``--data llava:<json>:<image dir>``)
is read by :class:`LlavaJsonDataset` with the same ``batch(indices)`` interface.

:func:`collate` turns samples (an image and ``turns`` of (question, answer)) into the keyword arguments of
the model (``LlavaForConditionalGeneration``) plus ``labels``: token ids with the config's prompt
template in which the image placeholder ``cfg.image_token`` becomes ``num_tokens((H, W))`` copies of
``cfg.image_token_id`` (one per visual token of the image, as transformers' Llava expects), and the
images packed by ``hrperc.integrations.transformers.pack_images``; labels are ``-100`` on the prompts,
the image tokens and the padding. :func:`encode_prompts` does the same for generation (left padding,
no answers).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from hrperc.integrations.transformers import pack_images

from .model import IGNORE_INDEX

__all__ = [
    "GlyphSample",
    "GlyphTask",
    "LlavaJsonDataset",
    "ConversationSample",
    "tokenize_with_images",
    "conversation_ids",
    "expand_image_tokens",
    "collate",
    "encode_prompts",
    "build_dataset",
    "COLOURS",
    "SHAPES",
    "ROWS",
    "COLUMNS",
]

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

    @property
    def turns(self) -> list[tuple[str, str]]:
        return [(self.question, self.answer)]


class GlyphTask:
    """Samples of the glyph task on an ``image_size`` canvas; ``glyph_size`` pixels per glyph side."""

    def __init__(self, image_size=(96, 96), glyph_size: int | None = None, seed: int = 0, noise: float = 0.03):
        self.image_size = tuple(image_size)
        H, W = self.image_size
        self.glyph_size = glyph_size or max(5, min(H, W) // 8)
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


@dataclass
class ConversationSample:
    image: torch.Tensor  # (3, H, W) in [0, 1], any size
    turns: list[tuple[str, str]]  # (human, gpt) pairs; the first human turn holds the image token


class LlavaJsonDataset:
    """LLaVA instruction data: a JSON list of ``{"image": <path under image_folder>, "conversations":
    [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}``
    (the paper's data: CC-595K, i.e. LLaVA-CC3M-Pretrain-595K, for stage 1, and the LLaVA-665K instruction
    mixture, which the paper calls "LLaVA-656K", for stage 2 (Sec. 5.2); the 558K LAION-CC-SBU set is
    the stage-1 data of the larger INF-LLaVA* of Table 2 only). Samples without an image are skipped."""

    def __init__(self, json_path, image_folder, image_token: str = "<image>"):
        records = json.loads(Path(json_path).read_text())
        self.records = [r for r in records if r.get("image")]
        if not self.records:
            raise ValueError(f"LlavaJsonDataset: {json_path} has no record with an 'image' field.")
        self.image_folder = Path(image_folder)
        self.image_token = image_token

    def __len__(self) -> int:
        return len(self.records)

    def sample(self, index: int) -> ConversationSample:
        import numpy as np
        from PIL import Image

        r = self.records[index % len(self.records)]
        with Image.open(self.image_folder / r["image"]) as im:
            image = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
        conv = r["conversations"]
        turns = [(conv[i]["value"], conv[i + 1]["value"]) for i in range(0, len(conv) - 1, 2)]
        return ConversationSample(image.contiguous(), turns)

    def batch(self, indices) -> list[ConversationSample]:
        return [self.sample(i) for i in indices]


def build_dataset(spec: str, cfg, glyph_size=None, seed: int = 0):
    """``"glyphs"`` (the synthetic task on ``cfg.image_size``) or ``"llava:<json>:<image folder>"``."""
    if spec == "glyphs":
        return GlyphTask(cfg.image_size, glyph_size=glyph_size, seed=seed)
    kind, _, rest = spec.partition(":")
    json_path, _, folder = rest.partition(":")
    if kind != "llava" or not json_path or not folder:
        raise ValueError(f"build_dataset: data={spec!r}; use 'glyphs' or 'llava:<annotations.json>:<image folder>'.")
    return LlavaJsonDataset(json_path, folder, cfg.image_token)


def tokenize_with_images(tokenizer, text: str, image_token: str, image_token_id: int, bos: bool) -> list[int]:
    """Token ids of ``text`` with every ``image_token`` replaced by one ``image_token_id``
    (:func:`expand_image_tokens` then repeats it to the image's token count)."""
    ids = [tokenizer.bos_token_id] if bos and tokenizer.bos_token_id is not None else []
    for i, piece in enumerate(text.split(image_token)):
        if i:
            ids.append(image_token_id)
        if piece:
            ids += tokenizer(piece, add_special_tokens=False).input_ids
    return ids


def _question(cfg, text: str, first: bool) -> str:
    if first and cfg.image_token not in text:
        return f"{cfg.image_token}\n{text}"  # LLaVA puts the image before the first question
    return text


def conversation_ids(tokenizer, cfg, turns, *, with_answers: bool = True) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one sample; labels are ``-100`` except on the answers (+ end token).

    Without answers (generation), the ids end with the last prompt, ready for the assistant's reply.
    """
    image_id = cfg.image_token_id(tokenizer)
    ids, labels = [], []
    for t, (question, reply) in enumerate(turns):
        prompt = cfg.prompt_template.format(question=_question(cfg, question, t == 0))
        p = tokenize_with_images(tokenizer, prompt, cfg.image_token, image_id, bos=t == 0)
        ids += p
        labels += [IGNORE_INDEX] * len(p)
        if with_answers:
            a = tokenizer(reply + cfg.answer_suffix, add_special_tokens=False).input_ids
            if not cfg.answer_suffix:
                a = a + [tokenizer.eos_token_id]
            ids += a
            labels += a
    return ids, labels


def expand_image_tokens(ids, labels, image_token_id: int, counts) -> tuple[list[int], list[int]]:
    """Repeat the ``k``-th image placeholder of ``ids`` ``counts[k]`` times (labels ``-100`` there)."""
    counts = list(counts)
    found = sum(t == image_token_id for t in ids)
    if found != len(counts):
        raise ValueError(
            f"expand_image_tokens: the text holds {found} image placeholder(s) (id {image_token_id}) but "
            f"{len(counts)} image(s) were given; put one image token per image in the text."
        )
    out_ids, out_labels, k = [], [], 0
    for t, lab in zip(ids, labels):
        if t == image_token_id:
            out_ids += [t] * counts[k]
            out_labels += [IGNORE_INDEX] * counts[k]
            k += 1
        else:
            out_ids.append(t)
            out_labels.append(lab)
    return out_ids, out_labels


def _pad(rows, value, side):
    L = max(map(len, rows))
    return torch.tensor(
        [(r + [value] * (L - len(r))) if side == "right" else ([value] * (L - len(r)) + r) for r in rows]
    )


def _image_size(image) -> tuple[int, int]:
    return (image.height, image.width) if hasattr(image, "height") else tuple(int(v) for v in image.shape[-2:])


def collate(samples, tokenizer, cfg, num_tokens) -> dict:
    """Right-padded ``input_ids``, ``attention_mask``, ``labels`` ``(B, L)``, and ``pixel_values``,
    ``image_sizes`` (``pack_images`` of the samples' images, any sizes).

    ``num_tokens``: ``(H, W) -> visual tokens`` of the model's encoder (``model_num_tokens(model)``);
    each sample's image placeholder is repeated that many times. One image per sample.
    """
    image_id = cfg.image_token_id(tokenizer)
    rows, labels = [], []
    for s in samples:
        ids, lab = conversation_ids(tokenizer, cfg, s.turns)
        ids, lab = expand_image_tokens(ids, lab, image_id, [num_tokens(_image_size(s.image))])
        rows.append(ids)
        labels.append(lab)
    pixel_values, image_sizes = pack_images([s.image for s in samples])
    return {
        "input_ids": _pad(rows, tokenizer.pad_token_id, "right"),
        "attention_mask": _pad([[1] * len(r) for r in rows], 0, "right"),
        "labels": _pad(labels, IGNORE_INDEX, "right"),
        "pixel_values": pixel_values,
        "image_sizes": image_sizes,
    }


def encode_prompts(tokenizer, cfg, questions: list[str], images, num_tokens) -> dict:
    """Left-padded ``input_ids`` and ``attention_mask`` ``(B, L)`` of single-turn prompts, one image each
    (``images``: ``(B, 3, H, W)`` or a list of ``(3, H_b, W_b)``), with ``pixel_values`` and ``image_sizes``:
    the keyword arguments of ``model.generate``."""
    images = list(images)
    if len(images) != len(questions):
        raise ValueError(
            f"encode_prompts: got {len(images)} image(s) for {len(questions)} question(s); pass one image per question."
        )
    image_id = cfg.image_token_id(tokenizer)
    rows = []
    for q, image in zip(questions, images):
        ids, lab = conversation_ids(tokenizer, cfg, [(q, "")], with_answers=False)
        rows.append(expand_image_tokens(ids, lab, image_id, [num_tokens(_image_size(image))])[0])
    pixel_values, image_sizes = pack_images(images)
    return {
        "input_ids": _pad(rows, tokenizer.pad_token_id, "left"),
        "attention_mask": _pad([[1] * len(r) for r in rows], 0, "left"),
        "pixel_values": pixel_values,
        "image_sizes": image_sizes,
    }
