"""Native-resolution sizes: the resized image, the patch grid and the token count of Qwen2-VL, Qwen2.5-VL,
Qwen3-VL and Pixtral / Mistral 3, computed exactly as their processors compute them (pure integer functions).

Example::

    >>> from hrperc.ops.native import QWEN2_VL_BUDGET, qwen_resize, qwen_grid, qwen_num_tokens
    >>> min_pixels, max_pixels = QWEN2_VL_BUDGET                   # the released Qwen2-VL / Qwen2.5-VL budget
    >>> qwen_resize((480, 640), min_pixels=min_pixels, max_pixels=max_pixels)        # (H, W) -> resized (h, w)
    (476, 644)
    >>> qwen_grid((480, 640), min_pixels=min_pixels, max_pixels=max_pixels)          # (gh, gw) patches of 14 px
    (34, 46)
    >>> qwen_num_tokens((480, 640), min_pixels=min_pixels, max_pixels=max_pixels)    # gh * gw // 2**2
    391
    >>> qwen_resize((10, 500), min_pixels=min_pixels, max_pixels=max_pixels, reading="qwen-vl-utils")
    (28, 504)
    >>> from hrperc.ops.native import pixtral_resize, pixtral_layout, pixtral_num_tokens
    >>> pixtral_resize((768, 1500)), pixtral_layout((768, 1500)), pixtral_num_tokens((768, 1500))  # Pixtral-12B
    ((528, 1024), (33, 64), 2145)

The Qwen families (one image processor class, ``Qwen2VLImageProcessor``, for all three) resize an image of
``(H, W)`` pixels to ``(h, w)``, both multiples of ``factor = patch_size * merge_size`` (28 for Qwen2 /
Qwen2.5, 32 for Qwen3), with ``h * w`` inside the pixel budget ``[min_pixels, max_pixels]`` and the aspect
ratio kept as well as the rounding allows (:func:`qwen_resize`). The tower sees a ``(gh, gw) = (h // patch,
w // patch)`` grid of patches (:func:`qwen_grid`) and hands the LLM ``gh * gw // merge_size**2`` tokens, the
count of ``<|image_pad|>`` the processor writes (:func:`qwen_num_tokens`).

**Budgets.** transformers' class defaults are not the released checkpoints' (``preprocessor_config.json``):

=========================================  =======  ============  =============  ======================
who                                        patch    min_pixels    max_pixels     constant
=========================================  =======  ============  =============  ======================
``Qwen2VLImageProcessor`` class defaults   (any)    3136 (56²)    1003520        :data:`QWEN_CLASS_BUDGET`
Qwen2-VL / Qwen2.5-VL checkpoints          14       3136          12845056       :data:`QWEN2_VL_BUDGET`
Qwen3-VL checkpoints                       16       65536         16777216       :data:`QWEN3_VL_BUDGET`
qwen-vl-utils (``factor = 2 * patch``)     14 / 16  4·factor²     16384·factor²  :func:`qwen_vl_utils_budget`
=========================================  =======  ============  =============  ======================

So under the Qwen2 checkpoint budget qwen-vl-utils and transformers use the same numbers (3136 /
12845056), while for Qwen3 the checkpoint's minimum (65536) is 16 times qwen-vl-utils' (4096): every image
with both sides over 16 px whose rounded area is under 65536 px gets more tokens from transformers than
from qwen-vl-utils, e.g.
``(200, 200)``: ``(256, 256)``, 64 tokens, vs ``(192, 192)``, 36 tokens. Qwen3-VL checkpoints also
normalise with mean = std = 0.5 (:data:`QWEN3_VL_MEAN`, :data:`QWEN3_VL_STD`), not the class default
(CLIP's).

**The two Qwen readings** (``reading=``). ``"transformers"`` is transformers' ``smart_resize``
(``transformers/models/qwen2_vl/image_processing_qwen2_vl.py``) literally, float operations included;
``"qwen-vl-utils"`` is the official ``smart_resize`` (``QwenLM/Qwen3-VL``,
``qwen-vl-utils/src/qwen_vl_utils/vision_process.py``). Both refuse an aspect ratio above 200 and round each
side to the nearest multiple of ``factor`` with Python's ``round`` (half to even: 14 / 28 rounds to 0, 42 /
28 to 2). On the same budget they differ in exactly two places:

1. *A side of at most factor / 2 pixels* (rounds to 0). transformers keeps the 0, so the rounded area is 0
   and the min branch always runs: the image is scaled up to ``min_pixels`` keeping its aspect ratio.
   qwen-vl-utils first clamps the side to ``factor`` and takes the min branch only when the clamped area
   is still under ``min_pixels``. They differ when the clamped area reaches ``min_pixels``: ``(10, 500)``
   under the Qwen2 budget is ``(28, 420)`` (2 x 30 patches, 15 tokens) in transformers, ``(28, 504)``
   (2 x 36 patches, 18 tokens) in qwen-vl-utils. This reaches large budgets too: ``(14, 2379)`` under the
   Qwen3 checkpoint budget is ``(32, 3360)`` vs ``(32, 2368)``.
2. *The max branch* floors each scaled side to a multiple of ``factor``; transformers then raises a side
   that floored to 0 to ``factor``, qwen-vl-utils does not (its resize then fails on a 0-pixel side). This
   takes ``max_pixels`` under ``factor**2`` times the aspect ratio (so under ``200 * factor**2``); the
   ``"qwen-vl-utils"`` reading refuses such a size, naming the budget that would hold it.

Everywhere else (both sides over factor / 2, no side flooring to 0) the two agree on every size.
transformers refuses nothing but the aspect ratio: images smaller than one merged patch are scaled up
(``(1, 1)`` gives ``(56, 56)`` under the class budget). Under a small or narrow budget its result can
leave the budget (a side never goes under ``factor``, and the min branch rounds both sides up); under the
class and checkpoint budgets it stays inside.

**Pixtral** (Pixtral-12B in LLaVA, and Mistral 3, whose 2 x 2 patch merger sits in its projector): the
image is scaled down, never up, so its longest side is at most ``longest_edge``, then each side is rounded
*up* to a multiple of ``P = patch_size * merge_size`` (:func:`pixtral_resize`; transformers'
``PixtralProcessor`` passes ``patch_size * spatial_merge_size`` to its image processor). The text gets
``rows = h // P`` rows of ``cols = w // P`` ``[IMG]`` tokens each followed by ``[IMG_BREAK]``, the last
``[IMG_BREAK]`` replaced by ``[IMG_END]``: ``rows * (cols + 1)`` tokens (:func:`pixtral_num_tokens`), of
which the ``rows * cols`` ``[IMG]`` carry image features (:func:`pixtral_layout`).

**The two Pixtral readings.** transformers scales the sides with ``floor``, ``mistral_common`` (Mistral's
own tokenizer, ``mistralai/mistral-common``, ``src/mistral_common/tokens/tokenizers/image.py``) with
``round`` (half to even). They differ only when the image is scaled down and a scaled side ``x`` has a
fraction above 0.5 (or exactly 0.5 with ``floor(x)`` odd) while ``floor(x)`` is a multiple of ``P``:
transformers then has one row or column fewer, e.g. ``(19, 1149)`` with ``longest_edge=1024, P=16``:
``(16, 1024)`` vs ``(32, 1024)``. A side that scales to 0 is refused in both readings (transformers fails
later with an unclear error when its ``floor`` gives 0; mistral_common asserts when its ``round`` does).
"""

