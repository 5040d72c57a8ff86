"""The packed ``pixel_values`` of an attached model: the images themselves, each with a header row.

An attached model's ``get_image_features`` receives ``pixel_values`` from transformers' own ``forward`` /
``generate``; hrperc puts the raw images there (the encoder does its own resizing), so the tensor has to
say which images it holds, how large each is, and be impossible to confuse with anything else. Layout
of ``pixel_values`` ``(B, 3, 1 + H_max, W)``, for image ``b`` of ``(h, w)`` pixels:

* row 0 (the header, the same in the three channels), exact integers in ``[-255, 255]``::

      MAGIC (8 values, negative ones among them) | version | kind | h (3 base-256 digits) | w (3 digits)
      | n (2 digits) | n bytes of options (UTF-8 JSON) | check | -1 ...

  ``kind`` 1: the pixels are uint8 values ``0..255``; 2: float pixels in ``[0, 1]``. ``options``: the
  image-processor options the attached processor honoured for this image (``""`` for none), so the
  model runs the same front end the processor counted tokens for. ``check`` is a weighted sum mod 251.
* rows ``1 .. h``, columns ``0 .. w-1``: the image; everything else is ``-1``. ``W`` is at least the
  header's length, so tiny images keep a whole header.

Why this survives what it must: every header value is an integer in ``[-255, 255]``, exact in int16,
float16, bfloat16 and float32, so ``inputs.to(device, dtype)`` and batching keep it; a collator that pads
further right or bottom leaves row 0's start and the sizes intact (sizes come from the header, not
from the padding). What it refuses: a uint8 or int8 cast (the negative magic values cannot survive),
padding on the top or left and cropping (the header is not where it must be, or the image does not
fit), any tensor without the header -- the original processor's normalized pixels whatever their range,
random tensors, a rescaled or resized tensor.

Example::

    >>> import torch
    >>> px, sizes = pack_images([torch.zeros(3, 4, 6, dtype=torch.uint8), torch.ones(3, 5, 2, dtype=torch.uint8)])
    >>> px.shape, px.dtype, sizes.tolist()
    (torch.Size([2, 3, 6, 19]), torch.int16, [[4, 6], [5, 2]])
    >>> [tuple(i.shape) for i in unpack_images(px)], [tuple(i.shape) for i in unpack_images(px.to(torch.bfloat16))]
    ([(3, 4, 6), (3, 5, 2)], [(3, 4, 6), (3, 5, 2)])
"""

from __future__ import annotations

import json

import torch

from ..._errors import public
from ...ops.pixels import to_pixels
from ...ops.preprocess import to_unit

__all__ = ["pack_images", "unpack_images", "read_packed", "PackedImage", "MAGIC", "HEADER_LENGTH"]

#: The first values of every packed image's row 0: exact integers no uint8, ``[0, 1]`` or normalized image holds.
MAGIC = (-113, 67, -29, 251, -197, 5, -241, 139)
_VERSION = 1
_KIND_UINT8, _KIND_UNIT = 1, 2
_SIZE_DIGITS, _LEN_DIGITS = 3, 2
_FIXED = len(MAGIC) + 2 + 2 * _SIZE_DIGITS + _LEN_DIGITS  # entries before the options bytes
#: Header length of an image without options (``len(options bytes)`` more with options).
HEADER_LENGTH = _FIXED + 1
_PAD = -1  # padding value: no uint8 or [0, 1] pixel has it
_MAX_SIDE = 256**_SIZE_DIGITS - 1
_FIX = (
    "Use the processor attach() returned (or pack_images), keep pixel_values' dtype, and pad only on the right "
    "and bottom"
)


class PackedImage:
    """One image read back from packed ``pixel_values``: ``image`` ``(3, h, w)`` (uint8, or float32 in
    ``[0, 1]``) and the processor ``options`` (a dict) it was packed with."""

    __slots__ = ("image", "options", "options_key")

    def __init__(self, image: torch.Tensor, options: dict, options_key: str) -> None:
        self.image, self.options, self.options_key = image, options, options_key


def _digits(value: int, n: int) -> list[int]:
    return [(value >> (8 * (n - 1 - i))) & 255 for i in range(n)]


def _check(entries) -> int:
    return sum((i + 1) * int(v) for i, v in enumerate(entries)) % 251


def options_key(options: dict | None) -> str:
    """The canonical JSON of ``options`` (``""`` for none): what a header stores and variants are cached by."""
    return json.dumps(options, sort_keys=True, separators=(",", ":")) if options else ""


