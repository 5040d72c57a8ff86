"""Images as float RGB pixels in ``[0, 1]``, the form every hrperc crop and backbone takes.

One conversion for the whole package: :func:`to_pixels` for tensors, PIL images and lists of them
(what :class:`hrperc.HighResEncoder` accepts), :func:`pil_to_pixels` for one PIL image.

Example::

    >>> import torch
    >>> from hrperc.ops.pixels import to_pixels
    >>> to_pixels(torch.full((3, 4, 5), 255, dtype=torch.uint8)).shape, to_pixels([torch.rand(1, 4, 5)])[0].shape
    (torch.Size([1, 3, 4, 5]), torch.Size([3, 4, 5]))
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["to_pixels", "pil_to_pixels"]


def pil_to_pixels(image) -> torch.Tensor:
    """A PIL image -> ``(3, H, W)`` float RGB in ``[0, 1]`` (``convert("RGB")``, then ``/ 255``)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)


def _one_to_pixels(img, name: str) -> torch.Tensor:
    fn = "HighResEncoder"
    if not isinstance(img, torch.Tensor):
        try:
            from PIL import Image
        except ImportError:  # pragma: no cover - Pillow is a dependency
            Image = None
        if Image is not None and isinstance(img, Image.Image):
            return pil_to_pixels(img)
        if isinstance(img, np.ndarray):
            raise TypeError(
                f"{fn}: {name} is a numpy array; convert it with torch.from_numpy(a).permute(2, 0, 1) "
                f"(HWC -> CHW) first."
            )
        raise TypeError(f"{fn}: {name} is a {type(img).__name__}; pass a tensor (C, H, W) or a PIL image.")
    if img.ndim != 3:
        raise ValueError(f"{fn}: {name} has shape {tuple(img.shape)}; expected one image (C, H, W).")
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    if img.shape[0] != 3:
        raise ValueError(
            f"{fn}: {name} has {img.shape[0]} channels (shape {tuple(img.shape)}); expected RGB (3, H, W). "
            f"Drop the alpha channel (img[:3]) or convert the image to RGB."
        )
    if img.dtype == torch.uint8:
        return img.float().div_(255.0)
    if not img.is_floating_point():
        raise TypeError(f"{fn}: {name} has dtype {img.dtype}; pass float images in [0, 1] or uint8 in [0, 255].")
    return img


def to_pixels(images) -> torch.Tensor | list[torch.Tensor]:
    """Images as float RGB in ``[0, 1]``: a ``(B, 3, H, W)`` tensor, or a list of ``(3, H, W)`` tensors.

    Accepts ``(B, C, H, W)`` / ``(C, H, W)`` float (taken as ``[0, 1]``) or uint8 tensors, PIL images, and
    lists mixing them (sizes may differ). One-channel images are repeated to RGB.
    """
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        if images.shape[0] == 0:
            raise ValueError("HighResEncoder: images has batch size 0; pass at least one image.")
        first = _one_to_pixels(images[0], "images[0]")  # validates channels and dtype
        if images.dtype == torch.uint8:
            images = images.float().div_(255.0)
        return images.expand(-1, 3, -1, -1) if first.shape[0] == 3 and images.shape[1] == 1 else images
    if isinstance(images, Sequence) and not isinstance(images, (str, bytes)):
        if len(images) == 0:
            raise ValueError("HighResEncoder: images is an empty list; pass at least one image.")
        return [_one_to_pixels(img, f"images[{b}]") for b, img in enumerate(images)]
    return _one_to_pixels(images, "images").unsqueeze(0)
