"""Images as float RGB pixels in ``[0, 1]``, the form every hrperc crop and backbone takes.

One conversion for the whole package: :func:`to_pixels` for tensors, PIL images and lists of them
(what :class:`hrperc.HighResEncoder` accepts), :func:`pil_to_pixels` for one PIL image.

What is accepted, and how it is read:

* float tensors ``(C, H, W)`` / ``(B, C, H, W)``: taken as ``[0, 1]``. Values outside ``[0, 1]`` (NaN and
  inf included) are refused with a ``ValueError`` naming the range seen: a forgotten ``/ 255`` or an
  already normalized image would give wrong tokens. ``check_range=False`` skips the check for callers
  who scale their pixels themselves (the values are then used as they are).
* uint8 tensors: ``[0, 255]``, divided by 255 (``keep_uint8=True`` returns them as uint8 so that the
  division can happen after resizing, see :func:`hrperc.ops.canvas.resize_image`'s ``scale_uint8``).
* one channel is repeated to RGB; four channels, and other integer dtypes, are refused. A tensor that
  looks like ``(H, W, C)`` is refused with the fix ``permute(2, 0, 1)``; one that reads both ways
  (``(3, W, 3)`` or ``(1, W, 3)``) is read as ``(C, H, W)`` with a warning.
* PIL images, after their EXIF orientation is applied (``ImageOps.exif_transpose``):

  - 8-bit modes (``"L"``, ``"RGB"``, ``"RGBA"``, ``"P"``, ``"CMYK"``, ...): ``convert("RGB")``, then ``/ 255``;
  - 16-bit ``"I;16"``, ``"I;16L"``, ``"I;16B"``, ``"I;16N"`` (16-bit PNG and TIFF grayscale): ``/ 65535``;
  - 32-bit integer ``"I"``: read by the same 16-bit convention, ``/ 65535`` (PIL also uses mode ``"I"`` for
    16-bit files); values outside ``[0, 65535]`` are refused;
  - float ``"F"`` (float TIFF): taken as ``[0, 1]``, with the same range check as float tensors.

  PIL opens 16-bit-per-channel RGB PNGs as 8-bit ``"RGB"`` itself (the low bits are gone before hrperc
  sees the image); load such files as arrays (e.g. with OpenCV or imageio) and pass a float tensor.

Example::

    >>> import torch
    >>> from hrperc.ops.pixels import to_pixels
    >>> to_pixels(torch.full((3, 4, 5), 255, dtype=torch.uint8)).shape, to_pixels([torch.rand(1, 4, 5)])[0].shape
    (torch.Size([1, 3, 4, 5]), torch.Size([3, 4, 5]))
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from .._errors import public
from .._validation import as_bool, check_nonempty

__all__ = ["to_pixels", "pil_to_pixels"]

_MODES_16 = ("I;16", "I;16L", "I;16B", "I;16N")
_EXIF_ORIENTATION = 0x0112


def _range_error(name: str, lo: float, hi: float) -> ValueError:
    """The refusal of float pixels outside ``[0, 1]``: the range seen, the likely cause and the fixes."""
    if lo != lo or hi != hi or lo in (float("inf"), float("-inf")) or hi in (float("inf"), float("-inf")):
        cause = "it holds NaN or inf values. Fix the image (e.g. torch.nan_to_num) before encoding"
    elif hi > 1.5 and lo >= 0:
        cause = "this looks like [0, 255] pixels (a forgotten / 255). Divide it by 255, or pass uint8 pixels"
    elif lo < 0:
        cause = (
            "this looks like an already normalized image (mean/std applied). Pass the unnormalized [0, 1] "
            "image (the backbone normalizes it itself)"
        )
    else:
        cause = "Use .clamp(0, 1) if this is resampling overshoot"
    return ValueError(
        f"{name} has float pixel values in [{lo:.6g}, {hi:.6g}], outside [0, 1]; {cause}. If you scale "
        f"pixels yourself on purpose, pass check_range=False to use the values as they are."
    )


def _check_unit_range(x: torch.Tensor, name: str) -> None:
    """``ValueError`` unless every value of the float tensor ``x`` is in ``[0, 1]`` (no NaN, no inf)."""
    if x.numel() == 0:
        return
    extremes = torch.aminmax(x.detach())
    lo, hi = float(extremes.min), float(extremes.max)
    if not (0.0 <= lo and hi <= 1.0):  # NaN fails both comparisons
        raise _range_error(name, lo, hi)


def _upright(image):
    """The PIL image with its EXIF orientation applied (the image itself when it has none)."""
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # an unreadable EXIF block: nothing to apply
        orientation = 1
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        from PIL import ImageOps

        return ImageOps.exif_transpose(image)
    return image


def _pil_to_pixels(image, check_range: bool, keep_uint8: bool, name: str) -> torch.Tensor:
    """:func:`pil_to_pixels` without a public boundary (for :func:`to_pixels`)."""
    image = _upright(image)
    mode = image.mode
    if mode in _MODES_16 or mode == "I":
        arr = np.asarray(image)
        if mode == "I" and check_range and arr.size:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi > 65535:
                raise ValueError(
                    f"{name} is a PIL mode 'I' (32-bit integer) image with values in [{lo}, {hi}]; mode 'I' "
                    f"is read as 16-bit pixels [0, 65535] (how PIL holds 16-bit PNG/TIFF files), and these values "
                    f"do not fit. Convert it yourself to a float tensor in [0, 1], e.g. "
                    f"torch.from_numpy(np.asarray(im)).float().sub(lo).div(hi - lo), or pass check_range=False."
                )
        gray = torch.from_numpy(arr.astype(np.float32)).div_(65535.0)
        return gray.unsqueeze(0).expand(3, -1, -1)
    if mode == "F":
        gray = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
        if check_range:
            _check_unit_range(gray, f"{name} (PIL mode 'F')")
        return gray.unsqueeze(0).expand(3, -1, -1)
    arr = np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    chw = torch.from_numpy(arr).permute(2, 0, 1)
    return chw if keep_uint8 else chw.float().div_(255.0)


@public
def pil_to_pixels(image, *, check_range: bool = True, keep_uint8: bool = False, name: str = "image") -> torch.Tensor:
    """A PIL image -> ``(3, H, W)`` float32 RGB in ``[0, 1]`` (uint8 ``[0, 255]`` with ``keep_uint8=True``
    for 8-bit modes), after applying its EXIF orientation.

    8-bit modes: ``convert("RGB")``, then ``/ 255``. 16-bit modes (``"I;16*"``) and ``"I"``: ``/ 65535``
    (values of an ``"I"`` image outside ``[0, 65535]`` are refused). ``"F"``: taken as ``[0, 1]``, refused
    outside it unless ``check_range=False``. See the module docs.
    """
    return _pil_to_pixels(image, check_range, keep_uint8, name)


def _hwc_error(name: str, shape: tuple, batched: bool) -> ValueError:
    perm, chw = ("permute(0, 3, 1, 2)", "(B, C, H, W)") if batched else ("permute(2, 0, 1)", "(C, H, W)")
    hwc = "(B, H, W, C)" if batched else "(H, W, C)"
    return ValueError(
        f"{name} has shape {shape}, which looks like channels-last {hwc} ({shape[-1]} channels last); "
        f"hrperc takes channels first {chw}. Use {name}.{perm} to convert it."
    )


def _looks_hwc(shape: tuple) -> bool:
    """``(..., H, W, C)``: channels last, where channels first is not possible."""
    return shape[-3] not in (1, 3) and shape[-1] in (1, 3, 4)


def _warn_ambiguous(name: str, shape: tuple) -> None:
    """``(.., 3, W, 3)`` / ``(.., 1, W, 3)`` read both ways: read as channels first, with a warning."""
    if shape[-3] in (1, 3) and shape[-1] == 3:
        warnings.warn(
            f"{name} has shape {shape}, which reads both as channels first (C={shape[-3]}, H={shape[-2]}, "
            f"W={shape[-1]}) and as channels last (H, W, C={shape[-1]}); it is read as channels first. If it is "
            f"channels last, use {name}.permute({'0, 3, 1, 2' if len(shape) == 4 else '2, 0, 1'}).",
            UserWarning,
            stacklevel=6,  # the caller of to_pixels (through its public boundary's wrapper)
        )


def _check_channels(shape: tuple, name: str, batched: bool) -> None:
    c = shape[-3]
    if c in (1, 3):
        _warn_ambiguous(name, shape)
        return
    if _looks_hwc(shape):
        raise _hwc_error(name, shape, batched)
    fix = "Drop the alpha channel (img[:3]) or convert the image to RGB" if c == 4 else "Convert the image to RGB"
    raise ValueError(
        f"{name} has {c} channels (shape {shape}); expected RGB (3, H, W) or one channel (1, H, W). {fix}."
    )


def _check_dtype(img: torch.Tensor, name: str) -> None:
    if img.dtype != torch.uint8 and not img.is_floating_point():
        raise TypeError(
            f"{name} has dtype {img.dtype}; pass float images in [0, 1] or uint8 in [0, 255] "
            f"(convert e.g. a 16-bit image with img.float() / 65535)."
        )


_EMPTY_FIX = "Check how the image was loaded or cropped, and skip (or drop) empty images before encoding"


def _check_sides(img: torch.Tensor, name: str) -> None:
    """An image with a side of 0 pixels has nothing to encode: refused with its shape, never a token count."""
    what = [("channel count C", _EMPTY_FIX), ("height H", _EMPTY_FIX), ("width W", _EMPTY_FIX)]
    check_nonempty(img, name, what if img.ndim == 3 else [("batch size B", "Pass at least one image")] + what)


def _is_pil_image(img) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        return False
    return isinstance(img, Image.Image)


def _one_to_pixels(img, name: str, check_range: bool, keep_uint8: bool) -> torch.Tensor:
    if not isinstance(img, torch.Tensor):
        if _is_pil_image(img):
            if 0 in img.size:
                raise ValueError(
                    f"{name} is a PIL image of size {img.size} (width, height); it has no pixels, but both "
                    f"sides must be >= 1. {_EMPTY_FIX}."
                )
            return _pil_to_pixels(img, check_range, keep_uint8, name)
        if isinstance(img, np.ndarray):
            raise TypeError(
                f"{name} is a numpy array; convert it with torch.from_numpy(a).permute(2, 0, 1) (HWC -> CHW) first."
            )
        raise TypeError(f"{name} is a {type(img).__name__}; pass a tensor (C, H, W) or a PIL image.")
    if img.ndim != 3:
        raise ValueError(f"{name} has shape {tuple(img.shape)}; expected one image (C, H, W).")
    _check_sides(img, name)
    _check_channels(tuple(img.shape), name, batched=False)
    _check_dtype(img, name)
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    if img.dtype == torch.uint8:
        return img if keep_uint8 else img.float().div_(255.0)
    if check_range:
        _check_unit_range(img, name)
    return img


def _batch_to_pixels(images: torch.Tensor, check_range: bool, keep_uint8: bool) -> torch.Tensor:
    shape = tuple(images.shape)
    if shape[0] == 0:
        raise ValueError("images has batch size 0; pass at least one image.")
    _check_sides(images, "images")
    _check_channels(shape, "images", batched=True)
    _check_dtype(images, "images")
    if images.dtype == torch.uint8:
        if not keep_uint8:
            images = images.float().div_(255.0)
    elif check_range and images.numel():
        lo, hi = images.detach().flatten(1).aminmax(dim=1)
        bad = ~((lo >= 0) & (hi <= 1))  # NaN is bad
        if bool(bad.any()):
            b = int(bad.nonzero()[0, 0])
            raise _range_error(f"images[{b}]", float(lo[b]), float(hi[b]))
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


@public
def to_pixels(
    images, *, check_range: bool = True, keep_uint8: bool = False, one_dtype: bool = True
) -> torch.Tensor | list[torch.Tensor]:
    """Images as float RGB in ``[0, 1]``: a ``(B, 3, H, W)`` tensor, or a list of ``(3, H, W)`` tensors.

    Accepts ``(B, C, H, W)`` / ``(C, H, W)`` float (``[0, 1]``) or uint8 (``[0, 255]``) tensors with ``C`` 1
    or 3, PIL images (any mode, see the module docs), and lists mixing them (sizes may differ). One-channel
    images are repeated to RGB.

    Args:
        check_range: refuse float pixels outside ``[0, 1]`` (and NaN/inf) with a ``ValueError`` naming the
            range seen; ``False`` uses them as they are (for callers who scale pixels themselves).
        keep_uint8: return uint8 tensors (and 8-bit PIL images) as uint8 ``[0, 255]`` instead of dividing by
            255, so that a resize can divide per channel afterwards without a full-size float copy
            (:func:`hrperc.ops.canvas.resize_image` with ``scale_uint8=True`` gives the bit-identical result).
            A list keeps uint8 only when every item is uint8 (a mixed list is all float32), unless
        one_dtype: ``False`` keeps each list item's own dtype (the recipes prepare uint8 and float images
            by different steps, as the reference processors do).
    """
    check_range = as_bool(check_range, "check_range")
    keep_uint8, one_dtype = as_bool(keep_uint8, "keep_uint8"), as_bool(one_dtype, "one_dtype")
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return _batch_to_pixels(images, check_range, keep_uint8)
    if isinstance(images, Sequence) and not isinstance(images, (str, bytes)):
        if len(images) == 0:
            raise ValueError("images is an empty list; pass at least one image.")
        out = [_one_to_pixels(img, f"images[{b}]", check_range, keep_uint8) for b, img in enumerate(images)]
        if (
            keep_uint8
            and one_dtype
            and any(p.dtype == torch.uint8 for p in out)
            and any(p.dtype != torch.uint8 for p in out)
        ):
            out = [p.float().div_(255.0) if p.dtype == torch.uint8 else p for p in out]  # one dtype per list
        return out
    return _one_to_pixels(images, "images", check_range, keep_uint8).unsqueeze(0)
