"""A synthetic high-resolution task for comparing front ends (``docs/study.md``).

Every image (square, ``size`` x ``size`` px, 672-2016 in the study) is drawn procedurally from
``(seed, split, index)`` -- no downloads, the same pixels on every machine -- and comes with the answers
to four questions, each from the closed set ``{0, 1, 2, 3}`` (chance: 25 %):

``glyph``  which of four small glyphs (a few pixels wide: the side / 96, 7 px at 672) sits inside the
           red ring -- fine detail: after a resize to one 224 px tile the glyph is ~2 px and the four
           glyphs, drawn with nearly the same ink, blur into the same grey dot;
``match``  which corner box (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right) holds the same
           glyph as the ring -- fine detail in five distant regions and a relation between them;
``count``  how many yellow discs are in the image, minus one (1-4 discs) -- a count over the whole image;
           discs are placed on the 1/3 and 2/3 lines on purpose, so a 3 x 3 tiling cuts them;
``link``   which of four magenta end markers (0 top, 1 right, 2 bottom, 3 left) is joined by an
           unbroken thin line to the white centre square -- the lines cross tile borders, and the three
           distractor lines stop a glyph's width short of the centre (a gap only full resolution shows).

Images are ``(3, size, size)`` uint8 tensors (what the recipes take); ``answers`` is ``(4,)`` int64 in
the order of :data:`QUESTIONS`.

Example::

    >>> image, answers = make_sample(size=672, seed=0, index=0)
    >>> tuple(image.shape), image.dtype, tuple(answers.shape)
    ((3, 672, 672), torch.uint8, (4,))
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "QUESTIONS",
    "NUM_ANSWERS",
    "GLYPHS",
    "STUDY_SIZES",
    "MIN_SIZE",
    "MAX_SIZE",
    "MAX_SEED",
    "SPLITS",
    "make_sample",
    "make_batch",
    "check_size",
    "check_seed",
    "check_glyph_scale",
    "MAX_GLYPH_SCALE",
    "PLACES",
    "ring_crops",
]

QUESTIONS = ("glyph", "match", "count", "link")
NUM_ANSWERS = 4
#: The study's image sides (``run.py`` refuses others outside quick mode).
STUDY_SIZES = (672, 2016)
#: What the task itself draws (quick mode uses tiny images; a glyph needs >= 5 px).
MIN_SIZE, MAX_SIZE = 64, 2016
MAX_SEED = 2**31 - 1
#: Glyphs drawn ``glyph_scale`` times larger still fit inside the ring's white disc and the corner boxes.
MAX_GLYPH_SCALE = 3
SPLITS = ("train", "test")

# Four 5 x 5 glyphs with nearly the same ink (8-9 pixels), so that a blurred glyph says nothing.
_G = {
    "plus": ["..#..", "..#..", "#####", "..#..", "..#.."],
    "cross": ["#...#", ".#.#.", "..#..", ".#.#.", "#...#"],
    "ring": [".....", ".###.", ".#.#.", ".###.", "....."],
    "bars": [".#.#.", ".#.#.", ".....", ".#.#.", ".#.#."],
}
GLYPHS = tuple(_G)
_BITMAPS = np.stack([np.array([[c == "#" for c in row] for row in _G[name]]) for name in GLYPHS])

_BG, _INK = (128, 128, 128), (0, 0, 0)
_RED, _BLUE, _YELLOW, _MAGENTA, _WHITE = (220, 30, 30), (40, 60, 220), (240, 220, 0), (220, 0, 220), (255, 255, 255)


def check_size(size, *, lo: int = MIN_SIZE, hi: int = MAX_SIZE, name: str = "size") -> int:
    """``size`` as an int in ``[lo, hi]``, or a one-line ``ValueError``/``TypeError`` naming it."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise TypeError(f"{name}={size!r} is not a whole number; pass an image side in pixels, {lo}..{hi}.")
    if not lo <= int(size) <= hi:
        raise ValueError(f"{name}={size} is out of range; pass an image side in pixels, {lo}..{hi}.")
    return int(size)


