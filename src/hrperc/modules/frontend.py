"""The front-end contract: which views an image gets, and how their tokens are assembled.

A :class:`FrontEnd` is what :class:`hrperc.HighResEncoder` runs, and every front end runs the same way
(the recipes' in :mod:`hrperc.recipes`, INF-LLaVA's :class:`~hrperc.modules.dual_front_end.DualFrontEnd`,
yours)::

    image (C, H, W) --plan--> a ViewPlan (view count, geometry, token layout; from the size alone)
          --views-->   (V, C, h, w) views of sizes the backbone accepts (uint8 kept until its ViT chunk)
          --backbone, ONE pass over all views of the batch, one call per view shape and chunk--> (V, h*w/p^2, D)
          --assemble--> (T, D') tokens, in the order the reference model feeds its LLM
    (the runner then pads a ragged batch once: (B, max T, D') and a mask)

* :meth:`FrontEnd.plan` returns the front end's own :class:`ViewPlan` subclass, a frozen dataclass with
  named fields; the token count is the end of its ``layout`` (:attr:`ViewPlan.num_tokens`), so it is
  exact without pixels.
* :meth:`FrontEnd.views` runs on images of one size together and returns ``(b, V, C, h, w)``, or a
  tuple of such tensors ("parts", e.g. views of different sizes); :meth:`FrontEnd.assemble` runs on
  images of one :attr:`ViewPlan.batch_key` together and receives the features in the same structure,
  ``(b, V, t, D)`` per part (``t = (h // ph) * (w // pw)``). So a batch costs one call per distinct
  size / layout, never one per image.
* The front end owns its parts: a DEM (``self.dem``, set by the runner from ``HighResEncoder(dem=)``
  after :meth:`FrontEnd.check_dem`), extra towers or mixing modules are its submodules, so that
  ``encoder.front_end.state_dict()`` is everything but the backbone. ``assemble`` reads them from
  ``self``; a front end with ``needs_pixels = True`` also gets ``pixels=``, the list of its images
  ``(C, H, W)`` as given to :meth:`views`. ``project`` (a per-token map, a model's projector) is applied
  where the reference model applies it: before an operation the reference runs after its projector
  (OneVision's bilinear shrink), so that the integration of a model stays exact.

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
from dataclasses import dataclass, fields
from typing import Generic, TypeVar

import torch
from torch import nn

from .._errors import add_context, public
from .._validation import as_bool, as_image_size
from ..ops.canvas import CropGeometry

__all__ = ["FrontEnd", "ViewPlan", "TokenSegment", "make_layout", "slot_mask", "check_dem_width", "backbone_accepts"]


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


@public
def make_layout(*runs) -> tuple[TokenSegment, ...]:
    """Segments from ``(source, length, shape[, newline])`` runs laid end to end."""
    out, start = [], 0
    for run in runs:
        source, length, shape, *rest = run
        newline = as_bool(rest[0], "newline") if rest else False
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

    ``views``: how many views go through the backbone; ``geometry``: where the image went
    (:class:`~hrperc.ops.canvas.CropGeometry`: grid, canvas, valid box); ``layout``: the token runs. A
    front end whose assembly needs more subclasses it with named fields (e.g. ``thumbnail: bool``);
    images whose plans agree on every field but ``image_size`` and ``geometry`` (and have the same grid)
    are assembled together (:attr:`batch_key`), so a field must hold only what the assembly reads.
    """

    image_size: tuple[int, int]
    views: int
    geometry: CropGeometry
    layout: tuple[TokenSegment, ...]

    @property
    def num_tokens(self) -> int:
        """``T``: tokens of the image (slots included), the end of the layout's last run."""
        return self.layout[-1].stop

    @property
    def grid(self) -> tuple[int, int]:
        return self.geometry.grid

    @property
    def canvas_size(self) -> tuple[int, int]:
        return self.geometry.canvas_size

    @property
    def skipped(self) -> int:
        """Views the front end left out because they cannot reach its tokens (counted in ``encoded``)."""
        return 0

    @property
    def batch_key(self) -> tuple:
        """Images with equal keys are assembled together: the grid and every field but the per-image ones."""
        own = tuple(getattr(self, f.name) for f in fields(self) if f.name not in ("image_size", "geometry"))
        return (self.grid, *own)


