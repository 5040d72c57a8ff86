"""Idefics3 / SmolVLM sizing: the longest-edge resize, the tile grid, the token count and the prompt text,
computed exactly as transformers' ``Idefics3ImageProcessor`` / ``SmolVLMImageProcessor`` (one code, two
classes) and ``Idefics3Processor`` / ``SmolVLMProcessor`` compute them (pure integer functions).

The image processor, with ``do_image_splitting=True`` (the default), takes an ``(H, W)`` image through
three resizes (LANCZOS, uint8 kept between them)::

    (H, W) --longest side to `longest_edge` (the other side: int(...), made even, >= 1; then kept
           under 4096 px)--> (h1, w1)                                                 resize_longest_edge
           --longest side rounded UP to a multiple of the tile t, the other side from it by the aspect
           ratio, then also rounded up to a multiple of t--> (H2, W2)                 vision_encoder_size
           --if H2 > t or W2 > t: rows x cols = (H2 / t, W2 / t) tiles of t x t, row-major,
             + the global image: the (H2, W2) image resized to (t, t)
             else: one view, the (H2, W2) = (t, t) image itself                       tile_grid

With ``do_image_splitting=False`` every image is one view: ``(h1, w1)`` resized to ``(t, t)``. Each view
gives ``image_seq_len = (t // patch)**2 // scale_factor**2`` tokens after the model's pixel shuffle
(:func:`image_seq_len`), so an image has ``(rows * cols + 1) * image_seq_len`` ``<image>`` tokens, or
``image_seq_len`` without tiles (:func:`num_tokens`). The processor writes them inside text markers
(:func:`prompt`)::

    tiles:    for each row r, for each column c: <fake_token_around_image><row_r_col_c><image>*n ; then "\\n"
              then "\\n<fake_token_around_image><global-img><image>*n<fake_token_around_image>"
    no tiles: <fake_token_around_image><global-img><image>*n<fake_token_around_image>

**Which count.** The processor writes the text from the grid its ``_preprocess`` made (``rows`` / ``cols``,
``return_row_col_info=True``), and that is what the functions here reproduce. transformers'
``get_number_of_image_patches`` (behind ``Idefics3Processor._get_num_multimodal_tokens``) computes the
second side from the first resize's side instead of the ``int(side / aspect)`` of the rounded-up side, and
so disagrees with the processor's own text when the longest edge is not a multiple of the tile (with the
released settings, 4 tiles' worth, the two agree): ``(1481, 751)`` with ``longest_edge=700`` and 364 px tiles
is resized to ``(700, 354)`` then ``(728, 728)``, 2 x 2 tiles in the text, where ``get_number_of_image_patches``
says 2 x 1; a 5000 px longest edge differs likewise past the 4096 px bound ((3683, 3869): 12 x 12 vs 11 x 12).
hrperc follows the text, which is what the model reads.

Example::

    >>> from hrperc.ops.idefics import resize_longest_edge, vision_encoder_size, tile_grid, num_tokens
    >>> resize_longest_edge((716, 1272), 2048), vision_encoder_size((1152, 2048), 512)   # SmolVLM-256M
    ((1152, 2048), (1536, 2048))
    >>> tile_grid((716, 1272), longest_edge=2048, tile=512)          # 12 tiles (+ the global image)
    (3, 4)
    >>> num_tokens((716, 1272), longest_edge=2048, tile=512, patch=16, scale_factor=4)    # 13 views x 64
    832
    >>> num_tokens((480, 640), longest_edge=1456, tile=364, patch=14, scale_factor=2)     # Idefics3: 13 x 169
    2197
    >>> prompt(1, 2, 2, image_token="I")
    '<fake_token_around_image><row_1_col_1>II<fake_token_around_image><row_1_col_2>II\\n\\n<fake_token_around_image><global-img>II<fake_token_around_image>'
"""

from __future__ import annotations

import math
import re

from .._errors import public
from .._validation import as_bool, as_image_size, as_int

__all__ = [
    "MAX_IMAGE_SIZE",
    "resize_longest_edge",
    "vision_encoder_size",
    "tile_grid",
    "image_seq_len",
    "num_tokens",
    "prompt",
    "tile_source",
    "layout_prompt",
]

#: The image processors' absolute bound on a side after the first resize (``MAX_IMAGE_SIZE``: 4k).
MAX_IMAGE_SIZE = 4096
#: The processors' marker tokens (``Idefics3Processor``'s and ``SmolVLMProcessor``'s defaults).
IMAGE_TOKEN, FAKE_TOKEN, GLOBAL_TOKEN = "<image>", "<fake_token_around_image>", "<global-img>"
_TILE = re.compile(r"row_(\d+)_col_(\d+)")