from __future__ import annotations

import functools
import math

from .._errors import public
from .._validation import as_image_size, as_int

__all__ = [
    "QWEN_READINGS",
    "PIXTRAL_READINGS",
    "MAX_ASPECT_RATIO",
    "QWEN_PATCH_SIZE",
    "QWEN_MERGE_SIZE",
    "QWEN_CLASS_BUDGET",
    "QWEN2_VL_BUDGET",
    "QWEN3_VL_PATCH_SIZE",
    "QWEN3_VL_BUDGET",
    "QWEN3_VL_MEAN",
    "QWEN3_VL_STD",
    "PIXTRAL_LONGEST_EDGE",
    "PIXTRAL_PATCH_SIZE",
    "MISTRAL3_LONGEST_EDGE",
    "MISTRAL3_PATCH_SIZE",
    "MISTRAL3_MERGE_SIZE",
    "qwen_vl_utils_budget",
    "qwen_resize",
    "qwen_grid",
    "qwen_num_tokens",
    "pixtral_resize",
    "pixtral_layout",
    "pixtral_num_tokens",
]

#: How the Qwen resize is read: transformers' ``smart_resize`` or qwen-vl-utils' (see the module docs).
QWEN_READINGS = ("transformers", "qwen-vl-utils")
#: How the Pixtral resize is read: transformers' ``floor`` or mistral_common's ``round``.
PIXTRAL_READINGS = ("transformers", "mistral_common")
#: Both Qwen readings refuse an image whose long side is more than this many times its short side.
MAX_ASPECT_RATIO = 200