def backbone_accepts(backbone, size) -> bool:
    """Whether ``backbone`` runs views of ``size = (h, w)``: its ``accepts`` (``VisionBackbone.accepts``), or
    for a backbone without one, whether ``size`` is its native ``image_size``."""
    accepts = getattr(backbone, "accepts", None)
    return bool(accepts(tuple(size))) if callable(accepts) else tuple(size) == tuple(backbone.image_size)


def sizes_taken(backbone) -> str:
    """What ``backbone`` takes, in words, for messages."""
    dynamic = getattr(backbone, "dynamic_size", False)
    return f"its native image_size {backbone.image_size}" + (f"; whole {backbone.patch_size} patches" * dynamic)


def check_dem_width(dem, width: int) -> None:
    """Refuse a DEM whose ``dim`` is not the backbone's width (before any ViT pass)."""
    dim = getattr(dem, "dim", None)
    if isinstance(dim, int) and not isinstance(dim, bool) and dim != width:
        raise ValueError(
            f"dem has dim={dim} but the backbone's tokens have width hidden_size={width}; they must be "
            f"equal (found here, before any ViT pass). Build the DEM for this backbone, e.g. "
            f"DualPerspectiveEnhancement({width}, heads=...), or use the backbone the DEM was trained with."
        )


PlanT = TypeVar("PlanT", bound=ViewPlan)