def _resize_longest_edge(image_size, longest_edge: int) -> tuple[int, int]:
    height, width = image_size
    # _resize_output_size_rescale_to_max_len (min_len=1): the longest side becomes longest_edge, always
    aspect_ratio = width / height
    if width >= height:
        width = longest_edge
        height = int(width / aspect_ratio)
        if height % 2 != 0:
            height += 1
    else:
        height = longest_edge
        width = int(height * aspect_ratio)
        if width % 2 != 0:
            width += 1
    height, width = max(height, 1), max(width, 1)
    # _resize_output_size_scale_below_upper_bound(max_len=MAX_IMAGE_SIZE)
    aspect_ratio = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width = MAX_IMAGE_SIZE
        height = int(width / aspect_ratio)
    elif height > width and height > MAX_IMAGE_SIZE:
        height = MAX_IMAGE_SIZE
        width = int(height * aspect_ratio)
    return max(height, 1), max(width, 1)


@public
def resize_longest_edge(image_size, longest_edge: int) -> tuple[int, int]:
    """``(h1, w1)``: the processors' first resize of an ``(H, W)`` image (``size={"longest_edge": ...}``).

    The longer side (the width on a tie) becomes ``longest_edge`` -- up or down --, the other
    ``int(longest_edge / aspect)`` made even by adding 1 and at least 1; then a side over 4096 px is brought
    to 4096 the same way (no evening). Exactly transformers' ``get_resize_output_image_size``.

    Example::

        >>> resize_longest_edge((480, 640), 1456), resize_longest_edge((3, 5000), 1456)
        ((1092, 1456), (1, 1456))
    """
    return _resize_longest_edge(as_image_size(image_size), as_int(longest_edge, "longest_edge"))