#: Qwen2-VL / Qwen2.5-VL patch side and merge factor (2 x 2 patches become one LLM token).
QWEN_PATCH_SIZE = 14
QWEN_MERGE_SIZE = 2
#: ``(min_pixels, max_pixels)`` of transformers' ``Qwen2VLImageProcessor`` class (56 * 56, 28 * 28 * 1280);
#: the same numbers whatever the patch size.
QWEN_CLASS_BUDGET = (56 * 56, 28 * 28 * 1280)
#: ``(min_pixels, max_pixels)`` of the released Qwen2-VL and Qwen2.5-VL checkpoints (4 * 28², 16384 * 28²).
QWEN2_VL_BUDGET = (3136, 12845056)
#: Qwen3-VL's patch side (its factor is 32).
QWEN3_VL_PATCH_SIZE = 16
#: ``(min_pixels, max_pixels)`` of the released Qwen3-VL checkpoints (64 * 32², 16384 * 32²).
QWEN3_VL_BUDGET = (65536, 16777216)
#: Qwen3-VL checkpoints' normalisation (the image processor class defaults to CLIP's).
QWEN3_VL_MEAN = (0.5, 0.5, 0.5)
QWEN3_VL_STD = (0.5, 0.5, 0.5)

#: Pixtral-12B (LLaVA in transformers): longest side 1024, 16 px patches, no merge.
PIXTRAL_LONGEST_EDGE = 1024
PIXTRAL_PATCH_SIZE = 16
#: Mistral 3 (Mistral-Small-3.1): longest side 1540, 14 px patches merged 2 x 2 in the projector.
MISTRAL3_LONGEST_EDGE = 1540
MISTRAL3_PATCH_SIZE = 14
MISTRAL3_MERGE_SIZE = 2


@public
def qwen_vl_utils_budget(patch_size: int = QWEN_PATCH_SIZE, merge_size: int = QWEN_MERGE_SIZE) -> tuple[int, int]:
    """qwen-vl-utils' ``(min_pixels, max_pixels)``: 4 and 16384 merged patches of ``factor = patch_size *
    merge_size`` pixels a side (``IMAGE_MIN_TOKEN_NUM`` / ``IMAGE_MAX_TOKEN_NUM``).

    Example::

        >>> qwen_vl_utils_budget(), qwen_vl_utils_budget(16)
        ((3136, 12845056), (4096, 16777216))
    """
    factor = as_int(patch_size, "patch_size", example="patch_size=14") * as_int(
        merge_size, "merge_size", example="merge_size=2"
    )
    return 4 * factor * factor, 16384 * factor * factor


def _size(image_size) -> tuple[int, int]:
    """``image_size`` as ``(H, W)``: a plain tuple of two positive ints as it is, anything else checked by
    :func:`~hrperc._validation.as_image_size` (callers ask for counts per image, often)."""
    if type(image_size) is tuple and len(image_size) == 2:
        h, w = image_size
        if type(h) is int and type(w) is int and h >= 1 and w >= 1:
            return h, w
    return as_image_size(image_size)


def _positive(value, name: str, example: str) -> int:
    """A positive int option; anything but a plain int >= 1 is checked by :func:`~hrperc._validation.as_int`."""
    if type(value) is int and value >= 1:
        return value
    return as_int(value, name, example=example)


def _reading(reading, choices: tuple[str, ...]) -> str:
    if not isinstance(reading, str) or reading not in choices:
        raise (ValueError if isinstance(reading, str) else TypeError)(
            f"reading={reading!r}; it must be one of {', '.join(repr(c) for c in choices)}. "
            f"Pass e.g. reading={choices[0]!r} (the default) or reading={choices[1]!r}."
        )
    return reading


