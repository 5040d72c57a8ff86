"""LLaVA-UHD slices as MiniCPM-V sizes them: the slice grid, the source image, the slices, the token counts and
the text layout, computed exactly as transformers' ``MiniCPMV4_6ImageProcessor`` / ``MiniCPMV4_6Processor``
compute them (MiniCPM-V 4.7 uses the same image processor; pure functions of the image size).

Example::

    >>> from hrperc.ops.slices import slice_plan, sliced_grid, num_image_tokens, num_tokens
    >>> sliced_grid((500, 900), max_slice_nums=9, scale_resolution=448)   # (rows, cols) of slices
    (1, 2)
    >>> p = slice_plan((500, 900))                                         # the released 448 px / 9 slices
    >>> p.source, p.grid, p.refine, p.slice, p.source_map, p.slice_map
    ((336, 616), (1, 2), (448, 896), (448, 448), (6, 11), (8, 8))
    >>> num_image_tokens((500, 900)), num_tokens((500, 900))   # image tokens; with the text markers
    (194, 200)
    >>> slice_plan((300, 300)).grid is None                                # small: the source image alone
    True

**What the processor does** with an ``(H, W)`` image, at ``scale_resolution`` ``s`` (448), ``patch_size``
``p`` (14), a merge ``m`` (4 for ``downsample_mode="16x"``: the tower's window merger and the projector each
merge 2 x 2; 2 for ``"4x"``, the projector's alone) and ``max_slice_nums`` ``N`` (9):

1. *The grid* (:func:`sliced_grid`): ``multiple = min(ceil(H * W / s**2), N)``; none when ``multiple <= 1``
   (or ``slice_mode=False``); else among ``multiple - 1``, ``multiple``, ``multiple + 1`` slices (at least
   2, at most ``N``), the ``(rows, cols)`` factorization whose ``log(cols / rows)`` is nearest the image's
   ``log(W / H)``, the taller one on a tie.
2. *The source image* (:func:`find_best_resize`): when ``H * W > s**2`` -- or always, without a grid -- the
   ``s**2`` area at the image's aspect (``h = int(s / sqrt(W / H))``, ``w = int(h * W / H)``); then each side
   rounded to a multiple of ``p * m`` (Python's ``round``, at least one multiple).
3. *The slices* (:func:`refine_size`): the image is resized to ``refine = (rows * sh, cols * sw)``, where
   ``(sh, sw)`` is step 2 applied, with upscaling, to one cell ``(round(H, rows) / rows, round(W, cols) /
   cols)`` of the image rounded to the grid; the refined image is cut into ``rows x cols`` slices of
   ``(sh, sw)``, row-major. Every slice of an image has the same size.
4. *Tokens*: a view of ``(h, w)`` pixels gives ``(h / (p * m), w / (p * m))`` tokens (``h * w / p**2 / 16``
   for ``"16x"``). The processor writes ``<image>``, the source's tokens, ``</image>``, then the slices row
   by row -- ``<slice>``, its tokens, ``</slice>`` each -- the rows joined by ``"\\n"``
   (:func:`text_runs`; :func:`num_tokens` counts them all, :func:`num_image_tokens` the image tokens alone). The prefix
   ``<image_id>k</image_id>`` (``use_image_id``) numbers the images of a text and is not part of an image.

The float arithmetic (``round`` of a float quotient, ``int`` of a float product) is transformers', step for
step; the tests compare every function with the processor's own methods over thousands of sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .._errors import public
from .._validation import as_bool, as_image_size, as_int

__all__ = [
    "MINICPM_V_SCALE_RESOLUTION",
    "MINICPM_V_MAX_SLICE_NUMS",
    "MINICPM_V_PATCH_SIZE",
    "DOWNSAMPLE_MODES",
    "SlicePlan",
    "ensure_divide",
    "find_best_resize",
    "sliced_grid",
    "refine_size",
    "slice_plan",
    "text_runs",
    "num_image_tokens",
    "num_tokens",
]

#: MiniCPM-V's released slice side (``scale_resolution``), slice budget (``max_slice_nums``) and patch.
MINICPM_V_SCALE_RESOLUTION = 448
MINICPM_V_MAX_SLICE_NUMS = 9
MINICPM_V_PATCH_SIZE = 14
#: ``downsample_mode`` -> patches merged per token side (``"16x"``: the tower's window merger and the
#: projector, 2 x 2 each; ``"4x"``: the projector's alone).
DOWNSAMPLE_MODES = {"16x": 4, "4x": 2}


@dataclass(frozen=True)
class SlicePlan:
    """The slices of one image (see the module docs): ``source`` ``(h, w)`` pixels of the source image;
    ``grid`` ``(rows, cols)`` of slices, ``None`` without slices; ``refine`` ``(H', W')`` the image is resized
    to before it is cut (``None`` without slices); ``slice`` ``(sh, sw)`` pixels of every slice (``None``);
    ``source_map`` / ``slice_map``: ``(rows, cols)`` tokens of the source image / of one slice."""

    image_size: tuple[int, int]
    source: tuple[int, int]
    grid: tuple[int, int] | None
    refine: tuple[int, int] | None
    slice: tuple[int, int] | None
    source_map: tuple[int, int]
    slice_map: tuple[int, int] | None

    @property
    def num_slices(self) -> int:
        return 0 if self.grid is None else self.grid[0] * self.grid[1]

    @property
    def image_tokens(self) -> int:
        """Image tokens (the processor's ``image_token`` count): the source's, then every slice's."""
        per_slice = 0 if self.slice_map is None else self.slice_map[0] * self.slice_map[1]
        return self.source_map[0] * self.source_map[1] + self.num_slices * per_slice

    @property
    def num_tokens(self) -> int:
        """Tokens of the processor's text for the image: the image tokens, ``<image>`` / ``</image>``, a
        ``<slice>`` / ``</slice>`` pair per slice and a ``"\\n"`` between slice rows."""
        rows = 0 if self.grid is None else self.grid[0]
        return self.image_tokens + 2 + 2 * self.num_slices + max(rows - 1, 0)


def ensure_divide(length, divisor: int) -> int:
    """``length`` rounded to a multiple of ``divisor`` (Python's ``round``), at least ``divisor``."""
    return max(round(length / divisor) * divisor, divisor)


def _merge(downsample_mode) -> int:
    if downsample_mode not in DOWNSAMPLE_MODES:
        raise ValueError(
            f"downsample_mode={downsample_mode!r} is not one of {tuple(DOWNSAMPLE_MODES)} (MiniCPM-V's: '16x' "
            f"merges 4 x 4 patches per token, '4x' 2 x 2). Pass downsample_mode='16x' (the released models')."
        )
    return DOWNSAMPLE_MODES[downsample_mode]


def find_best_resize(
    image_size, scale_resolution: int, patch_size: int, downsample_mode: str = "16x", *, allow_upscale: bool = False
) -> tuple[int, int]:
    """``(h, w)``: ``image_size`` (floats allowed: a grid cell) scaled to ``scale_resolution**2`` pixels at its
    aspect when larger (or ``allow_upscale``), each side rounded to a multiple of ``patch_size * merge``."""
    height, width = image_size
    if (height * width > scale_resolution * scale_resolution) or allow_upscale:
        aspect_ratio = width / height
        height = int(scale_resolution / math.sqrt(aspect_ratio))
        width = int(height * aspect_ratio)
    unit = patch_size * _merge(downsample_mode)
    return ensure_divide(height, unit), ensure_divide(width, unit)


def sliced_grid(image_size, max_slice_nums: int, scale_resolution: int) -> tuple[int, int] | None:
    """``(rows, cols)`` of slices of an ``(H, W)`` image; ``None`` when it is not sliced (step 1)."""
    height, width = image_size
    log_ratio = math.log(width / height)
    ratio = width * height / (scale_resolution * scale_resolution)
    multiple = min(math.ceil(ratio), max_slice_nums)
    if multiple <= 1:
        return None
    best, min_error = (1, 1), float("inf")
    for num_slices in (multiple - 1, multiple, multiple + 1):
        if num_slices == 1 or num_slices > max_slice_nums:
            continue
        for rows in range(1, num_slices + 1):
            if num_slices % rows == 0:
                error = abs(log_ratio - math.log((num_slices // rows) / rows))
                if error < min_error or (error == min_error and rows > best[0]):
                    best, min_error = (rows, num_slices // rows), error
    return best


def refine_size(image_size, grid, scale_resolution: int, patch_size: int, downsample_mode: str = "16x"):
    """``(H', W')``: the size an ``(H, W)`` image is resized to before it is cut into ``grid`` slices (step 3)."""
    height, width = image_size
    rows, cols = grid
    cell = (ensure_divide(height, rows) / rows, ensure_divide(width, cols) / cols)
    sh, sw = find_best_resize(cell, scale_resolution, patch_size, downsample_mode, allow_upscale=True)
    return sh * rows, sw * cols


@public
def slice_plan(
    image_size,
    *,
    scale_resolution: int = MINICPM_V_SCALE_RESOLUTION,
    max_slice_nums: int = MINICPM_V_MAX_SLICE_NUMS,
    patch_size: int = MINICPM_V_PATCH_SIZE,
    downsample_mode: str = "16x",
    slice_mode: bool = True,
) -> SlicePlan:
    """The :class:`SlicePlan` of an ``(H, W)`` image (see the module docs); the options are the image
    processor's, under its names."""
    H, W = as_image_size(image_size)
    s = as_int(scale_resolution, "scale_resolution", example=f"scale_resolution={MINICPM_V_SCALE_RESOLUTION}")
    n = as_int(max_slice_nums, "max_slice_nums", example=f"max_slice_nums={MINICPM_V_MAX_SLICE_NUMS}")
    p = as_int(patch_size, "patch_size", example=f"patch_size={MINICPM_V_PATCH_SIZE}")
    unit = p * _merge(downsample_mode)
    grid = sliced_grid((H, W), n, s) if as_bool(slice_mode, "slice_mode") else None
    source = find_best_resize((H, W), s, p, downsample_mode, allow_upscale=grid is None)
    refine = cut = cut_map = None
    if grid is not None:
        refine = refine_size((H, W), grid, s, p, downsample_mode)
        cut = (refine[0] // grid[0], refine[1] // grid[1])
        cut_map = (cut[0] // unit, cut[1] // unit)
    return SlicePlan((H, W), source, grid, refine, cut, (source[0] // unit, source[1] // unit), cut_map)


def text_runs(plan: SlicePlan) -> tuple[tuple[str, int], ...]:
    """The processor's text for the image of ``plan`` as ``(what, tokens)`` runs: ``"source"`` / ``"slice"`` (image
    tokens) and the one-token markers ``"image_start"`` (``<image>``), ``"image_end"`` (``</image>``),
    ``"slice_start"`` (``<slice>``), ``"slice_end"`` (``</slice>``) and ``"row_end"`` (the ``"\\n"`` between
    slice rows), in the order it writes them."""
    runs = [("image_start", 1), ("source", plan.source_map[0] * plan.source_map[1]), ("image_end", 1)]
    if plan.grid is not None and plan.slice_map is not None:
        rows, cols = plan.grid
        one = [("slice_start", 1), ("slice", plan.slice_map[0] * plan.slice_map[1]), ("slice_end", 1)]
        for r in range(rows):
            runs += one * cols + ([("row_end", 1)] if r < rows - 1 else [])
    return tuple(runs)


def num_image_tokens(image_size, **options) -> int:
    """The processor's ``image_token`` count for an ``(H, W)`` image (options: :func:`slice_plan`'s)."""
    return slice_plan(image_size, **options).image_tokens


def num_tokens(image_size, **options) -> int:
    """Tokens of the processor's text for an ``(H, W)`` image, markers included (not ``<image_id>``)."""
    return slice_plan(image_size, **options).num_tokens
