"""Drop-in high-resolution vision tower: images of any size in, visual tokens ``(B, T, D)`` out.

:class:`HighResEncoder` is the one runner of every front end (:class:`~hrperc.modules.frontend.FrontEnd`)::

    images --to_pixels--> (C, H, W) each, float [0, 1] or uint8, on the backbone's device
           --front_end.plan, per distinct size--> a ViewPlan (views, geometry, token layout)
           --front_end.views, per distinct size and dtype--> views of sizes the backbone accepts
           --backbone: ONE pass over all views of the batch, one call per view shape and chunk--> features
           --front_end.assemble, per distinct plan.batch_key--> (b, T_b, D') tokens
           --padded once--> tokens (B, max T_b, D') + token_mask

``crop=`` a :class:`~hrperc.DualPerspectiveCrop` runs INF-LLaVA's front end
(:class:`~hrperc.modules.dual_front_end.DualFrontEnd`: dual-perspective crops, footprint skipping, the
DEM, ``combine``; its module docs have the token table); a recipe's front end comes from
:func:`hrperc.create_encoder`, and your own is any ``FrontEnd``. :meth:`HighResEncoder.num_tokens`
gives ``T`` for an ``(H, W)`` image from its plan alone.

Pixels: float tensors are taken as RGB in ``[0, 1]``, uint8 tensors and PIL images are converted to
that; cropping and resizing happen in ``[0, 1]`` space (``fill`` is a ``[0, 1]`` value) and the
backbone's ``mean``/``std`` normalization is applied to the view stack right before the ViT.

Example::

    >>> import torch, hrperc
    >>> from timm.models.vision_transformer import VisionTransformer
    >>> vit = VisionTransformer(img_size=28, patch_size=7, embed_dim=32, depth=2, num_heads=2)
    >>> crop = hrperc.DualPerspectiveCrop(grid=(3, 3), tile_size=28)     # tiles of the ViT's native size
    >>> enc = hrperc.HighResEncoder(vit, crop, dem="default", combine="mean")
    >>> out = enc(torch.rand(2, 3, 90, 80))
    >>> out.tokens.shape, enc.num_tokens((90, 80)), out.encoded
    (torch.Size([2, 16, 32]), 16, {'encoded': 22, 'skipped': 16})
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from .._errors import public
from .._validation import as_bool, as_image_size, as_index
from ..backbones import VisionBackbone, create_backbone, wrap_backbone
from ..modules.dual_crop import DualPerspectiveCrop
from ..modules.dual_front_end import DualFrontEnd, SubimageFeatures
from ..modules.frontend import FrontEnd, TokenSegment, ViewPlan, backbone_accepts, sizes_taken, slot_mask
from ..ops.pixels import to_pixels
from .batching import encode_by_shape, encode_views, views_per_call
from .output import EncoderOutput, StageClock, in_batch_order

__all__ = ["HighResEncoder", "EncoderOutput", "SubimageFeatures", "TokenSegment"]


class HighResEncoder(nn.Module):
    """High-resolution encoder: one front end around any ViT backbone (see the module docs for the path).

    Args:
        backbone: a :class:`~hrperc.backbones.VisionBackbone`, a timm / open_clip / transformers ViT
            (wrapped with :func:`~hrperc.wrap_backbone`), or a :func:`~hrperc.create_backbone` name such
            as ``"open_clip:ViT-L-14-336-quickgelu"``.
        crop: the front end: a :class:`~hrperc.modules.frontend.FrontEnd` (a recipe's, yours), or a
            :class:`~hrperc.DualPerspectiveCrop` (INF-LLaVA's front end around it); ``None`` (default):
            ``DualPerspectiveCrop(grid=(3, 3), tile_size=backbone.image_size)``. Its ``tile_size`` must be
            a size the backbone accepts (its native ``image_size``; whole patches for a backbone that
            resizes its position embeddings, ``VisionBackbone.accepts``).
        dem: the front end's DEM: ``"default"`` (the one it holds, else a fresh one where it runs one: the
            released configuration for a ``DualPerspectiveCrop``, ``reduction="none"`` for a recipe's
            ``dcm=True``), a :class:`~hrperc.DualPerspectiveEnhancement`, or ``None`` (no DEM).
        combine: with a ``DualPerspectiveCrop``: ``"mean"`` (default), ``"concat"`` or ``"none"`` (see
            :mod:`hrperc.modules.dual_front_end`); a recipe's front end assembles its own tokens.
        layer: backbone layer (default: the backbone's, -2), or a list of layers read in one pass and
            concatenated on the channels in its order (``[-2, -5, -8]``: :attr:`token_width` ``3 * D``).
        max_batch: at most this many views per backbone call. ``"auto"`` (default): 32 native tiles'
            worth on a GPU, where batching fills the device; on a CPU about 2048 tokens per call (3 tiles
            for ViT-L/14-336, 10 for ViT-B/16), since one tile already saturates CPU matmuls and larger
            chunks only add activation memory; a tower narrower than 768 gets ``768 // width`` times
            that (at most 8x), as one of its tiles leaves the matmuls idle.
        encode_all: with a ``DualPerspectiveCrop``: encode sub-images the DEM never reads too.
        train_backbone: False (default) freezes the backbone (no grad, eval mode even under ``.train()``).
        grad_checkpointing: recompute backbone blocks in backward (with ``train_backbone=True``).
        check_range: refuse float pixels outside ``[0, 1]`` (a forgotten ``/ 255``, or an image already
            normalized: the backbone normalizes). ``False`` skips the check, for pixels you know are right.

    The switches are bools (numpy's ``bool_`` too); a string such as ``"false"``, a number or a tensor is a
    ``TypeError``. A DEM the front end cannot run is refused here (``FrontEnd.check_dem``): of another
    width; with a recipe's ``dcm=True``, one that does not return the whole ``(gh*ht, gw*wt)`` map; with a
    fixed grid and ``combine="mean"``, one whose token count cannot be averaged with the thumbnail's.

    The front end is ``front_end`` (``frontend`` too), and its ``state_dict()`` holds everything but the
    backbone (keys ``front_end.dem.*``; a state dict saved with the older ``dem.*`` keys still loads).
    ``dem``, ``crop``, ``combine``, ``thumbnail`` read the front end's; assigning ``encoder.dem`` checks
    the new DEM as ``dem=`` does.

    Input: one image, a ``(B, C, H, W)`` batch, or a list (ragged sizes welcome) of float ``[0, 1]`` /
    uint8 tensors or PIL images. Output: :class:`EncoderOutput`.
    """

    @public(name="HighResEncoder")
    def __init__(
        self,
        backbone,
        crop: DualPerspectiveCrop | FrontEnd | None = None,
        dem="default",
        combine: str | None = None,
        layer: int | list[int] | None = None,
        max_batch: int | str = "auto",
        encode_all: bool = False,
        train_backbone: bool = False,
        grad_checkpointing: bool = False,
        check_range: bool = True,
    ) -> None:
        super().__init__()
        # Switches are real bools, checked before anything is built: bool("false") is True.
        encode_all, check_range = as_bool(encode_all, "encode_all"), as_bool(check_range, "check_range")
        train_backbone = as_bool(train_backbone, "train_backbone")
        grad_checkpointing = as_bool(grad_checkpointing, "grad_checkpointing")
        bb: VisionBackbone = wrap_backbone(create_backbone(backbone) if isinstance(backbone, str) else backbone)
        if isinstance(crop, FrontEnd):
            if combine is not None:
                raise ValueError(
                    f"combine={combine!r} applies to a DualPerspectiveCrop; a recipe's front end "
                    f"({type(crop).__name__}) assembles its own tokens. Leave combine unset."
                )
            front_end = crop
        elif crop is None or isinstance(crop, DualPerspectiveCrop):
            crop = DualPerspectiveCrop(grid=(3, 3), tile_size=bb.image_size) if crop is None else crop
            front_end = DualFrontEnd(
                crop, bb.patch_size, combine="mean" if combine is None else combine, encode_all=encode_all
            )
        else:
            raise TypeError(
                f"crop is a {type(crop).__name__}; pass a DualPerspectiveCrop (or None for the default 3x3 "
                f"grid), e.g. crop=DualPerspectiveCrop(grid='auto', tile_size={bb.image_size}), or a "
                f"recipe's front end (hrperc.create_encoder builds those)."
            )
        front_end.check_backbone(bb)
        if not (isinstance(max_batch, str) and max_batch == "auto"):
            n = as_index(max_batch)  # numpy / 0-dim tensor integers are integers; bools, floats, strings are not
            if n is None or n < 1:
                raise ValueError(
                    f"max_batch={max_batch!r}; must be 'auto' or an integer >= 1 (views per ViT call). "
                    f"Pass max_batch='auto' (the default) or e.g. max_batch=8."
                )
            max_batch = n
        read = bb.layer if layer is None else bb.check_layer(layer)  # an int, or a tuple of several
        # the prefix tokens too where the front end reads them (LLaVA-1.5's select_strategy="full")
        self._prefix = bool(front_end.keeps_prefix)
        if self._prefix:
            bb.check_layer(read, prefix=True)
        front_end.attach_dem(dem, bb.feature_width(read))  # the front end owns its DEM: front_end.state_dict()
        self.backbone, self.front_end = bb, front_end
        self.layer = read
        #: The recipe that built this encoder and its options (set by :func:`hrperc.create_encoder`).
        self.recipe: str | None = None
        self.recipe_options: dict = {}
        self.max_batch: int | str = max_batch
        self.check_range, self.train_backbone = check_range, train_backbone
        self._encode_all = encode_all
        bb.requires_grad_(train_backbone)
        bb.set_grad_checkpointing(grad_checkpointing)
        if not train_backbone:
            bb.eval()
        self._register_load_state_dict_pre_hook(_dem_keys_under_front_end)

    # --- the front end's parts, read (and the DEM set) through the encoder ---------------------------------
    def __setattr__(self, name: str, value) -> None:
        if name == "dem" and "front_end" in self.__dict__.get("_modules", {}):
            self._set_dem(value)
            return
        super().__setattr__(name, value)

    @public(name="HighResEncoder.dem")
    def _set_dem(self, dem) -> None:
        self.front_end.attach_dem(dem, self.backbone.feature_width(self.layer))

    dem = property(lambda self: self.front_end.dem, doc="The front end's DEM (``None`` without one).")
    frontend = property(lambda self: self.front_end, doc="The front end (:attr:`front_end`, its older name).")
    # INF-LLaVA's settings, read off its DualFrontEnd (None / False for another front end).
    combine = property(lambda self: self._dual("combine", None), doc="INF-LLaVA's ``combine``.")
    thumbnail = property(lambda self: self._dual("thumbnail", False), doc="Whether the crop makes a thumbnail.")
    encodes_thumbnail = property(
        lambda self: self._dual("encodes_thumbnail", False),
        doc="Whether :meth:`forward` runs a thumbnail through the ViT.",
    )
    encode_all = property(
        lambda self: self._dual("encode_all", self._encode_all),
        doc="Whether sub-images the DEM never reads are encoded too.",
    )

    def _dual(self, name: str, default):
        return getattr(self.front_end, name) if isinstance(self.front_end, DualFrontEnd) else default

    @property
    def crop(self):
        """The ``DualPerspectiveCrop`` of INF-LLaVA's front end; another front end itself."""
        return self.front_end.crop if isinstance(self.front_end, DualFrontEnd) else self.front_end

    @property
    def token_width(self) -> int:
        """``D'``: channels of the output tokens (the backbone's width, or a recipe's after a pixel shuffle
        or a channel concatenation); a projector for these tokens takes ``D'`` inputs."""
        return self.front_end.token_width(self.backbone.feature_width(self.layer))

    @property
    def tile_tokens(self) -> tuple[int, int]:
        """``(ht, wt)``: tokens per tile side (the backbone's native grid when the front end has no tile)."""
        return self.front_end.tile_tokens if self.front_end.tile_size is not None else self.backbone.grid_size

    def extra_repr(self) -> str:
        return (
            f"combine={self.combine!r}, thumbnail={self.thumbnail}, layer={self.layer}, max_batch={self.max_batch}, "
            f"encode_all={self.encode_all}, train_backbone={self.train_backbone}"
        )

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.train_backbone:
            self.backbone.eval()  # a frozen backbone stays in inference mode (dropout, norms)
        return self

    # --- plans and accounting, from the size alone ------------------------------------------------------
    @public(name="HighResEncoder.plan")
    def plan(self, image_size) -> ViewPlan:
        """The front end's plan of an ``(H, W)`` image: its views, geometry (``.geometry``, ``.grid``,
        ``.canvas_size``) and token layout; no pixels. ``image_size``: two whole numbers >= 1 (ints, numpy
        or 0-dim tensor integers); anything else is refused here, as in every method below."""
        return self.front_end.plan(as_image_size(image_size))

    @public(name="HighResEncoder.view_plan")
    def view_plan(self, image_size) -> ViewPlan:
        """The same as :meth:`plan` (its older name)."""
        return self.front_end.plan(as_image_size(image_size))

    @public(name="HighResEncoder.num_tokens")
    def num_tokens(self, image_size) -> int:
        """``T``: visual tokens :meth:`forward` returns for one ``(H, W)`` image (under a recipe, the reference
        processor's count of image placeholder tokens, newline slots included)."""
        return self.front_end.plan(as_image_size(image_size)).num_tokens

    @public(name="HighResEncoder.num_backbone_passes")
    def num_backbone_passes(self, image_size) -> int:
        """Views of one ``(H, W)`` image that go through the ViT (INF-LLaVA: ``2N+1`` when nothing is skipped)."""
        return self.front_end.plan(as_image_size(image_size)).views

    def required_subimages(self, grid, encode_all: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(local_needed, global_needed)``, two ``(N,)`` bool masks of INF-LLaVA's sub-images that are
        encoded (all of them for another front end)."""
        if isinstance(self.front_end, DualFrontEnd):
            return self.front_end.required_subimages(grid, encode_all)
        n = grid[0] * grid[1]
        return torch.ones(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)

    # --- the ViT: views in chunks, one call per view shape (hrperc.backbones.batching) ----------------------
    @property
    def chunk_size(self) -> int:
        """Native tiles per backbone call: ``max_batch``, or its ``"auto"`` value on the backbone's device."""
        return views_per_call(self.backbone, self.backbone.image_size, self.max_batch)

    def encode_subimages(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(S, 3, h, w)`` views in ``[0, 1]`` (or uint8 ``[0, 255]``) of one size -> ``(S, t, D)`` tokens,
        ``t = (h // ph) * (w // pw)``, in chunks (:attr:`chunk_size` for native tiles). uint8 pixels are
        converted one chunk at a time (no float copy of the stack)."""
        return encode_views(self.backbone, pixels, self.layer, self.max_batch, self.train_backbone, prefix=self._prefix)

    def _encode_packed(self, stacks: list[torch.Tensor]) -> list[torch.Tensor]:
        """Views of every size through a packing backbone (``packs_views``) in one call."""
        bb = self.backbone
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_backbone):
            if getattr(bb, "packs_pixels", False):  # it normalizes each stack as it packs it: one float copy
                packed: Any = bb.features_packed  # QwenBackbone's / PixtralBackbone's, which take pixels=
                return packed([s.to(bb.device) for s in stacks], layer=self.layer, pixels=True)
            return bb.features_packed([bb.normalize(s.to(bb.device)).to(bb.dtype) for s in stacks], layer=self.layer)

    def _refuse_view(self, shape) -> ValueError:
        return ValueError(
            f"the front end {type(self.front_end).__name__} made views of {shape} pixels, which the backbone does "
            f"not take ({sizes_taken(self.backbone)}). Check the front end's views, or use a backbone that resizes "
            f"its position embeddings (e.g. a timm ViT built with dynamic_img_size=True)."
        )

    # --- forward -----------------------------------------------------------------------------------------
    @public(name="HighResEncoder.subimage_features")
    def subimage_features(self, images, encode_all: bool | None = None, thumbnail: bool | None = None):
        """INF-LLaVA's crop and ViT only: :meth:`DualFrontEnd.subimage_features
        <hrperc.modules.dual_front_end.DualFrontEnd.subimage_features>` (every sub-image's tokens, before
        any enhancement; ``encode_all`` and ``thumbnail`` override the front end's settings)."""
        if not isinstance(self.front_end, DualFrontEnd):
            raise ValueError(
                f"this encoder runs the front end {type(self.front_end).__name__}, which has no dual-"
                f"perspective sub-images. Use forward(images), or build the encoder with a DualPerspectiveCrop."
            )
        pixels = self._pixels(images, one_dtype=True)
        return self.front_end.subimage_features(pixels, self.encode_subimages, encode_all, thumbnail)

    def _pixels(self, images, one_dtype: bool):
        """Images as ``to_pixels`` gives them (uint8 kept until resized), where the ViT runs (fast on a GPU)."""
        pixels = to_pixels(images, check_range=self.check_range, keep_uint8=True, one_dtype=one_dtype)
        device = self.backbone.device
        return pixels.to(device) if isinstance(pixels, torch.Tensor) else [p.to(device) for p in pixels]

    @public(name="HighResEncoder")
    def forward(self, images, timings: bool = False, *, project=None, newline=None) -> EncoderOutput:
        """Images -> :class:`EncoderOutput`; ``timings=True`` records seconds per stage (syncing CUDA).

        ``project`` is a per-token map (``(..., D) -> (..., D')``, e.g. a model's projector), which the front
        end applies where its reference model applies its projector (before an assembly step the reference
        runs after it: OneVision's shrink; otherwise on the assembled tokens); the padding of a ragged batch
        stays zero. ``newline`` ``(D',)`` fills the newline slots of the layout (zeros otherwise;
        ``EncoderOutput.slot_mask`` marks them; a layout without slots ignores it).
        """
        timings = as_bool(timings, "timings")
        fe, clock = self.front_end, StageClock(timings, self.backbone.device)
        pixels = self._pixels(images, one_dtype=False)  # each list item keeps its dtype: uint8 is resized in uint8
        B = len(pixels)
        sizes = [tuple(pixels[b].shape[-2:]) for b in range(B)]
        by_size = {size: fe.plan(size) for size in dict.fromkeys(sizes)}
        plans = [by_size[s] for s in sizes]
        # Views: images of one size and dtype are prepared together.
        members_of: dict[tuple, list[int]] = {}
        for b, size in enumerate(sizes):
            members_of.setdefault((size, pixels[b].dtype), []).append(b)
        view_groups, parts = list(members_of.values()), []
        for members in view_groups:
            got = fe.views(_group_stack(pixels, members), plans[members[0]])
            tupled = isinstance(got, tuple)  # a tensor, or parts (a tuple) that assemble gets back as a tuple
            parts.append(got if tupled else (got,))
        clock.lap("views")

        accepts = functools.partial(backbone_accepts, self.backbone)  # every view of the batch: one pass per shape
        packed = self._encode_packed if self.backbone.packs_views else None
        feats, encoded = encode_by_shape(parts, self.encode_subimages, accepts, self._refuse_view, packed)
        clock.lap("backbone")

        where = {b: (g, i) for g, members in enumerate(view_groups) for i, b in enumerate(members)}
        by_key: dict[tuple, list[int]] = {}
        for b, plan in enumerate(plans):
            by_key.setdefault(plan.batch_key, []).append(b)
        rows: list = []
        side: dict[str, list] = {}  # a front end's side outputs (e.g. "thumbnail_tokens"), per group
        for members in by_key.values():
            if len(view_groups) == 1 and len(by_key) == 1:  # a uniform batch: the stack as it is, no copy
                group = feats[0]
            else:  # each image's features copied out, in batch order
                group = tuple(
                    torch.cat([feats[where[b][0]][p][where[b][1]][None] for b in members])
                    for p in range(len(feats[where[members[0]][0]]))
                )
            group_in = group if tupled else group[0]
            kw = {"pixels": [pixels[b] for b in members]} if fe.needs_pixels else {}
            tokens = fe.assemble(group_in, plans[members[0]], project=project, **kw)
            _check_rows(fe, tokens, len(members), plans[members[0]].num_tokens)
            rows.append((members, tokens))
            for name, value in fe.extras(group_in, plans[members[0]]).items():
                side.setdefault(name, []).append((members, value))
        clock.lap("assemble")

        tokens = in_batch_order(rows, B)
        extras = {k: in_batch_order(v, B) for k, v in side.items() if len(v) == len(rows)}  # only when all have it
        counts = torch.tensor([p.num_tokens for p in plans], device=tokens.device)
        token_mask = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < counts[:, None]
        layouts = [p.layout for p in plans]
        if newline is not None:
            slots = torch.stack([slot_mask(segs, tokens.shape[1]) for segs in layouts]).to(tokens.device)
            tokens = torch.where(slots[..., None], newline.to(tokens.dtype).to(tokens.device), tokens)
        clock.lap("combine")
        ph, pw = self.backbone.patch_size
        return EncoderOutput(
            tokens=tokens,
            token_mask=token_mask,
            geometries=[p.geometry for p in plans],
            layout=layouts,
            valid_masks=[p.geometry.valid_mask((ph, pw)) for p in plans],
            thumbnail_tokens=extras.pop("thumbnail_tokens", None),
            extras=extras,
            encoded={"encoded": encoded, "skipped": sum(p.skipped for p in plans)},
            timings=clock.times,
            plans=plans,
        )


def _group_stack(pixels, members: list[int]) -> torch.Tensor:
    """The ``(b, C, H, W)`` source images of one size group, copied only where they must be joined.

    A batch tensor that is the whole group is used as it is, and a group of one image (every image of a
    ragged batch) is a view of it: ``torch.stack`` would copy each full-resolution source (tens of MiB for
    a batch of photos) only to be read once by the resize."""
    if isinstance(pixels, torch.Tensor) and len(members) == pixels.shape[0]:
        return pixels
    if len(members) == 1:
        return pixels[members[0]].unsqueeze(0)
    return torch.stack([pixels[b] for b in members])


def _check_rows(front_end, tokens, b: int, count: int) -> None:
    """A front end's tokens must be what its plan says: a wrong count would shift every later token."""
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 3 or tuple(tokens.shape[:2]) != (b, count):
        got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise RuntimeError(
            f"HighResEncoder: {type(front_end).__name__}.assemble returned {got} for {b} image(s) whose plan has "
            f"{count} tokens; expected ({b}, {count}, D). Fix the front end's assemble or its plan's layout."
        )


def _dem_keys_under_front_end(state_dict, prefix, *_) -> None:
    """State dicts saved before the front end owned the DEM (keys ``dem.*``) load as ``front_end.dem.*``."""
    for key in [k for k in state_dict if k.startswith(prefix + "dem.")]:
        state_dict[f"{prefix}front_end.{key[len(prefix) :]}"] = state_dict.pop(key)