def check_glyph_scale(glyph_scale, name: str = "glyph_scale") -> int:
    """``glyph_scale`` as an int in ``1..MAX_GLYPH_SCALE``, or a one-line error naming it."""
    if isinstance(glyph_scale, bool) or not isinstance(glyph_scale, (int, np.integer)):
        raise TypeError(f"{name}={glyph_scale!r} is not a whole number; pass 1..{MAX_GLYPH_SCALE}.")
    if not 1 <= int(glyph_scale) <= MAX_GLYPH_SCALE:
        raise ValueError(
            f"{name}={glyph_scale} is out of range; pass 1..{MAX_GLYPH_SCALE} (a larger glyph leaves the ring)."
        )
    return int(glyph_scale)


def check_seed(seed, name: str = "seed") -> int:
    """``seed`` as an int in ``[0, MAX_SEED]``, or a one-line error naming it."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{name}={seed!r} is not a whole number; pass a seed in 0..{MAX_SEED}.")
    if not 0 <= int(seed) <= MAX_SEED:
        raise ValueError(f"{name}={seed} is out of range; pass a seed in 0..{MAX_SEED}.")
    return int(seed)


def _rect(img, y0, x0, y1, x1, color):
    s = img.shape[0]
    img[max(y0, 0) : min(y1, s), max(x0, 0) : min(x1, s)] = color


def _disc(img, cy, cx, r, color, inner: float = 0.0):
    s = img.shape[0]
    y0, y1, x0, x1 = max(int(cy - r) - 1, 0), min(int(cy + r) + 2, s), max(int(cx - r) - 1, 0), min(int(cx + r) + 2, s)
    yy, xx = np.arange(y0, y1)[:, None] + 0.5, np.arange(x0, x1)[None, :] + 0.5
    d2 = (yy - cy) ** 2 + (xx - cx) ** 2
    img[y0:y1, x0:x1][(d2 <= r * r) & (d2 >= inner * inner)] = color


def _segment(img, p, q, width, color):
    """A thick segment from ``p`` to ``q`` ((y, x), pixels): the pixels within ``width / 2`` of it."""
    s, h = img.shape[0], width / 2 + 1
    y0, y1 = max(int(min(p[0], q[0]) - h), 0), min(int(max(p[0], q[0]) + h) + 1, s)
    x0, x1 = max(int(min(p[1], q[1]) - h), 0), min(int(max(p[1], q[1]) + h) + 1, s)
    yy, xx = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5, np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5
    dy, dx = q[0] - p[0], q[1] - p[1]
    t = np.clip(((yy - p[0]) * dy + (xx - p[1]) * dx) / max(dy * dy + dx * dx, 1e-9), 0.0, 1.0)
    d2 = (yy - p[0] - t * dy) ** 2 + (xx - p[1] - t * dx) ** 2
    img[y0:y1, x0:x1][d2 <= (width / 2) ** 2] = color


def _glyph(img, cy, cx, kind, cell):
    """Glyph ``kind`` centred at ``(cy, cx)``, each bitmap pixel ``cell`` x ``cell`` image pixels."""
    g = _BITMAPS[kind].repeat(cell, 0).repeat(cell, 1)
    n = g.shape[0]
    y0, x0 = int(cy) - n // 2, int(cx) - n // 2
    img[y0 : y0 + n, x0 : x0 + n][g] = _INK


def _draw(rng: np.random.Generator, size: int, glyph_scale: int = 1) -> tuple[np.ndarray, np.ndarray]:
    s = size
    u = s / 96.0  # the scene's unit: a glyph is one unit wide (5 bitmap pixels of max(1, u/5) px)
    cell = max(1, round(u / 5)) * glyph_scale
    # Low-contrast noise so that flat grey is not a free cue for "nothing here" (one pass: grey + noise).
    img = rng.integers(0, 12, size=(s, s, 1), dtype=np.uint8) + np.array(_BG, np.uint8)

    answers = np.zeros(4, np.int64)
    # link: four end markers near the middle of each side; one line reaches the centre, three stop short.
    c = s / 2
    ends = [(5 * u, c), (c, s - 5 * u), (s - 5 * u, c), (c, 5 * u)]  # top, right, bottom, left
    answers[3] = linked = rng.integers(4)
    width = max(1.0, 0.4 * u)
    for k, (ey, ex) in enumerate(ends):
        # A bend point off the straight path makes each line cross tile borders at a random place.
        by, bx = ey + (c - ey) * 0.5 + rng.uniform(-18, 18) * u, ex + (c - ex) * 0.5 + rng.uniform(-18, 18) * u
        vy, vx = c - by, c - bx
        norm = max((vy * vy + vx * vx) ** 0.5, 1e-6)
        gap = 0.0 if k == linked else 1.0 * u
        stop = (c - vy / norm * (1.5 * u + gap), c - vx / norm * (1.5 * u + gap))
        _segment(img, (ey, ex), (by, bx), width, _MAGENTA)
        _segment(img, (by, bx), stop, width, _MAGENTA)
        _rect(img, int(ey - 2 * u), int(ex - 2 * u), int(ey + 2 * u), int(ex + 2 * u), _MAGENTA)
    _rect(img, int(c - 1.5 * u), int(c - 1.5 * u), int(c + 1.5 * u), int(c + 1.5 * u), _WHITE)

    # glyph + match: the ring's glyph, and a permutation of the four glyphs in the corner boxes.
    kinds = rng.permutation(4)
    for k, (cy, cx) in enumerate([(9 * u, 9 * u), (9 * u, s - 9 * u), (s - 9 * u, 9 * u), (s - 9 * u, s - 9 * u)]):
        _rect(img, int(cy - 2.5 * u), int(cx - 2.5 * u), int(cy + 2.5 * u), int(cx + 2.5 * u), _BLUE)
        _rect(img, int(cy - 1.5 * u), int(cx - 1.5 * u), int(cy + 1.5 * u), int(cx + 1.5 * u), _WHITE)
        _glyph(img, cy, cx, kinds[k], cell)
    answers[0] = ring_kind = rng.integers(4)
    answers[1] = int(np.flatnonzero(kinds == ring_kind)[0])
    # The ring goes in one of the four quadrants' inner parts (clear of the corner boxes and the centre).
    qy, qx = rng.integers(2), rng.integers(2)
    ry = (rng.uniform(22, 38) if qy == 0 else rng.uniform(58, 74)) * u
    rx = (rng.uniform(22, 38) if qx == 0 else rng.uniform(58, 74)) * u
    _disc(img, ry, rx, 3.5 * u, _RED, inner=2.3 * u)
    _disc(img, ry, rx, 2.2 * u, _WHITE)
    _glyph(img, ry, rx, ring_kind, cell)

    # count: 1-4 discs, each centred on a 1/3 or 2/3 line (cut by a 3 x 3 tiling), away from the rest.
    answers[2] = n = rng.integers(4)
    placed = 0
    spots = [(a, b) for a in (1 / 3, 2 / 3) for b in np.linspace(0.18, 0.82, 5)]
    for i in rng.permutation(len(spots)):
        if placed > n:
            break
        a, b = spots[i]
        cy, cx = (a * s, b * s) if rng.integers(2) else (b * s, a * s)
        if abs(cy - ry) < 9 * u and abs(cx - rx) < 9 * u:
            continue  # would touch the ring
        if abs(cy - c) < 7 * u and abs(cx - c) < 7 * u:
            continue  # would hide the centre square
        _disc(img, cy, cx, 3 * u, _YELLOW)
        placed += 1
    answers[2] = placed - 1
    return img, answers


def make_sample(size: int = 672, seed: int = 0, index: int = 0, split: str = "train", glyph_scale: int = 1):
    """One image ``(3, size, size)`` uint8 and its answers ``(4,)`` int64, a pure function of the arguments.

    ``split`` (``"train"`` or ``"test"``) selects disjoint random streams, so the held-out set is never
    trained on whatever the number of training steps. ``glyph_scale`` (1..3) draws the same scene with every
    glyph's bitmap pixels that many times larger; the answers do not change.
    """
    img, answers = _sample(size, seed, index, split, glyph_scale)
    return torch.from_numpy(img).permute(2, 0, 1).contiguous(), torch.from_numpy(answers)


def _sample(size, seed, index, split, glyph_scale=1) -> tuple[np.ndarray, np.ndarray]:
    size, seed = check_size(size), check_seed(seed)
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}.")
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"index={index!r} must be a whole number >= 0.")
    glyph_scale = check_glyph_scale(glyph_scale)
    return _draw(np.random.default_rng([seed, SPLITS.index(split), int(index)]), size, glyph_scale)


def make_batch(indices, size: int = 672, seed: int = 0, split: str = "train", glyph_scale: int = 1):
    """Images ``(B, 3, size, size)`` uint8 and answers ``(B, 4)`` int64 for the sample ``indices``.

    The same pixels as stacking :func:`make_sample`'s images, written once into the batch (no per-image
    copy and no second one to stack them).
    """
    indices = [int(i) for i in indices]
    images = torch.empty((len(indices), 3, size, size), dtype=torch.uint8)
    answers = torch.empty((len(indices), len(QUESTIONS)), dtype=torch.int64)
    for k, i in enumerate(indices):
        img, ans = _sample(size, seed, i, split, glyph_scale)
        images[k] = torch.from_numpy(img).permute(2, 0, 1)
        answers[k] = torch.from_numpy(ans)
    return images, answers


#: Where :func:`ring_crops` puts the ring's glyph in its crop (see there).
PLACES = ("centred", "patch", "pixel", "thumbnail")


def ring_crops(images: torch.Tensor, place: str, side: int = 224, patch: int = 16) -> torch.Tensor:
    """Crops ``(B, 3, side, side)`` uint8 around the red ring of each image ``(B, 3, S, S)`` uint8, at full
    resolution, so that the ring's glyph is in view at its full size; ``place`` says where it sits:

    ``centred``   at the crop's centre: the same pixels relative to the patch grid in every image;
    ``patch``     moved by a whole number of patches (up to ``side * 80 // 224`` px each way): anywhere on
                  the patch grid, always at the same place inside its patch;
    ``pixel``     moved by any number of pixels (up to ``side * 80 // 224`` each way), as in the task;
    ``thumbnail`` no crop: the whole image resized to ``side`` px (what a single-view front end sees).

    The offset is drawn from the image's own pixels: the same crop for the same image on every run.

    Example::

        >>> images, answers = make_batch(range(2), size=672)
        >>> tuple(ring_crops(images, "pixel").shape)
        (2, 3, 224, 224)
    """
    if place not in PLACES:
        raise ValueError(f"place={place!r} is not one of {PLACES}.")
    if place == "thumbnail":
        resized = F.interpolate(images.float(), size=(side, side), mode="bicubic", antialias=True)
        return resized.clamp(0, 255).to(torch.uint8)
    out, h, reach = [], side // 2, side * 80 // 224
    for im in images:
        red = (im[0] > 200) & (im[1] < 60) & (im[2] < 60)
        ys, xs = red.nonzero(as_tuple=True)
        cy, cx = int(ys.float().mean()), int(xs.float().mean())
        g = torch.Generator().manual_seed(int(im[:, :16, :16].sum()) * 1009 + cy * 7 + cx)
        if place == "patch":
            n = max(1, reach // patch)
            dy, dx = (patch * int(v) for v in torch.randint(-n, n + 1, (2,), generator=g))
        elif place == "pixel":
            dy, dx = (int(v) for v in torch.randint(-reach, reach + 1, (2,), generator=g))
        else:
            dy = dx = 0
        # The crop's centre moves by (dy, dx): the ring (radius 3.5 glyphs: 25 px at 672) stays inside it.
        y0 = min(max(cy + dy - h, 0), im.shape[1] - side)
        x0 = min(max(cx + dx - h, 0), im.shape[2] - side)
        out.append(im[:, y0 : y0 + side, x0 : x0 + side])
    return torch.stack(out)