def header(height: int, width: int, kind: int, options: dict | None = None) -> list[int]:
    """Row 0 of one packed image (see the module docs)."""
    data = list(options_key(options).encode("utf-8"))
    if len(data) >= 256**_LEN_DIGITS:
        raise ValueError(f"options of {len(data)} bytes; the header holds at most {256**_LEN_DIGITS - 1}.")
    body = [_VERSION, kind, *_digits(height, _SIZE_DIGITS), *_digits(width, _SIZE_DIGITS)]
    body += [*_digits(len(data), _LEN_DIGITS), *data]
    return [*MAGIC, *body, _check(body)]


@public
def pack_images(images, options: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images -> ``(pixel_values, image_sizes)``: ``(B, 3, 1 + H_max, W)`` packed images (int16 holding uint8
    pixels, or float32 holding ``[0, 1]`` pixels when any image is float; layout in the module docs) and
    ``(B, 2)`` int64 ``(h, w)`` sizes. ``images``: one image or a list (tensors ``(3, H, W)`` / ``(1, H, W)``,
    uint8 or float ``[0, 1]``, PIL images; sizes may differ). ``options``: the image-processor options the
    attached processor honoured (the attached model runs the front end they select); ``None`` for none.
    """
    pixels = to_pixels(images if isinstance(images, (list, tuple)) else [images], keep_uint8=True, one_dtype=False)
    pixels = list(pixels) if isinstance(pixels, torch.Tensor) else pixels
    for b, p in enumerate(pixels):
        if max(p.shape[-2:]) > _MAX_SIDE:
            raise ValueError(
                f"images[{b}] has size {tuple(p.shape[-2:])}; packed images are at most {_MAX_SIDE} "
                f"pixels a side. Resize the image first."
            )
    integer = all(p.dtype == torch.uint8 for p in pixels)
    dtype, kind = (torch.int16, _KIND_UINT8) if integer else (torch.float32, _KIND_UNIT)
    heads = [header(int(p.shape[-2]), int(p.shape[-1]), kind, options) for p in pixels]
    H = max(p.shape[-2] for p in pixels)
    W = max(max(p.shape[-1] for p in pixels), max(len(h) for h in heads))
    out = torch.full((len(pixels), 3, 1 + H, W), _PAD, dtype=dtype)
    for b, (p, head) in enumerate(zip(pixels, heads)):  # one copy per image, in the processor (not a hot path)
        out[b, :, 0, : len(head)] = torch.tensor(head, dtype=dtype)
        out[b, :, 1 : 1 + p.shape[-2], : p.shape[-1]] = p.to(dtype) if integer else to_unit(p)
    sizes = torch.tensor([list(p.shape[-2:]) for p in pixels], dtype=torch.long)
    return out, sizes


def _refuse(what: str) -> ValueError:
    return ValueError(f"{what}. {_FIX}.")


def read_packed(pixel_values) -> list[PackedImage]:
    """``pixel_values`` from :func:`pack_images` (any device; int16/int32/int64 or any float dtype) -> one
    :class:`PackedImage` per image. Anything else is refused (``ValueError``) with the reason and the fix."""
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(
            f"pixel_values is a {type(pixel_values).__name__}; an attached model takes the (B, 3, 1 + H, W) "
            f"tensor of the processor attach() returned. Use that processor, not the original one."
        )
    shape = tuple(pixel_values.shape)
    if pixel_values.ndim != 4 or shape[1] != 3:
        raise _refuse(
            f"pixel_values has shape {shape}, not the (B, 3, 1 + H, W) packed images of the "
            f"processor attach() returned (the original processor's are normalized tiles)",
        )
    if pixel_values.dtype in (torch.uint8, torch.int8, torch.bool) or pixel_values.is_complex():
        raise _refuse(
            f"pixel_values is {pixel_values.dtype}; a cast to {pixel_values.dtype} destroyed the "
            f"packed images' header (values -255..255), so their sizes cannot be read",
        )
    B, _, rows, cols = shape
    if B == 0 or rows < 2 or cols < HEADER_LENGTH:
        raise _refuse(
            f"pixel_values has shape {shape}: too small to hold packed images (a header row of at least "
            f"{HEADER_LENGTH} values, then the pixels)",
        )
    row0 = pixel_values[:, :, 0, :].detach().to("cpu", torch.float64)  # (B, 3, W): small
    integer = not pixel_values.is_floating_point()
    out = []
    for b in range(B):
        head = row0[b]
        for c in range(3):
            magic = head[c, : len(MAGIC)].tolist()
            if magic != list(MAGIC):
                raise _refuse(
                    f"pixel_values[{b}] does not start with the packed-image header (row 0 of channel {c} begins "
                    f"{_short(magic)}, not {list(MAGIC)}): these are not the attached processor's images -- the "
                    f"original processor's normalized pixel_values (refused whatever their range), a tensor padded on "
                    f"the top or left, or one rescaled, resized or cast to another integer type",
                )
        if not (torch.equal(head[0], head[1]) and torch.equal(head[0], head[2])):
            raise _refuse(
                f"pixel_values[{b}]'s header row differs between its channels: the tensor was changed "
                f"per channel after packing",
            )
        values = head[0]
        out.append(_read_one(pixel_values, b, values, rows, cols, integer))
    return out


def _short(values) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def _read_one(pixel_values, b, values, rows, cols, integer) -> PackedImage:
    body = values[len(MAGIC) : _FIXED].tolist()
    if any(v != int(v) or not 0 <= v <= 255 for v in body):
        raise _refuse(
            f"pixel_values[{b}]'s header holds {_short(body)} after the magic values; a header holds "
            f"bytes 0..255 there (the tensor was changed after packing)",
        )
    body = [int(v) for v in body]
    version, kind = body[0], body[1]
    if version != _VERSION:
        raise _refuse(
            f"pixel_values[{b}] has header version {version}; this hrperc reads version {_VERSION} "
            f"(pack the images with this hrperc's processor)",
        )
    if kind not in (_KIND_UINT8, _KIND_UNIT):
        raise _refuse(
            f"pixel_values[{b}]'s header has pixel kind {kind}; 1 (uint8 values) or 2 ([0, 1] floats) "
            f"are the packed kinds",
        )
    h, w, n = _number(body[2:5]), _number(body[5:8]), _number(body[8:10])
    end = _FIXED + n
    if end + 1 > cols:
        raise _refuse(
            f"pixel_values[{b}]'s header declares {n} bytes of options but the tensor has {cols} "
            f"columns: it was cropped on the right",
        )
    data = values[_FIXED:end].tolist()
    if any(v != int(v) or not 0 <= v <= 255 for v in data):
        raise _refuse(f"pixel_values[{b}]'s header options are not bytes: the tensor was changed after packing")
    if _check(body + [int(v) for v in data]) != values[end].item():
        raise _refuse(f"pixel_values[{b}]'s header fails its check value: the tensor was changed after packing")
    if h < 1 or w < 1:
        raise _refuse(f"pixel_values[{b}]'s header declares an image of {h}x{w} pixels")
    if 1 + h > rows or w > cols:
        raise _refuse(
            f"pixel_values[{b}]'s header declares an image of {h}x{w} pixels but the tensor holds "
            f"{rows - 1}x{cols}: it was cropped",
        )
    key = bytes(int(v) for v in data).decode("utf-8", errors="replace")
    try:
        options = json.loads(key) if key else {}
    except json.JSONDecodeError:
        options = None
    if not isinstance(options, dict):
        raise _refuse(f"pixel_values[{b}]'s header options {key!r} are not a JSON object")
    img = pixel_values[b, :, 1 : 1 + h, :w]
    if kind == _KIND_UINT8:
        lo, hi = float(img.min()), float(img.max())
        whole = integer or bool((img == img.round()).all())
        if not whole or lo < 0 or hi > 255:
            why = "" if whole else ", not whole numbers"
            raise _refuse(
                f"pixel_values[{b}] holds uint8 pixels but its values run from {lo:g} to {hi:g}{why}: "
                f"the tensor was changed after packing",
            )
        image = img.to(torch.uint8)
    else:
        if integer:
            raise _refuse(
                f"pixel_values is {pixel_values.dtype} but image {b} was packed as float [0, 1] pixels: "
                f"a cast to an integer type rounded them away",
            )
        lo, hi = float(img.min()), float(img.max())
        if not (0 <= lo and hi <= 1):
            raise _refuse(
                f"pixel_values[{b}] holds [0, 1] pixels but its values run from {lo:g} to {hi:g}: the "
                f"tensor was changed after packing",
            )
        image = img.float()
    return PackedImage(image, options, key)


def _number(digits) -> int:
    value = 0
    for d in digits:
        value = value * 256 + int(d)
    return value


@public
def unpack_images(pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """``pixel_values`` from :func:`pack_images` (any device, int16 or any float dtype) -> the ``(3, h, w)``
    images, uint8 or float32 ``[0, 1]``. Images packed with processor options are refused (they need the
    attached model, which runs the front end those options select)."""
    packed = read_packed(pixel_values)
    with_options = [(b, p.options) for b, p in enumerate(packed) if p.options]
    if with_options:
        b, options = with_options[0]
        raise ValueError(
            f"pixel_values[{b}] was packed with the image options {options}, which select another "
            f"front end than the attached encoder's. Pass such pixel_values to the attached model, or call the "
            f"attached processor without image options."
        )
    return [p.image for p in packed]