def _vision_encoder_size(size, tile: int) -> tuple[int, int]:
    height, width = size
    # resize_for_vision_encoder: the long side rounded up, the short side re-derived from it, rounded up
    aspect_ratio = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = int(width / aspect_ratio)
        height = math.ceil(height / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = int(height * aspect_ratio)
        width = math.ceil(width / tile) * tile
    return height, width


@public
def vision_encoder_size(size, tile: int) -> tuple[int, int]:
    """``(H2, W2)``: the processors' second resize (``resize_for_vision_encoder``) of a ``(h1, w1)`` image, both
    sides multiples of ``tile`` (``max_image_size["longest_edge"]``).

    The longer side is rounded up to a multiple of ``tile``; the other is ``int(new long side / aspect)``,
    rounded up to a multiple of ``tile`` as well.

    Example::

        >>> vision_encoder_size((1092, 1456), 364), vision_encoder_size((2, 1456), 364)
        ((1092, 1456), (364, 1456))
    """
    return _vision_encoder_size(as_image_size(size, "size"), as_int(tile, "tile"))


def _tile_grid(image_size, longest_edge: int, tile: int, splitting: bool = True) -> tuple[int, int]:
    if not splitting:
        return 0, 0
    H2, W2 = _vision_encoder_size(_resize_longest_edge(image_size, longest_edge), tile)
    if H2 > tile or W2 > tile:
        return math.ceil(H2 / tile), math.ceil(W2 / tile)
    return 0, 0


@public
def tile_grid(image_size, *, longest_edge: int, tile: int, splitting: bool = True) -> tuple[int, int]:
    """``(rows, cols)`` of ``tile`` x ``tile`` tiles the processors cut an ``(H, W)`` image into; ``(0, 0)`` when
    the image is one view (its resized image is one tile, or ``splitting=False``: ``do_image_splitting``).

    Example::

        >>> tile_grid((480, 640), longest_edge=1456, tile=364), tile_grid((20, 20), longest_edge=364, tile=364)
        ((3, 4), (0, 0))
    """
    return _tile_grid(
        as_image_size(image_size),
        as_int(longest_edge, "longest_edge"),
        as_int(tile, "tile"),
        as_bool(splitting, "splitting"),
    )


@public
def image_seq_len(tile: int, patch: int, scale_factor: int) -> int:
    """``<image>`` tokens per view: ``(tile // patch)**2 // scale_factor**2``, as the models' ``image_seq_len``
    (and the processors' ``image_seq_len``, which must be this number).

    Example::

        >>> image_seq_len(364, 14, 2), image_seq_len(512, 16, 4), image_seq_len(384, 14, 3)
        (169, 64, 81)
    """
    tile, patch, scale = as_int(tile, "tile"), as_int(patch, "patch"), as_int(scale_factor, "scale_factor")
    return int(((tile // patch) ** 2) / (scale**2))


@public
def num_tokens(
    image_size, *, longest_edge: int, tile: int, patch: int, scale_factor: int, splitting: bool = True
) -> int:
    """``<image>`` tokens of an ``(H, W)`` image: ``(rows * cols + 1) * image_seq_len`` with tiles (the ``+ 1``:
    the global image), ``image_seq_len`` without; the count the processors write and the models fill.

    Example::

        >>> num_tokens((1, 1), longest_edge=1456, tile=364, patch=14, scale_factor=2)    # upscaled: 4 x 4 + 1
        2873
    """
    rows, cols = tile_grid(image_size, longest_edge=longest_edge, tile=tile, splitting=splitting)
    return (rows * cols + 1) * image_seq_len(tile, patch, scale_factor)


def tile_source(row: int, col: int) -> str:
    """The token layout's name of the tile at 0-based ``(row, col)``: ``"row_<r>_col_<c>"`` (1-based, as the
    processors' ``<row_r_col_c>`` marker); the global image's run is ``"global"``."""
    return f"row_{row + 1}_col_{col + 1}"


@public
def prompt(
    rows: int,
    cols: int,
    seq_len: int,
    *,
    image_token: str = IMAGE_TOKEN,
    fake_token: str = FAKE_TOKEN,
    global_token: str = GLOBAL_TOKEN,
) -> str:
    """The text that stands for one image of ``rows x cols`` tiles (``0, 0``: none) and ``seq_len`` tokens per
    view: ``Idefics3Processor.replace_image_token`` / SmolVLM's ``get_image_prompt_string`` (module docs).

    Example::

        >>> prompt(0, 0, 3, image_token="I")
        '<fake_token_around_image><global-img>III<fake_token_around_image>'
    """
    rows, cols = as_int(rows, "rows", minimum=0), as_int(cols, "cols", minimum=0)
    seq_len = as_int(seq_len, "seq_len")
    if (rows == 0) != (cols == 0):
        raise ValueError(f"rows={rows}, cols={cols}; both are 0 (no tiles) or both >= 1. Pass e.g. rows=2, cols=3.")
    body = image_token * seq_len
    tail = f"{fake_token}{global_token}{body}{fake_token}"
    if rows == 0:
        return tail
    row_text = "".join(
        "".join(f"{fake_token}<row_{r + 1}_col_{c + 1}>{body}" for c in range(cols)) + "\n" for r in range(rows)
    )
    return f"{row_text}\n{tail}"


@public
def layout_prompt(
    layout, *, image_token: str = IMAGE_TOKEN, fake_token: str = FAKE_TOKEN, global_token: str = GLOBAL_TOKEN
) -> str:
    """:func:`prompt` of an encoder's token layout (``encoder.plan((H, W)).layout`` of the ``idefics3`` /
    ``smolvlm`` recipes): runs named ``"row_<r>_col_<c>"`` (:func:`tile_source`) in row-major order, then one
    ``"global"`` run, all of one length. A layout of another shape is refused (it is not this family's text).

    Example::

        >>> from hrperc.modules.frontend import make_layout
        >>> layout_prompt(make_layout(("global", 2, (1, 2))), image_token="I")
        '<fake_token_around_image><global-img>II<fake_token_around_image>'
    """
    runs = [(getattr(seg, "source", None), getattr(seg, "stop", 0) - getattr(seg, "start", 0)) for seg in layout]
    names = [name for name, _ in runs]
    ok = bool(runs) and names[-1] == "global" and len({n for _, n in runs}) == 1
    tiles = [_TILE.fullmatch(name) if isinstance(name, str) else None for name in names[:-1]]
    rows = cols = 0
    if ok and tiles:
        ok = all(tiles)
        if ok:
            rows, cols = max(int(m.group(1)) for m in tiles if m), max(int(m.group(2)) for m in tiles if m)
            ok = names[:-1] == [tile_source(r, c) for r in range(rows) for c in range(cols)]
    if not ok:
        raise ValueError(
            f"layout runs {runs} are not an Idefics3 / SmolVLM image (tiles 'row_<r>_col_<c>' in row-major order, "
            f"then 'global', all of one length). Use the layout of an 'idefics3' or 'smolvlm' encoder's plan."
        )
    return prompt(rows, cols, runs[0][1], image_token=image_token, fake_token=fake_token, global_token=global_token)