class FrontEnd(nn.Module, Generic[PlanT]):
    """Base class of the front ends (see the module docs), generic in its plan type (``FrontEnd[DualPlan]``).
    Subclasses set ``tile_size`` ``(th, tw)`` (the size of their tiles, or ``None`` when the views have no
    fixed size) and ``patch_size``, and implement :meth:`plan`, :meth:`views` and :meth:`assemble`.

    ``uses_dem``: whether :meth:`assemble` runs a DEM (a DCM+DEM upgrade, ``dcm=True``: the views then
    include the strided views of the tile grid, and the DEM is ``self.dem``). ``needs_pixels``: whether
    :meth:`assemble` takes ``pixels=``.

    Every subclass's :meth:`plan` receives a checked size: the base class wraps it so that ``image_size``
    arrives as a tuple of two Python ints >= 1, and a zero, negative, non-integer (``10.7``, ``True``,
    ``"10"``) or wrong-length size is refused with a ``ValueError`` / ``TypeError`` naming it (see
    ``docs/inputs.md``) before any front end's arithmetic sees it.
    """

    uses_dem: bool = False
    needs_pixels: bool = False
    #: ``(th, tw)``; ``None`` for a front end whose views have no fixed size (then no :attr:`tile_tokens`).
    tile_size: tuple[int, int] | None
    patch_size: tuple[int, int]
    dem: nn.Module | None

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        plan = cls.__dict__.get("plan")
        if plan is not None and not getattr(plan, "_checks_image_size", False):

            @functools.wraps(plan)
            def checked_plan(self, image_size, *args, **kw):
                # The public boundary of every front end's plan, named per call after the front end's class
                # (an outer boundary, e.g. HighResEncoder.plan, names the error instead when it is the one called).
                try:
                    return plan(self, as_image_size(image_size), *args, **kw)
                except (ValueError, TypeError) as err:
                    add_context(err, f"{type(self).__name__}.plan")
                    raise

            checked_plan._checks_image_size = True  # type: ignore[attr-defined]
            cls.plan = checked_plan  # type: ignore[method-assign]

    def __init__(self, tile_size, patch_size) -> None:
        super().__init__()
        self.tile_size = None if tile_size is None else (int(tile_size[0]), int(tile_size[1]))
        self.patch_size = (int(patch_size[0]), int(patch_size[1]))
        self.dem = None

    @property
    def tile_tokens(self) -> tuple[int, int]:
        """``(ht, wt)``: backbone tokens per tile side (whole patches)."""
        if self.tile_size is None:
            raise ValueError(
                f"the front end {type(self).__name__} has tile_size=None (views of no fixed size), so it has no "
                f"tile_tokens. Use a front end built with a tile_size, or read token shapes off plan(...).layout."
            )
        return self.tile_size[0] // self.patch_size[0], self.tile_size[1] // self.patch_size[1]

    @property
    def keeps_prefix(self) -> bool:
        """Whether :meth:`assemble` reads the backbone's prefix (CLS) tokens too, before the patch tokens
        (LLaVA-1.5 with ``select_strategy="full"``); ``False`` by default."""
        return False

    def token_width(self, width: int) -> int:
        """Channels of the assembled tokens for a backbone of ``width`` channels (``width`` unless the
        assembly changes it: a pixel shuffle, a channel concatenation)."""
        return width

    def check_backbone(self, backbone) -> None:
        """Refuse a backbone this front end cannot run on: other patches, or tiles it does not take."""
        if tuple(self.patch_size) != tuple(backbone.patch_size):
            raise ValueError(
                f"the front end has patch_size={self.patch_size} but the backbone's patches are "
                f"{backbone.patch_size}. Build the front end with patch_size={backbone.patch_size}."
            )
        if self.tile_size is not None and not backbone_accepts(backbone, self.tile_size):
            raise ValueError(
                f"crop has tile_size={self.tile_size} but the backbone does not take views of that size "
                f"({sizes_taken(backbone)}). Build the crop with tile_size={backbone.image_size}."
            )

    # --- owned parts -----------------------------------------------------------------------------------
    def attach_dem(self, dem, width: int) -> None:
        """Make ``dem`` this front end's DEM: ``"default"`` keeps the one it holds, else :meth:`default_dem`;
        ``None`` removes it; a module is checked by :meth:`check_dem` first (a refusal changes nothing)."""
        if isinstance(dem, str) and dem == "default":
            dem = self.dem if self.dem is not None else self.default_dem(width)
        elif dem is not None and not isinstance(dem, nn.Module):
            raise TypeError(
                f"dem={type(dem).__name__}; pass a DualPerspectiveEnhancement, 'default' or None. To load "
                f"released weights use hrperc.pretrained.inf_llava.load_dem(path)."
            )
        self.check_dem(dem, width)
        self.dem = dem

    def default_dem(self, width: int) -> nn.Module | None:
        """The DEM of ``HighResEncoder(dem="default")`` when the front end holds none: a fresh one for a
        DCM+DEM upgrade (the released attention and fusion, ``reduction="none"``: the enhanced map takes
        the place of the tiles' map, so the layout and the count stay), else ``None``."""
        if not self.uses_dem:
            return None
        from .dem import DualPerspectiveEnhancement, default_heads

        return DualPerspectiveEnhancement(width, heads=default_heads(width), reduction="none")

    def check_dem(self, dem, width: int) -> None:
        """Refuse a DEM (or ``None``) this front end cannot run, before anything is changed. A DCM+DEM
        upgrade puts the DEM's output where the tiles' ``(gh*ht, gw*wt)`` map was, so the DEM must return
        that whole map (``reduction="none"``) for every grid: checked here, never a reshape error later."""
        name = type(self).__name__
        if dem is not None and not self.uses_dem:
            raise ValueError(
                f"a DEM was given but the front end {name} does not use one. Build the front end with "
                f"dcm=True (strided views and the DEM), or pass dem=None."
            )
        if dem is None:
            if self.uses_dem:
                raise ValueError(
                    f"the front end {name} was built with dcm=True and needs a DEM, but dem=None. Pass "
                    f"dem='default' or a DualPerspectiveEnhancement(..., reduction='none')."
                )
            return
        check_dem_width(dem, width)
        # A front end without fixed tiles (native resolution) runs the DEM on tiles of any size: one stands in.
        ht, wt = self.tile_tokens if self.tile_size is not None else (3, 2)
        reduction = getattr(dem, "reduction", "none")
        fix = (
            f"Build the DEM with reduction='none', e.g. DualPerspectiveEnhancement({width}, heads=..., "
            f"reduction='none'), or pass dem='default' (a fresh one)"
        )
        if reduction != "none":
            raise ValueError(
                f"dem has reduction={reduction!r}, but the front end {name} (dcm=True) puts the DEM's output "
                f"in place of the tiles' full (gh*ht, gw*wt) token map, which needs reduction='none' (a "
                f"reduction returns one tile's worth). {fix}."
            )
        if callable(getattr(dem, "num_tokens", None)):
            for grid in ((1, 1), (2, 3)):
                got, want = int(dem.num_tokens(grid, (ht, wt))), grid[0] * ht * grid[1] * wt
                if got != want:
                    raise ValueError(
                        f"dem.num_tokens({grid}, {(ht, wt)}) = {got}, but the front end {name} (dcm=True) "
                        f"needs the whole (gh*ht, gw*wt) map, {want} tokens, back from the DEM (output_size="
                        f"{getattr(dem, 'output_size', None)!r}). {fix}."
                    )

    def held_dem(self) -> nn.Module:
        """``self.dem``, which a front end that runs a DEM always holds (:meth:`check_dem` saw to it)."""
        if self.dem is None:
            raise RuntimeError(
                f"{type(self).__name__}: runs a DEM but holds none. Build the encoder with HighResEncoder(dem=...)."
            )
        return self.dem

    def in_dem_dtype(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the dtype of the DEM's parameters (a DEM without parameters computes in ``x``'s)."""
        p = None if self.dem is None else next(self.dem.parameters(), None)
        return x if p is None else x.to(p.dtype)

    # --- the contract ------------------------------------------------------------------------------------
    def plan(self, image_size) -> PlanT:
        """The :class:`ViewPlan` of one ``(H, W)`` image (in a subclass: ``image_size`` is already checked)."""
        raise NotImplementedError

    def num_tokens(self, image_size) -> int:
        """Tokens :meth:`assemble` returns for one ``(H, W)`` image (slots included)."""
        return self.plan(image_size).num_tokens

    def views(self, pixels: torch.Tensor, plan: PlanT):
        """``(b, C, H, W)`` images of ``plan.image_size`` (uint8 or float ``[0, 1]``) -> ``(b, V, C, h, w)``
        views (or a tuple of such parts), in the order :meth:`assemble` reads them: uint8 views may stay
        uint8 (the runner converts them one backbone chunk at a time), others are float ``[0, 1]``. Any
        ``(h, w)`` the backbone accepts (``VisionBackbone.accepts``: its native size; whole patches when
        it resizes its position embeddings)."""
        raise NotImplementedError

    def assemble(self, feats, plan: PlanT, *, project=None) -> torch.Tensor:
        """``(b, V, t, D)`` features (or a tuple, one per part of :meth:`views`) of ``b`` images sharing
        ``plan.batch_key`` -> ``(b, T, D')`` tokens."""
        raise NotImplementedError

    def extras(self, feats, plan: PlanT) -> dict[str, torch.Tensor]:
        """Side outputs of ``b`` images, ``name -> (b, ...)`` (e.g. ``"thumbnail_tokens"``); none by default."""
        return {}

    def extra_repr(self) -> str:
        return f"tile_size={self.tile_size}, patch_size={self.patch_size}"