def _qwen_args(image_size, patch_size, merge_size, min_pixels, max_pixels, reading):
    """The validated ints ``(H, W, patch, merge, min_pixels, max_pixels, reading)``; a ``None`` budget
    entry is the reading's default."""
    height, width = _size(image_size)
    patch = _positive(patch_size, "patch_size", "patch_size=14")
    merge = _positive(merge_size, "merge_size", "merge_size=2")
    reading = _reading(reading, QWEN_READINGS)
    factor = patch * merge
    default = QWEN_CLASS_BUDGET if reading == "transformers" else (4 * factor * factor, 16384 * factor * factor)
    lo = default[0] if min_pixels is None else _positive(min_pixels, "min_pixels", f"min_pixels={default[0]}")
    hi = default[1] if max_pixels is None else _positive(max_pixels, "max_pixels", f"max_pixels={default[1]}")
    if hi < factor * factor:
        raise ValueError(
            f"max_pixels={hi} cannot hold one merged patch of {factor} x {factor} = {factor * factor} pixels "
            f"(patch_size * merge_size = {patch} * {merge}). Pass max_pixels >= {factor * factor}, e.g. "
            f"max_pixels={default[1]}."
        )
    if lo > hi:
        raise ValueError(
            f"min_pixels={lo} > max_pixels={hi}; the pixel budget [min_pixels, max_pixels] must not be empty. "
            f"Pass min_pixels <= max_pixels (reading {reading!r} defaults to min_pixels={default[0]}, "
            f"max_pixels={default[1]}; pass both when lowering max_pixels below the default minimum)."
        )
    return height, width, patch, merge, lo, hi, reading


