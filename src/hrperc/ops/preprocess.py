"""The image processors' pixel steps, computed as transformers' default (torchvision) backend computes them.

The published front ends (:mod:`hrperc.recipes`) prepare their views with these steps, so that a uint8
image (a uint8 tensor or a PIL image) gives the same pixels as ``LlavaImageProcessor``,
``LlavaNextImageProcessor``, ``LlavaOnevisionImageProcessor`` and ``GotOcr2ImageProcessor``:

* :func:`resize` -- ``torchvision.transforms.v2.functional.resize`` with antialias: a uint8 image is
  resized to uint8 (bicubic in float32, clamped and rounded, as torchvision does), a float one stays float;
* :func:`pad_to_square` / :func:`pad_centred` -- constant padding, the content centred, the extra pixel of
  an odd margin on the right / bottom;
* :func:`center_crop` and :func:`shortest_edge_size` -- the processors' ``center_crop`` and
  ``{"shortest_edge": s}`` resize.

The views stay uint8; the backbone normalizes uint8 pixels in the processors' fused form
``(x - 255 mean) / (255 std)`` (:meth:`hrperc.backbones.VisionBackbone.normalize`), so the pixels the ViT
sees are the processors' bit for bit. :func:`to_unit` gives float32 ``[0, 1]`` pixels where a step needs
floats (S2's bicubic rescaling).

All take ``(..., C, H, W)`` tensors. Example::

    >>> import torch
    >>> from hrperc.ops.preprocess import pad_to_square, resize
    >>> img = torch.randint(0, 256, (3, 200, 300), dtype=torch.uint8)
    >>> sq = pad_to_square(img, (122, 116, 104))
    >>> sq.shape, resize(sq, (336, 336)).dtype
    (torch.Size([3, 300, 300]), torch.uint8)
"""

from __future__ import annotations

import torch
from torchvision.transforms.v2 import functional as tvF

from .._errors import public
from .._validation import as_bool, as_image_size, as_pair

__all__ = ["resize", "pad_to_square", "pad_centred", "center_crop", "shortest_edge_size", "to_unit", "fill_value"]

_MODES = {
    "bicubic": tvF.InterpolationMode.BICUBIC,
    "bilinear": tvF.InterpolationMode.BILINEAR,
    "nearest": tvF.InterpolationMode.NEAREST,
}


@public
def resize(img: torch.Tensor, size, mode: str = "bicubic", antialias: bool = True) -> torch.Tensor:
    """``(..., C, H, W)`` -> ``(..., C, *size)``: torchvision's resize (an image already of ``size`` is returned).

    uint8 in, uint8 out (rounded, as transformers' torchvision image processors compute it); float in,
    float out. ``mode``: ``"bicubic"`` (the processors' ``BICUBIC``), ``"bilinear"`` or ``"nearest"``.
    """
    if mode not in _MODES:
        raise ValueError(f"mode={mode!r} is not one of {tuple(_MODES)}. Pass one of them, e.g. mode='bicubic'.")
    size, antialias = as_pair(size, "size"), as_bool(antialias, "antialias")
    if tuple(img.shape[-2:]) == size:
        return img
    return tvF.resize(img, list(size), interpolation=_MODES[mode], antialias=antialias)


def fill_value(img: torch.Tensor, colour) -> list[float]:
    """Per-channel fill of ``img``'s dtype for ``colour``, given in ``[0, 255]`` (uint8 images take it as is,
    float images as ``colour / 255``): the processors pad uint8 images with ``int(255 * mean)``."""
    colour = [float(c) for c in colour]
    return colour if img.dtype == torch.uint8 else [c / 255.0 for c in colour]


def pad_to_square(img: torch.Tensor, colour=(0, 0, 0)) -> torch.Tensor:
    """Pad ``(..., C, H, W)`` to ``max(H, W)`` a side, the content centred, with ``colour`` (``[0, 255]``).

    ``LlavaImageProcessor.pad_to_square`` (and LLaVA-1.5's ``expand2square``): the left / top margin is
    ``(max - W) // 2`` / ``(max - H) // 2``.
    """
    h, w = img.shape[-2:]
    side = max(h, w)
    if h == w:
        return img
    left, top = (side - w) // 2, (side - h) // 2
    return tvF.pad(img, [left, top, side - w - left, side - h - top], fill=fill_value(img, colour))


@public
def pad_centred(img: torch.Tensor, size, colour=(0, 0, 0)) -> torch.Tensor:
    """Pad ``(..., C, h, w)`` to ``size = (H, W)`` with the content centred (``divmod`` margins, the odd pixel
    right / bottom), as ``LlavaNextImageProcessor._pad_for_patching`` does."""
    H, W = as_pair(size, "size")
    h, w = img.shape[-2:]
    if (h, w) == (H, W):
        return img
    left, rx = divmod(W - w, 2)
    top, ry = divmod(H - h, 2)
    return tvF.pad(img, [left, top, left + rx, top + ry], fill=fill_value(img, colour))


@public
def shortest_edge_size(image_size, edge: int) -> tuple[int, int]:
    """``(h, w)`` after the processors' ``{"shortest_edge": edge}`` resize: the short side becomes ``edge``,
    the long one ``int(edge * long / short)``."""
    H, W = as_image_size(image_size)
    if W <= H:
        return int(edge * H / W), edge
    return edge, int(edge * W / H)


@public
def center_crop(img: torch.Tensor, size) -> torch.Tensor:
    """The processors' ``center_crop``: top / left at ``int((H - h) / 2)``; a smaller image is zero-padded first."""
    h, w = as_pair(size, "size")
    H, W = img.shape[-2:]
    if h > H or w > W:
        img = tvF.pad(img, [max(w - W, 0) // 2, max(h - H, 0) // 2, (max(w - W, 0) + 1) // 2, (max(h - H, 0) + 1) // 2])
        H, W = img.shape[-2:]
    top, left = int((H - h) / 2.0), int((W - w) / 2.0)
    return img[..., top : top + h, left : left + w]


def to_unit(img: torch.Tensor) -> torch.Tensor:
    """float32 ``[0, 1]`` pixels: uint8 divided by 255, float cast to float32."""
    return img.float().div_(255.0) if img.dtype == torch.uint8 else img.float()
