"""The interface of a published front end: which views an image gets, and how their tokens are assembled.

A :class:`FrontEnd` is what a recipe (:mod:`hrperc.recipes`) plugs into :class:`hrperc.HighResEncoder`,
which runs every front end the same way::

    image (C, H, W) --plan--> ViewPlan (views, geometry, token layout; no pixels)
          --views-->   (V, C, th, tw) tiles of the backbone's size (uint8 kept until its ViT chunk)
          --backbone, ONE batched pass over all views of the batch (chunked)--> (V, ht*wt, D)
          --assemble--> (T, D') tokens, in the order the reference model feeds its LLM

``views`` runs on images of one size together and ``assemble`` on images of one ``plan.key`` together
(same view count, same token layout), so a batch costs one call per distinct size / layout, never one per
image. ``assemble`` takes the DEM of a DCM+DEM upgrade (``dem``) and a per-token ``project`` (a
projector): where a reference model applies an operation after its projector (OneVision's bilinear
shrink), the front end applies ``project`` before it, so that the integration of a model stays exact.

Token layout: :class:`TokenSegment` runs; a run with ``newline=True`` is a ``(rows, cols)`` map stored
as ``rows x (cols + 1)`` tokens, the last of each row a *slot* (LLaVA-NeXT's ``image_newline``) that
the front end fills with zeros; :func:`slot_mask` marks them.

Example::

    >>> from hrperc.modules.frontend import make_layout, slot_mask
    >>> layout = make_layout(("base", 4, (2, 2)), ("tiles", 2 * (3 + 1), (2, 3), True))
    >>> [(s.source, s.start, s.stop) for s in layout], slot_mask(layout).nonzero().flatten().tolist()
    ([('base', 0, 4), ('tiles', 4, 12)], [7, 11])
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from .._validation import as_bool, as_image_size
from ..ops.canvas import CropGeometry

__all__ = ["FrontEnd", "ViewPlan", "TokenSegment", "make_layout", "slot_mask"]


@dataclass(frozen=True)
class TokenSegment:
    """A run of tokens in one image's output: ``tokens[b, start:stop]``.

    ``shape`` ``(rows, cols)``: the run is a row-major map of that shape (``None`` when it is not a map);
    ``newline``: each row is followed by one slot token (so the run holds ``rows * (cols + 1)`` tokens);
    ``source``: what the tokens come from (``"base"``, ``"tiles"``, ``"thumbnail"``, ``"dem"``, ...).
    """

    source: str
    start: int
    stop: int
    shape: tuple[int, int] | None
    newline: bool = False

    @property
    def length(self) -> int:
        return self.stop - self.start


def make_layout(*runs) -> tuple[TokenSegment, ...]:
    """Segments from ``(source, length, shape[, newline])`` runs laid end to end."""
    out, start = [], 0
    for run in runs:
        source, length, shape, *rest = run
        newline = as_bool(rest[0], "newline", "make_layout") if rest else False
        out.append(TokenSegment(source, start, start + int(length), shape, newline))
        start += int(length)
    return tuple(out)


def slot_mask(layout, total: int | None = None) -> torch.Tensor:
    """``(T,)`` bool, True on the newline slots of one image's ``layout`` (``total`` pads it to a length)."""
    T = layout[-1].stop if total is None else total
    mask = torch.zeros(T, dtype=torch.bool)
    for seg in layout:
        if seg.newline:
            rows, cols = seg.shape
            mask[seg.start : seg.stop].view(rows, cols + 1)[:, -1] = True
    return mask


@dataclass(frozen=True)
class ViewPlan:
    """What a front end does with one ``(H, W)`` image, computed from its size alone.

    ``views``: sub-images through the backbone; ``geometry``: the tile grid of the high-resolution views
    (:class:`~hrperc.ops.canvas.CropGeometry`); ``layout``: the token runs; ``key``: images with equal
    keys are assembled together (same views, same layout); ``info``: the front end's own numbers (e.g.
    the anyres canvas and unpadded shape).
    """

    image_size: tuple[int, int]
    views: int
    geometry: CropGeometry
    layout: tuple[TokenSegment, ...]
    key: tuple
    info: tuple = ()

    @property
    def num_tokens(self) -> int:
        return self.layout[-1].stop

    @property
    def grid(self) -> tuple[int, int]:
        return self.geometry.grid


class FrontEnd(nn.Module):
    """Base class of the recipes' front ends (see the module docs). Subclasses set ``tile_size``
    ``(th, tw)`` and ``patch_size`` and implement :meth:`plan`, :meth:`views` and :meth:`assemble`.

    ``uses_dem``: whether :meth:`assemble` reads a DEM (a DCM+DEM upgrade; then the views include the
    strided views of the tile grid).

    Every subclass's :meth:`plan` receives a checked size: the base class wraps it so that ``image_size``
    arrives as a tuple of two Python ints >= 1, and a zero, negative, non-integer (``10.7``, ``True``,
    ``"10"``) or wrong-length size is refused with a ``ValueError`` / ``TypeError`` naming it (see
    ``docs/inputs.md``) before any front end's arithmetic sees it.
    """

    uses_dem: bool = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        plan = cls.__dict__.get("plan")
        if plan is not None and not getattr(plan, "_checks_image_size", False):

            @functools.wraps(plan)
            def checked_plan(self, image_size, *args, **kw):
                return plan(self, as_image_size(image_size, f"{type(self).__name__}.plan"), *args, **kw)

            checked_plan._checks_image_size = True
            cls.plan = checked_plan

    def __init__(self, tile_size, patch_size) -> None:
        super().__init__()
        self.tile_size = tuple(tile_size)
        self.patch_size = tuple(patch_size)

    @property
    def tile_tokens(self) -> tuple[int, int]:
        """``(ht, wt)``: backbone tokens per tile side (whole patches)."""
        return self.tile_size[0] // self.patch_size[0], self.tile_size[1] // self.patch_size[1]

    def token_width(self, width: int) -> int:
        """Channels of the assembled tokens for a backbone of ``width`` channels (``width`` unless the
        assembly changes it: a pixel shuffle, a channel concatenation)."""
        return width

    def plan(self, image_size) -> ViewPlan:
        """The :class:`ViewPlan` of one ``(H, W)`` image (in a subclass: ``image_size`` is already checked)."""
        raise NotImplementedError

    def num_tokens(self, image_size) -> int:
        """Tokens :meth:`assemble` returns for one ``(H, W)`` image (slots included)."""
        return self.plan(image_size).num_tokens

    def views(self, pixels: torch.Tensor, plan: ViewPlan) -> torch.Tensor:
        """``(b, C, H, W)`` images of ``plan.image_size`` (uint8 or float ``[0, 1]``) ->
        ``(b, V, C, th, tw)`` views, in the order :meth:`assemble` reads them: uint8 views may stay uint8
        (the runner converts them one backbone chunk at a time), others are float ``[0, 1]``."""
        raise NotImplementedError

    def assemble(self, feats: torch.Tensor, plan: ViewPlan, *, dem=None, project=None) -> torch.Tensor:
        """``(b, V, ht*wt, D)`` features of ``b`` images sharing ``plan.key`` -> ``(b, T, D')`` tokens."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"tile_size={self.tile_size}, patch_size={self.patch_size}"