@functools.lru_cache(maxsize=4096)
def _qwen_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int, reading: str):
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        short = -(-max(height, width) // MAX_ASPECT_RATIO)
        padded = (short, width) if height < width else (height, short)
        raise ValueError(
            f"image_size={(height, width)} has an aspect ratio of {ratio:.6g}; Qwen's processors refuse ratios "
            f"above {MAX_ASPECT_RATIO} (transformers' smart_resize raises, so does qwen-vl-utils'). Crop the long "
            f"side or pad the short side: pass e.g. an image of image_size={padded}."
        )
    # Float operations in the references' order: the results are theirs bit for bit.
    if reading == "transformers":
        h_bar = round(height / factor) * factor  # may be 0: the min branch below then runs
        w_bar = round(width / factor) * factor
        floor_at = factor
    else:
        h_bar = max(factor, round(height / factor) * factor)
        w_bar = max(factor, round(width / factor) * factor)
        floor_at = 0
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(floor_at, math.floor(height / beta / factor) * factor)
        w_bar = max(floor_at, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    if min(h_bar, w_bar) == 0:  # only qwen-vl-utils' max branch gets here
        short = min(height, width)  # the side that floored to 0; it needs max_pixels >= H*W*factor²/short²
        need = -(-(height * width * factor * factor) // (short * short))
        while min(_qwen_utils_max_branch(height, width, factor, need)) == 0:  # float rounding: a step or two
            need += 1
        raise ValueError(
            f"image_size={(height, width)} with max_pixels={max_pixels}: qwen-vl-utils' smart_resize floors a side "
            f"to 0 pixels (its max branch has no max(factor, .) clamp, transformers' has; its resize then "
            f"fails). Raise max_pixels (max_pixels={need} holds it) or pass reading='transformers'."
        )
    return h_bar, w_bar


def _qwen_utils_max_branch(height: int, width: int, factor: int, max_pixels: int) -> tuple[int, int]:
    """qwen-vl-utils' max branch alone (to name a budget that holds a refused size)."""
    beta = math.sqrt((height * width) / max_pixels)
    return math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor


@public
def qwen_resize(
    image_size,
    *,
    patch_size: int = QWEN_PATCH_SIZE,
    merge_size: int = QWEN_MERGE_SIZE,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    reading: str = "transformers",
) -> tuple[int, int]:
    """The ``(h, w)`` a Qwen2-VL / Qwen2.5-VL / Qwen3-VL processor resizes an image of ``image_size = (H,
    W)`` pixels to: multiples of ``factor = patch_size * merge_size`` with ``h * w`` in ``[min_pixels,
    max_pixels]``.

    ``min_pixels`` / ``max_pixels`` default to the reading's own (transformers' class defaults
    :data:`QWEN_CLASS_BUDGET`, or :func:`qwen_vl_utils_budget`); the released checkpoints use
    :data:`QWEN2_VL_BUDGET` / :data:`QWEN3_VL_BUDGET` (pass them). ``reading`` is ``"transformers"``
    (``Qwen2VLImageProcessor``) or ``"qwen-vl-utils"`` (the official preprocessing); the module docs say
    on which sizes they differ.

    Example::

        >>> qwen_resize((1, 1)), qwen_resize((10, 500), min_pixels=3136, max_pixels=12845056)
        ((56, 56), (28, 420))
        >>> qwen_resize((200, 200), patch_size=16, min_pixels=65536, max_pixels=16777216)       # Qwen3 checkpoint
        (256, 256)
        >>> qwen_resize((200, 200), patch_size=16, reading="qwen-vl-utils")                    # qwen-vl-utils
        (192, 192)
        >>> qwen_resize((4000, 6000))                  # above the class default's 1003520 px: scaled down
        (812, 1204)

    Raises ``ValueError`` for an aspect ratio above 200 (both references refuse it), an empty budget
    (``min_pixels > max_pixels``), a ``max_pixels`` under one merged patch (``factor**2``), non-positive
    values, and (``"qwen-vl-utils"`` only) a size whose side floors to 0 pixels; ``TypeError`` for sizes or
    options that are not whole numbers.
    """
    height, width, patch, merge, lo, hi, reading = _qwen_args(
        image_size, patch_size, merge_size, min_pixels, max_pixels, reading
    )
    return _qwen_resize(height, width, patch * merge, lo, hi, reading)


@public
def qwen_grid(
    image_size,
    *,
    patch_size: int = QWEN_PATCH_SIZE,
    merge_size: int = QWEN_MERGE_SIZE,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    reading: str = "transformers",
) -> tuple[int, int]:
    """The ``(gh, gw)`` patch grid of the resized image (:func:`qwen_resize` ``// patch_size``): the last two
    entries of the processor's ``image_grid_thw`` row, both multiples of ``merge_size``.

    Example::

        >>> qwen_grid((480, 640)), qwen_grid((480, 640), patch_size=16)
        ((34, 46), (30, 40))
    """
    height, width, patch, merge, lo, hi, reading = _qwen_args(
        image_size, patch_size, merge_size, min_pixels, max_pixels, reading
    )
    h, w = _qwen_resize(height, width, patch * merge, lo, hi, reading)
    return h // patch, w // patch


@public
def qwen_num_tokens(
    image_size,
    *,
    patch_size: int = QWEN_PATCH_SIZE,
    merge_size: int = QWEN_MERGE_SIZE,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    reading: str = "transformers",
) -> int:
    """The LLM tokens of one image, ``gh * gw // merge_size**2`` (:func:`qwen_grid`): the number of
    ``<|image_pad|>`` the processor writes for it (``<|vision_start|>`` / ``<|vision_end|>`` come from the
    chat template and are not counted).

    Example::

        >>> qwen_num_tokens((480, 640)), qwen_num_tokens((1, 1)), qwen_num_tokens((4000, 6000))
        (391, 4, 1247)
    """
    height, width, patch, merge, lo, hi, reading = _qwen_args(
        image_size, patch_size, merge_size, min_pixels, max_pixels, reading
    )
    h, w = _qwen_resize(height, width, patch * merge, lo, hi, reading)
    return (h // patch) * (w // patch) // (merge * merge)


# --- Pixtral / Mistral 3 ---------------------------------------------------------------------------
def _pixtral_scaled(height: int, width: int, longest_edge: int, reading: str) -> tuple[int, int]:
    """The sides after the downscale, in the references' float operations (no downscale: unchanged)."""
    ratio = max(height / longest_edge, width / longest_edge)
    if ratio <= 1:
        return height, width
    if reading == "transformers":
        return int(math.floor(height / ratio)), int(math.floor(width / ratio))
    return round(height / ratio), round(width / ratio)


@functools.lru_cache(maxsize=4096)
def _pixtral_resize(height: int, width: int, longest_edge: int, unit: int, reading: str) -> tuple[int, int]:
    h, w = _pixtral_scaled(height, width, longest_edge, reading)
    if min(h, w) == 0:
        short, long = min(height, width), max(height, width)
        rule, then = (
            ("floors", "transformers' PixtralImageProcessor then fails with an unclear resize error")
            if reading == "transformers"
            else ("rounds", "mistral_common then fails an assert")
        )
        # floor needs short * edge / long >= 1, round needs > 0.5: start there, step over float rounding
        halve = 1 if reading == "transformers" else 2
        edge = -(-long // (halve * short))
        while min(_pixtral_scaled(short, long, edge, reading)) == 0:
            edge += 1
        side = -(-long // (halve * longest_edge))
        while min(_pixtral_scaled(side, long, longest_edge, reading)) == 0:
            side += 1
        raise ValueError(
            f"image_size={(height, width)} with longest_edge={longest_edge}: scaling the long side to "
            f"{longest_edge} px makes the short side {short * longest_edge / long:.3g} px, which {reading} {rule} "
            f"to 0 ({then}). Pad the short side to at least {side} px, or pass longest_edge={edge} or more."
        )
    return ((h - 1) // unit + 1) * unit, ((w - 1) // unit + 1) * unit


def _pixtral_args(image_size, longest_edge, patch_size, merge_size, reading):
    height, width = _size(image_size)
    edge = _positive(longest_edge, "longest_edge", f"longest_edge={PIXTRAL_LONGEST_EDGE}")
    patch = _positive(patch_size, "patch_size", f"patch_size={PIXTRAL_PATCH_SIZE}")
    merge = _positive(merge_size, "merge_size", "merge_size=1")
    return height, width, edge, patch * merge, _reading(reading, PIXTRAL_READINGS)


@public
def pixtral_resize(
    image_size,
    *,
    longest_edge: int = PIXTRAL_LONGEST_EDGE,
    patch_size: int = PIXTRAL_PATCH_SIZE,
    merge_size: int = 1,
    reading: str = "transformers",
) -> tuple[int, int]:
    """The ``(h, w)`` a Pixtral / Mistral 3 processor resizes an image of ``image_size = (H, W)`` pixels to:
    scaled down (never up) so that ``max(h, w) <= longest_edge``, each side then rounded up to a multiple
    of ``P = patch_size * merge_size`` (which can exceed ``longest_edge`` by up to ``P - 1`` pixels only
    when ``longest_edge`` is not a multiple of ``P``).

    Pixtral-12B: the defaults (1024, 16, 1); Mistral 3: ``longest_edge=1540, patch_size=14,
    merge_size=2``. ``reading`` is ``"transformers"`` (``floor`` when scaling down) or ``"mistral_common"``
    (``round``); the module docs say on which sizes they differ.

    Example::

        >>> pixtral_resize((19, 1149)), pixtral_resize((19, 1149), reading="mistral_common")
        ((16, 1024), (32, 1024))
        >>> pixtral_resize((1, 1)), pixtral_resize((2000, 3000), longest_edge=1540, patch_size=14, merge_size=2)
        ((16, 16), (1036, 1540))

    Raises ``ValueError`` when a side scales to 0 pixels (an aspect ratio of about ``longest_edge`` or
    more) and for non-positive options; ``TypeError`` for sizes or options that are not whole numbers.
    """
    return _pixtral_resize(*_pixtral_args(image_size, longest_edge, patch_size, merge_size, reading))


@public
def pixtral_layout(
    image_size,
    *,
    longest_edge: int = PIXTRAL_LONGEST_EDGE,
    patch_size: int = PIXTRAL_PATCH_SIZE,
    merge_size: int = 1,
    reading: str = "transformers",
) -> tuple[int, int]:
    """The ``(rows, cols)`` grid of merged tokens of the resized image (:func:`pixtral_resize` ``// P``):
    ``rows * cols`` ``[IMG]`` tokens carry the image's features, in raster order.

    Example::

        >>> pixtral_layout((768, 1500)), pixtral_layout((768, 1500), longest_edge=1540, patch_size=14, merge_size=2)
        ((33, 64), (28, 54))
    """
    height, width, edge, unit, reading = _pixtral_args(image_size, longest_edge, patch_size, merge_size, reading)
    h, w = _pixtral_resize(height, width, edge, unit, reading)
    return h // unit, w // unit


@public
def pixtral_num_tokens(
    image_size,
    *,
    longest_edge: int = PIXTRAL_LONGEST_EDGE,
    patch_size: int = PIXTRAL_PATCH_SIZE,
    merge_size: int = 1,
    reading: str = "transformers",
) -> int:
    """The tokens one image takes in the text, ``rows * (cols + 1)`` (:func:`pixtral_layout`): each row is
    ``cols`` ``[IMG]`` then one ``[IMG_BREAK]``, the last row's break being ``[IMG_END]``. Only the
    ``rows * cols`` ``[IMG]`` carry features; the others are ordinary embedded tokens.

    Example::

        >>> pixtral_num_tokens((1, 1)), pixtral_num_tokens((768, 1500))     # [IMG][IMG_END]; 33 * 65
        (2, 2145)
    """
    height, width, edge, unit, reading = _pixtral_args(image_size, longest_edge, patch_size, merge_size, reading)
    h, w = _pixtral_resize(height, width, edge, unit, reading)
    return (h // unit) * (w // unit + 1)
