"""Drop-in high-resolution vision tower: images of any size in, visual tokens ``(B, T, D)`` out.

:class:`HighResEncoder` chains the whole INF-LLaVA front end around any :class:`VisionBackbone`::

    images --DualPerspectiveCrop--> N local + N strided sub-images (+ 1 thumbnail) per image
           --backbone, ONE batched pass in chunks of max_batch-->  (sub-images, ht*wt, D) patch tokens
           --DualPerspectiveEnhancement (per grid)-->  DEM tokens (B, T_dem, D)
           --combine with the thumbnail tokens-->      tokens (B, T, D)

Token accounting, with ``(ht, wt) = tile_size // patch`` and ``T_dem = dem.num_tokens(grid, tile)``
(``= ht*wt`` for the released bilinear reduction):

==============  ==================================  ===========================================
``combine``     with a DEM                          without a DEM (``dem=None``)
==============  ==================================  ===========================================
``"mean"``      ``ht*wt`` (needs ``T_dem = ht*wt``)  refused (nothing of the same shape to average)
``"concat"``    ``ht*wt + T_dem`` ([thumb, DEM])     ``ht*wt + 2*N*ht*wt`` ([thumb, local, global])
``"none"``      ``T_dem``                            ``2*N*ht*wt`` ([local map, global map])
==============  ==================================  ===========================================

(``thumbnail=False`` drops the ``ht*wt`` thumbnail term; "local map"/"global map" are the sub-image
tokens put back in image order by :func:`~hrperc.local_merge` / :func:`~hrperc.stride_merge`.)
:meth:`HighResEncoder.num_tokens` returns exactly this ``T`` for an ``(H, W)`` image.

Footprint-aware: the DEM's :meth:`required_subimages` says which sub-images its reduction can read
at all; the others are never encoded and their features are zeros, which gives identical tokens
(docs/released.md: the released 3x3 reduction reads only the centre strided sub-image, so 11 ViT passes
replace 19). ``encode_all=True`` encodes everything.

Pixels: float tensors are taken as RGB in ``[0, 1]``, uint8 tensors and PIL images are converted to
that; cropping and resizing happen in ``[0, 1]`` space (``fill`` is a ``[0, 1]`` value) and the
backbone's ``mean``/``std`` normalization is applied to the sub-image stack right before the ViT.

Example::

    >>> import torch, hrperc
    >>> from timm.models.vision_transformer import VisionTransformer
    >>> vit = VisionTransformer(img_size=28, patch_size=7, embed_dim=32, depth=2, num_heads=2)
    >>> crop = hrperc.DualPerspectiveCrop(grid=(3, 3), tile_size=28)     # tiles of the ViT's native size
    >>> enc = hrperc.HighResEncoder(vit, crop, dem="default", combine="mean")
    >>> out = enc(torch.rand(2, 3, 90, 80))
    >>> out.tokens.shape, enc.num_tokens((90, 80))
    (torch.Size([2, 16, 32]), 16)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ._validation import as_bool, as_image_size, as_index
from .backbones import VisionBackbone, create_backbone, wrap_backbone
from .modules.dual_crop import DualCrops, DualPerspectiveCrop
from .modules.frontend import FrontEnd, TokenSegment, ViewPlan, slot_mask
from .ops.canvas import CropGeometry
from .ops.crop import local_merge, stride_merge
from .ops.pixels import to_pixels
from .ops.preprocess import to_unit

__all__ = ["HighResEncoder", "EncoderOutput", "SubimageFeatures", "TokenSegment"]

_COMBINES = ("mean", "concat", "none")
# CPU chunking budget for max_batch="auto": tokens (rows of every ViT matmul) per backbone call.
# 2048 = 3 ViT-L/14-336 tiles (577 tokens) or 10 ViT-B/16 tiles (197). The targets: >= 0.95x the
# speed of serial one-tile passes and <= 1.2x their peak memory (docs/encoder.md).
# * Speed: on the project CPU the batched/serial ratio grows with the chunk but is far above 1 after a
#   few tiles (bench_encoder: ViT-L 7 tiles 1.47x, ViT-B 20 tiles 3.9x; a noisy depth-2 smoke run:
#   ViT-B 10 tiles 2.9x vs 20 tiles 3.3x), so halving the chunk keeps a wide margin over 0.95x.
# * Memory: the call's transient grows with the chunk (per block for 3 ViT-L tiles: qkv 20 MiB, MLP
#   hidden 27 MiB, attention scores 3 x 16 x 577^2 x 4 B = 61 MiB; weights 1.2 GiB fp32), and the old
#   4096 (auto = 20 ViT-B tiles, i.e. one 19-tile call) peaked at 1.20x serial, on the limit.
# bench_encoder.py reports this default next to the old 4096-token one (fresh process per config).
# * Narrow towers (width < 768) get up to 8x the tokens per call (768 // width times, at most 8): one of
#   their tiles is far from filling the matmuls and per-call overhead dominates (a width-64 InternViT-448,
#   13 tiles of 1025 tokens in bf16: 1 tile per call 143 ms, 4 -> 117 ms, 7 -> 110 ms, 13 -> 98 ms in one
#   interleaved run; the cap keeps the call's pixels and activations bounded). Widths >= 768 (ViT-B,
#   ViT-L, SigLIP so400m, InternViT-300M) are unchanged.
_CPU_TOKENS_PER_CALL = 2048
_CPU_FULL_WIDTH = 768
_CPU_NARROW_FACTOR = 8


@dataclass
class SubimageFeatures:
    """ViT tokens of all sub-images of a batch (see :meth:`HighResEncoder.subimage_features`)."""

    local: torch.Tensor
    strided: torch.Tensor
    thumbnail: torch.Tensor | None
    crops: DualCrops
    encoded: int
    skipped: int


@dataclass
class EncoderOutput:
    """What :class:`HighResEncoder` returns.

    ``tokens``: ``(B, T, D)``, images with fewer tokens zero-padded at the end; ``token_mask``:
    ``(B, T)`` bool, True on real tokens (all True unless the batch is ragged); ``geometries``:
    :class:`~hrperc.ops.canvas.CropGeometry` per image (``grids`` reads them);
    ``layout``: per image, the :class:`TokenSegment` runs that make up its tokens (``num_tokens``,
    ``T_b`` per image, is where the last one stops); ``valid_masks``: per
    image, ``(gh*ht, gw*wt)`` bool, True where a canvas token covers image pixels (False on padding
    from ``fit="pad"/"resize_pad"``); ``thumbnail_tokens``: ``(B, ht*wt, D)``, or ``None``
    when no thumbnail was encoded (``thumbnail=False`` or ``combine="none"``);
    ``encoded``: how many sub-images went through the ViT and how many were skipped;
    ``timings``: seconds per stage when ``forward(..., timings=True)``; ``plans``: the
    :class:`~hrperc.modules.frontend.ViewPlan` of each image under a recipe's front end (else ``None``).
    """

    tokens: torch.Tensor
    token_mask: torch.Tensor
    geometries: list[CropGeometry]
    layout: list[tuple[TokenSegment, ...]]
    valid_masks: list[torch.Tensor]
    thumbnail_tokens: torch.Tensor | None = None
    encoded: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    plans: list[ViewPlan] | None = None

    @property
    def num_tokens(self) -> list[int]:
        """``T_b``: real tokens of each image (the end of its last segment)."""
        return [segments[-1].stop for segments in self.layout]

    @property
    def slot_mask(self) -> torch.Tensor:
        """``(B, T)`` bool, True on newline slots (zeros in ``tokens`` unless ``forward(newline=)`` filled
        them): the positions a LLaVA-NeXT-style model fills with its learned ``image_newline``."""
        T = self.tokens.shape[1]
        return torch.stack([slot_mask(segs, T) for segs in self.layout]).to(self.tokens.device)

    @property
    def grids(self) -> list[tuple[int, int]]:
        """``(gh, gw)`` of each image."""
        return [geo.grid for geo in self.geometries]


# --- the module ------------------------------------------------------------------------------------
def default_heads(dim: int) -> int:
    """The DEM's head count for width ``dim``: 8 (as released) when it divides ``dim``, else 4, 2, 1."""
    for heads in (8, 4, 2, 1):
        if dim % heads == 0:
            return heads
    return 1  # pragma: no cover


class HighResEncoder(nn.Module):
    """High-resolution encoder around any ViT backbone (see module docs for the pipeline and ``T``).

    Named front ends (INF-LLaVA's among them) are built by :func:`hrperc.create_encoder`; this class
    is the runner they configure, open to custom front ends.

    Args:
        backbone: a :class:`~hrperc.backbones.VisionBackbone`, a timm / open_clip / transformers ViT
            (wrapped with :func:`~hrperc.wrap_backbone`), or a :func:`~hrperc.create_backbone` name such
            as ``"open_clip:ViT-L-14-336-quickgelu"``.
        crop: the cropping front end, a :class:`~hrperc.DualPerspectiveCrop` whose ``tile_size`` is the
            backbone's native ``image_size`` (grid, fit, resampling, thumbnail); ``None`` (default):
            ``DualPerspectiveCrop(grid=(3, 3), tile_size=backbone.image_size)``.
        dem: a :class:`~hrperc.DualPerspectiveEnhancement`, ``"default"`` (a fresh one of the backbone's
            width with the released configuration), or ``None`` (no enhancement; the sub-image tokens
            are returned).
        combine: ``"mean"``, ``"concat"`` or ``"none"`` (see the token table). With ``"none"`` the
            thumbnail's tokens would never reach the output, so :meth:`forward` does not encode it.
        layer: backbone layer (default: the backbone's, -2).
        max_batch: at most this many sub-images per backbone call. ``"auto"`` (default): 32 on a GPU,
            where batching fills the device; on a CPU about 2048 tokens per call (3 tiles for
            ViT-L/14-336, 10 for ViT-B/16), since one tile already saturates CPU matmuls and larger
            chunks only add activation memory; a tower narrower than 768 gets ``768 // width`` times
            that (at most 8x), as one of its tiles leaves the matmuls idle.
        encode_all: encode sub-images the DEM never reads too (their features are then real, not zeros).
        train_backbone: False (default) freezes the backbone (no grad, eval mode even under ``.train()``).
        grad_checkpointing: recompute backbone blocks in backward (with ``train_backbone=True``).
        check_range: refuse float pixels outside ``[0, 1]`` (a forgotten ``/ 255``, or an image already
            normalized: the backbone normalizes). ``False`` skips the check, for pixels you know are right.

    The switches (``encode_all``, ``train_backbone``, ``grad_checkpointing``, ``check_range``) are bools
    (numpy's ``bool_`` too); a string such as ``"false"``, a number or a tensor is a ``TypeError``. With a
    recipe's DCM+DEM front end, a DEM that does not return the whole ``(gh*ht, gw*wt)`` map (a
    ``reduction`` other than ``"none"``) is refused here, as is, for a fixed grid, a ``combine="mean"``
    the DEM's token count cannot be averaged with.

    Input: one image, a ``(B, C, H, W)`` batch, or a list (ragged sizes welcome) of float ``[0, 1]`` /
    uint8 tensors or PIL images. Output: :class:`EncoderOutput`.
    """

    def __init__(
        self,
        backbone,
        crop: DualPerspectiveCrop | FrontEnd | None = None,
        dem="default",
        combine: str | None = None,
        layer: int | None = None,
        max_batch: int | str = "auto",
        encode_all: bool = False,
        train_backbone: bool = False,
        grad_checkpointing: bool = False,
        check_range: bool = True,
    ) -> None:
        super().__init__()
        fn = "HighResEncoder"
        # Switches are real bools, checked before anything is built: bool("false") is True.
        encode_all, check_range = as_bool(encode_all, "encode_all", fn), as_bool(check_range, "check_range", fn)
        train_backbone = as_bool(train_backbone, "train_backbone", fn)
        grad_checkpointing = as_bool(grad_checkpointing, "grad_checkpointing", fn)
        if isinstance(backbone, str):
            backbone = create_backbone(backbone)
        self.backbone: VisionBackbone = wrap_backbone(backbone)
        if crop is None:
            crop = DualPerspectiveCrop(grid=(3, 3), tile_size=self.backbone.image_size)
        elif not isinstance(crop, (DualPerspectiveCrop, FrontEnd)):
            raise TypeError(
                f"{fn}: crop is a {type(crop).__name__}; pass a DualPerspectiveCrop (or None for the default 3x3 "
                f"grid), e.g. crop=DualPerspectiveCrop(grid='auto', tile_size={self.backbone.image_size}), or a "
                f"recipe's front end (hrperc.create_encoder builds those)."
            )
        elif tuple(crop.tile_size) != tuple(self.backbone.image_size):
            raise ValueError(
                f"{fn}: crop has tile_size={crop.tile_size} but the backbone takes {self.backbone.image_size} "
                f"tiles (its native image_size). Build the crop with tile_size={self.backbone.image_size}."
            )
        self.frontend: FrontEnd | None = crop if isinstance(crop, FrontEnd) else None
        if self.frontend is not None:
            if tuple(crop.patch_size) != tuple(self.backbone.patch_size):
                raise ValueError(
                    f"{fn}: the front end has patch_size={crop.patch_size} but the backbone's patches are "
                    f"{self.backbone.patch_size}. Build the front end with patch_size={self.backbone.patch_size}."
                )
            if combine is not None:
                raise ValueError(
                    f"{fn}: combine={combine!r} applies to a DualPerspectiveCrop; a recipe's front end "
                    f"({type(crop).__name__}) assembles its own tokens. Leave combine unset."
                )
            if isinstance(dem, str) and dem == "default":
                dem = _recipe_dem(self.backbone) if crop.uses_dem else None
            elif dem is not None and not crop.uses_dem:
                raise ValueError(
                    f"{fn}: a DEM was given but the front end {type(crop).__name__} does not use one. Build the "
                    f"front end with dcm=True (strided views and the DEM), or pass dem=None."
                )
            elif dem is None and crop.uses_dem:
                raise ValueError(
                    f"{fn}: the front end {type(crop).__name__} was built with dcm=True and needs a DEM, but dem=None. "
                    f"Pass dem='default' or a DualPerspectiveEnhancement(..., reduction='none')."
                )
        combine = "mean" if combine is None else combine
        if combine not in _COMBINES:
            raise ValueError(f"{fn}: combine={combine!r} is not one of {_COMBINES}.")
        if self.frontend is None and dem is None and combine == "mean":
            raise ValueError(
                f"{fn}: combine='mean' averages the DEM's tokens with the thumbnail's, but dem=None. Pass "
                f"dem='default' (or a DualPerspectiveEnhancement), or combine='concat'/'none'."
            )
        if self.frontend is None and combine == "mean" and not crop.thumbnail:
            raise ValueError(
                f"{fn}: combine='mean' averages with the thumbnail's tokens, but the crop has thumbnail=False. "
                f"Build the crop with thumbnail=True, or pass combine='none'."
            )
        if not (isinstance(max_batch, str) and max_batch == "auto"):
            n = as_index(max_batch)  # numpy / 0-dim tensor integers are integers; bools, floats, strings are not
            if n is None or n < 1:
                raise ValueError(
                    f"{fn}: max_batch={max_batch!r}; must be 'auto' or an integer >= 1 (sub-images per ViT call). "
                    f"Pass max_batch='auto' (the default) or e.g. max_batch=8."
                )
            max_batch = n
        if layer is not None:
            from .backbones.base import resolve_layer

            resolve_layer(layer, self.backbone.num_layers, fn)
        self.layer = self.backbone.layer if layer is None else int(layer)
        self.crop = crop
        if isinstance(dem, str) and dem == "default":
            from .modules.dem import DualPerspectiveEnhancement

            dem = DualPerspectiveEnhancement(self.backbone.hidden_size, heads=default_heads(self.backbone.hidden_size))
        elif dem is not None and not isinstance(dem, nn.Module):
            raise TypeError(
                f"{fn}: dem={type(dem).__name__}; pass a DualPerspectiveEnhancement, 'default' or None. To load "
                f"released weights use hrperc.pretrained.inf_llava.load_dem(path)."
            )
        width = getattr(dem, "dim", None)
        if isinstance(width, int) and not isinstance(width, bool) and width != self.backbone.hidden_size:
            raise ValueError(
                f"{fn}: dem has dim={width} but the backbone's tokens have width hidden_size="
                f"{self.backbone.hidden_size}; they must be equal (found here, before any ViT pass). Build the DEM "
                f"for this backbone, e.g. DualPerspectiveEnhancement({self.backbone.hidden_size}, heads=...), or "
                f"use the backbone the DEM was trained with."
            )
        self.dem = dem
        self.combine = combine if self.frontend is None else None
        if dem is not None and self.frontend is not None:
            self._check_full_map_dem(fn)
        elif dem is not None and isinstance(crop.grid, tuple):
            self._check_mean(crop.grid)  # a fixed grid: a DEM whose count cannot be averaged is refused now
        #: The recipe that built this encoder and its options (set by :func:`hrperc.create_encoder`).
        self.recipe: str | None = None
        self.recipe_options: dict = {}
        self.max_batch = max_batch
        self.encode_all = encode_all
        self.check_range = check_range
        self.train_backbone = train_backbone
        self.backbone.requires_grad_(self.train_backbone)
        self.backbone.set_grad_checkpointing(grad_checkpointing)
        if not self.train_backbone:
            self.backbone.eval()

    @property
    def token_width(self) -> int:
        """``D'``: channels of the output tokens (the backbone's width, or a recipe's after a pixel shuffle
        or a channel concatenation); a projector for these tokens takes ``D'`` inputs."""
        width = self.backbone.hidden_size
        return width if self.frontend is None else self.frontend.token_width(width)

    @property
    def thumbnail(self) -> bool:
        """Whether the crop makes a thumbnail (the whole image resized to one tile); False for a front end,
        whose views are listed by its :class:`~hrperc.modules.frontend.ViewPlan`."""
        return False if self.frontend is not None else self.crop.thumbnail

    def extra_repr(self) -> str:
        head = "" if self.frontend is None else "recipe front end, "
        return (
            f"{head}combine={self.combine!r}, thumbnail={self.thumbnail}, layer={self.layer}, "
            f"max_batch={self.max_batch}, encode_all={self.encode_all}, train_backbone={self.train_backbone}"
        )

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.train_backbone:
            self.backbone.eval()  # a frozen backbone stays in inference mode (dropout, norms)
        return self

    # --- geometry and accounting -----------------------------------------------------------------
    @property
    def tile_tokens(self) -> tuple[int, int]:
        """``(ht, wt)``: tokens per sub-image side."""
        return self.backbone.grid_size

    def _dem_tokens(self, grid) -> int:
        return int(self.dem.num_tokens(grid, self.tile_tokens))

    def _check_mean(self, grid) -> None:
        ht, wt = self.tile_tokens
        if self.combine == "mean" and self._dem_tokens(grid) != ht * wt:
            raise ValueError(
                f"HighResEncoder: combine='mean' needs the DEM to return {ht * wt} tokens (one per thumbnail "
                f"token) but at grid {tuple(grid)} it returns {self._dem_tokens(grid)}. Use a DEM reduction "
                f"back to ({ht}, {wt}) or combine='concat'."
            )

    def _check_full_map_dem(self, fn: str) -> None:
        """A recipe's DCM+DEM upgrade puts the DEM's output where the tiles' ``(gh*ht, gw*wt)`` map was: the
        DEM must return that whole map (``reduction="none"``), for every grid. Checked when the encoder is
        built, so that a mismatch is never a reshape error in the middle of a forward pass."""
        ht, wt = self.tile_tokens
        reduction = getattr(self.dem, "reduction", "none")
        fix = (
            f"Build the DEM with reduction='none', e.g. DualPerspectiveEnhancement({self.backbone.hidden_size}, "
            f"heads=..., reduction='none'), or pass dem='default' (a fresh one)"
        )
        if reduction != "none":
            raise ValueError(
                f"{fn}: dem has reduction={reduction!r}, but the front end {type(self.frontend).__name__} (dcm=True) "
                f"puts the DEM's output in place of the tiles' full (gh*ht, gw*wt) token map, which needs "
                f"reduction='none' (a reduction returns one tile's worth). {fix}."
            )
        if callable(getattr(self.dem, "num_tokens", None)):
            for grid in ((1, 1), (2, 3)):
                got, want = int(self.dem.num_tokens(grid, (ht, wt))), grid[0] * ht * grid[1] * wt
                if got != want:
                    raise ValueError(
                        f"{fn}: dem.num_tokens({grid}, {(ht, wt)}) = {got}, but the front end "
                        f"{type(self.frontend).__name__} (dcm=True) needs the whole (gh*ht, gw*wt) map, {want} "
                        f"tokens, back from the DEM (output_size={getattr(self.dem, 'output_size', None)!r}). {fix}."
                    )

    def _layout(self, grid) -> tuple[TokenSegment, ...]:
        ht, wt = self.tile_tokens
        gh, gw = grid
        per = ht * wt
        segs: list[tuple[str, int, tuple[int, int] | None]] = []
        if self.dem is not None:
            self._check_mean(grid)
            t = self._dem_tokens(grid)
            shape = (ht, wt) if t == per else (gh * ht, gw * wt) if t == gh * gw * per else None
            if self.combine == "mean":
                segs.append(("mean(thumbnail, dem)", t, shape))
            else:
                if self.combine == "concat" and self.thumbnail:
                    segs.append(("thumbnail", per, (ht, wt)))
                segs.append(("dem", t, shape))
        else:
            if self.combine == "concat" and self.thumbnail:
                segs.append(("thumbnail", per, (ht, wt)))
            segs.append(("local", gh * gw * per, (gh * ht, gw * wt)))
            segs.append(("global", gh * gw * per, (gh * ht, gw * wt)))
        out, start = [], 0
        for name, n, shape in segs:
            out.append(TokenSegment(name, start, start + n, shape))
            start += n
        return tuple(out)

    def plan(self, image_size) -> CropGeometry:
        """The :class:`CropGeometry` an ``(H, W)`` image gets (grid, canvas, valid box); no pixels. Under a
        recipe's front end, the geometry of its high-resolution tiles (:meth:`view_plan` has the rest).

        ``image_size``: two whole numbers >= 1 (ints, numpy or 0-dim tensor integers); anything else is
        refused here, as in :meth:`view_plan`, :meth:`num_tokens` and :meth:`num_backbone_passes`."""
        image_size = as_image_size(image_size, "HighResEncoder.plan")
        if self.frontend is not None:
            return self.frontend.plan(image_size).geometry
        return self.crop.plan(image_size)

    def view_plan(self, image_size) -> ViewPlan:
        """Under a recipe's front end: the :class:`~hrperc.modules.frontend.ViewPlan` of an ``(H, W)`` image
        (its views, tile geometry and token layout)."""
        if self.frontend is None:
            raise ValueError(
                "HighResEncoder.view_plan: this encoder runs a DualPerspectiveCrop, not a recipe's front end; "
                "use plan(image_size) for its geometry and num_tokens(image_size) for its tokens."
            )
        return self.frontend.plan(as_image_size(image_size, "HighResEncoder.view_plan"))

    def num_tokens(self, image_size) -> int:
        """``T``: visual tokens :meth:`forward` returns for one ``(H, W)`` image (see the module table; under a
        recipe, the reference processor's count of image placeholder tokens, newline slots included)."""
        image_size = as_image_size(image_size, "HighResEncoder.num_tokens")
        if self.frontend is not None:
            return self.frontend.num_tokens(image_size)
        return self._layout(self.plan(image_size).grid)[-1].stop

    def required_subimages(self, grid, encode_all: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(local_needed, global_needed)``, two ``(N,)`` bool masks of the sub-images that are encoded."""
        n = grid[0] * grid[1]
        everything = self.encode_all if encode_all is None else as_bool(encode_all, "encode_all", "required_subimages")
        if self.dem is None or everything:
            return torch.ones(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)
        local, glob = self.dem.required_subimages(tuple(grid), self.tile_tokens)
        return torch.as_tensor(local, dtype=torch.bool).cpu(), torch.as_tensor(glob, dtype=torch.bool).cpu()

    @property
    def encodes_thumbnail(self) -> bool:
        """Whether :meth:`forward` runs the thumbnail through the ViT: ``thumbnail=True`` and a
        ``combine`` that uses it (``"none"`` returns the high-resolution tokens only)."""
        return self.thumbnail and self.combine != "none"

    def num_backbone_passes(self, image_size) -> int:
        """Sub-images of one ``(H, W)`` image that go through the ViT (``2N+1`` when nothing is skipped)."""
        image_size = as_image_size(image_size, "HighResEncoder.num_backbone_passes")
        if self.frontend is not None:
            return self.frontend.plan(image_size).views
        local, glob = self.required_subimages(self.plan(image_size).grid)
        return int(local.sum()) + int(glob.sum()) + int(self.encodes_thumbnail)

    # --- the ViT -----------------------------------------------------------------------------------
    @property
    def chunk_size(self) -> int:
        """Sub-images per backbone call: ``max_batch``, or its ``"auto"`` value on the backbone's device."""
        if self.max_batch != "auto":
            return self.max_batch
        if self.backbone.device.type == "cpu":
            tokens = self.backbone.num_patches + self.backbone.num_prefix_tokens
            factor = min(_CPU_NARROW_FACTOR, max(1, _CPU_FULL_WIDTH // self.backbone.hidden_size))
            budget = _CPU_TOKENS_PER_CALL * factor
            return max(1, budget // tokens)
        return 32

    def encode_subimages(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(S, 3, h, w)`` pixels in ``[0, 1]`` (or uint8 ``[0, 255]``) -> ``(S, ht*wt, D)`` tokens, in chunks
        of :attr:`chunk_size`. uint8 pixels are converted one chunk at a time (no float copy of the stack)."""
        bb = self.backbone

        def encode(chunk: torch.Tensor) -> torch.Tensor:
            x = bb.normalize(chunk.to(bb.device))  # float32
            x = x.to(bb.dtype)  # a bf16 / fp16 backbone: the float32 copy is freed here, before the blocks run
            return bb.features(x, layer=self.layer)

        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_backbone):
            feats = [encode(c) for c in pixels.split(self.chunk_size)]
        return feats[0] if len(feats) == 1 else torch.cat(feats)

    # --- forward -----------------------------------------------------------------------------------
    def subimage_features(
        self, images, encode_all: bool | None = None, thumbnail: bool | None = None, _clock=None
    ) -> SubimageFeatures:
        """Crop and encode only: the ViT tokens of every sub-image, before any enhancement.

        ``local``/``strided``: ``(sum_b N_b, ht*wt, D)`` in ``local_crop``/``stride_crop`` order (image ``b``
        at ``crops.offsets[b]``), zeros for sub-images that were skipped; ``thumbnail``: ``(B, ht*wt, D)``,
        or ``None`` when the module has ``thumbnail=False`` or the ``thumbnail`` argument is False.
        ``encode_all`` overrides the module's setting.
        """
        fn = "HighResEncoder.subimage_features"
        clock = _clock or _Clock(False, self.backbone.device)
        everything = self.encode_all if encode_all is None else as_bool(encode_all, "encode_all", fn)
        with_thumb = self.thumbnail if thumbnail is None else as_bool(thumbnail, "thumbnail", fn) and self.thumbnail
        # uint8 stays uint8 until it is resized (no full-size float copy)
        pixels = to_pixels(images, check_range=self.check_range, keep_uint8=True)
        device = self.backbone.device  # crop and resize where the ViT runs (fast on a GPU)
        pixels = pixels.to(device) if isinstance(pixels, torch.Tensor) else [p.to(device) for p in pixels]
        crops = self.crop(pixels, thumbnail=with_thumb, scale_uint8=True)  # no thumbnail resize when not encoded
        clock.lap("crop")
        geos, offsets = crops.geometries, crops.offsets
        n_total = crops.local.shape[0]
        # Which sub-images are read: index lists over the whole batch's stacks (one entry per image).
        needs = {g: self.required_subimages(g, everything) for g in {geo.grid for geo in geos}}
        local_idx = torch.cat([needs[geo.grid][0].nonzero().flatten() + off for geo, off in zip(geos, offsets)])
        global_idx = torch.cat([needs[geo.grid][1].nonzero().flatten() + off for geo, off in zip(geos, offsets)])
        all_local, all_global = len(local_idx) == n_total, len(global_idx) == n_total
        parts = [crops.local if all_local else crops.local[local_idx.to(crops.local.device)]]
        parts.append(crops.strided if all_global else crops.strided[global_idx.to(crops.strided.device)])
        if with_thumb:
            parts.append(crops.thumbnail)
        stack = torch.cat(parts)
        clock.lap("gather")

        feats = self.encode_subimages(stack)  # one batched pass (chunks of max_batch) for the whole batch
        clock.lap("backbone")

        n_local, n_global = len(local_idx), len(global_idx)
        return SubimageFeatures(
            local=self._scatter(feats[:n_local], local_idx, n_total, all_local),
            strided=self._scatter(feats[n_local : n_local + n_global], global_idx, n_total, all_global),
            thumbnail=feats[n_local + n_global :] if with_thumb else None,
            crops=crops,
            encoded=int(stack.shape[0]),
            skipped=2 * n_total - n_local - n_global,
        )

    def forward(self, images, timings: bool = False, *, project=None, newline=None) -> EncoderOutput:
        """Images -> :class:`EncoderOutput`; ``timings=True`` records seconds per stage (syncing CUDA).

        ``project`` is a per-token map (``(..., D) -> (..., D')``, e.g. a model's projector): under a recipe's
        front end it runs where the reference model applies its projector, before any assembly step the
        reference runs after it (OneVision's shrink); otherwise on the combined tokens (padding of a ragged
        batch stays zero). ``newline`` ``(D',)`` fills the newline slots of a recipe's layout (zeros
        otherwise; ``EncoderOutput.slot_mask`` marks them; a layout without slots ignores it).
        """
        timings = as_bool(timings, "timings", "HighResEncoder.forward")
        if self.frontend is not None:
            return self._forward_frontend(images, timings, project, newline)
        clock = _Clock(timings, self.backbone.device)
        sub = self.subimage_features(images, thumbnail=self.encodes_thumbnail, _clock=clock)
        geos, offsets = sub.crops.geometries, sub.crops.offsets
        local_feats, global_feats, thumb, B = sub.local, sub.strided, sub.thumbnail, len(geos)
        groups = self._enhance(local_feats, global_feats, thumb, geos, offsets)
        if project is not None:  # per token, before the ragged padding (which stays zero)
            groups = [(members, project(rows)) for members, rows in groups]
        clock.lap("dem")

        counts = [0] * B
        for members, rows in groups:
            for b in members:
                counts[b] = rows.shape[1]
        T = max(counts)
        if len(groups) == 1:
            tokens = groups[0][1]
        else:  # ragged grids: pad each grid group's rows into place (a loop over groups, not images)
            rows0 = groups[0][1]
            tokens = rows0.new_zeros(B, T, rows0.shape[-1])
            for members, rows in groups:
                tokens[torch.tensor(members, device=tokens.device), : rows.shape[1]] = rows
        count_t = torch.tensor(counts, device=tokens.device)
        token_mask = torch.arange(T, device=tokens.device)[None, :] < count_t[:, None]
        clock.lap("combine")
        ph, pw = self.backbone.patch_size
        return EncoderOutput(
            tokens=tokens,
            token_mask=token_mask,
            geometries=list(geos),
            layout=[self._layout(geo.grid) for geo in geos],
            valid_masks=[geo.valid_mask((ph, pw)) for geo in geos],
            thumbnail_tokens=thumb,
            encoded={"encoded": sub.encoded, "skipped": sub.skipped},
            timings=clock.times,
        )

    def _forward_frontend(self, images, timings: bool, project, newline) -> EncoderOutput:
        """A recipe's front end: plans, views (per distinct size), one batched ViT pass, assembly (per layout)."""
        fe, clock = self.frontend, _Clock(timings, self.backbone.device)
        pixels = to_pixels(images, check_range=self.check_range, keep_uint8=True, one_dtype=False)
        device = self.backbone.device
        if isinstance(pixels, torch.Tensor):  # a batch: one size, one plan
            pixels = pixels.to(device)
            sizes = [tuple(pixels.shape[-2:])] * pixels.shape[0]
        else:
            pixels = [p.to(device) for p in pixels]
            sizes = [tuple(p.shape[-2:]) for p in pixels]
        plans = {size: fe.plan(size) for size in dict.fromkeys(sizes)}
        B = len(sizes)
        # Views: images of one size (and dtype: uint8 is resized in uint8) are prepared together.
        by_size: dict[tuple, list[int]] = {}
        for b, size in enumerate(sizes):
            dtype = pixels.dtype if isinstance(pixels, torch.Tensor) else pixels[b].dtype
            by_size.setdefault((size, dtype), []).append(b)
        view_groups, order = [], []
        for (size, _), members in by_size.items():
            batch = pixels if isinstance(pixels, torch.Tensor) else torch.stack([pixels[b] for b in members])
            view_groups.append(fe.views(batch, plans[size]).flatten(0, 1))
            order.extend(members)
        if len({v.dtype for v in view_groups}) > 1:  # uint8 and float views: uint8 to [0, 1] before joining
            view_groups = [to_unit(v) for v in view_groups]
        stack = view_groups[0] if len(view_groups) == 1 else torch.cat(view_groups)
        clock.lap("views")

        feats = self.encode_subimages(stack)  # every view of the whole batch: one batched pass, in chunks
        clock.lap("backbone")

        # Features back per image, then assembled per layout key.
        counts = [plans[sizes[b]].views for b in order]
        starts = dict(zip(order, torch.tensor([0] + counts[:-1]).cumsum(0).tolist()))
        by_key: dict[tuple, list[int]] = {}
        for b in range(B):
            by_key.setdefault(plans[sizes[b]].key, []).append(b)
        groups = []
        for members in by_key.values():
            plan = plans[sizes[members[0]]]
            if len(by_key) == 1 and order == list(range(B)):
                group = feats.view(B, plan.views, *feats.shape[1:])
            else:
                idx = torch.cat([torch.arange(starts[b], starts[b] + plan.views) for b in members])
                group = feats[idx.to(feats.device)].view(len(members), plan.views, *feats.shape[1:])
            if self.dem is not None:  # the DEM computes in its own dtype
                p = next(self.dem.parameters(), None)
                group = group.to(p.dtype) if p is not None else group
            groups.append((members, fe.assemble(group, plan, dem=self.dem, project=project)))
        clock.lap("assemble")

        per_image = [plans[s].num_tokens for s in sizes]
        T = max(per_image)
        if len(groups) == 1:
            tokens = groups[0][1]
        else:  # ragged layouts: each group's rows into place (a loop over layouts, not images)
            rows0 = groups[0][1]
            tokens = rows0.new_zeros(B, T, rows0.shape[-1])
            for members, rows in groups:
                tokens[torch.tensor(members, device=tokens.device), : rows.shape[1]] = rows
        count_t = torch.tensor(per_image, device=tokens.device)
        token_mask = torch.arange(T, device=tokens.device)[None, :] < count_t[:, None]
        layouts = [plans[s].layout for s in sizes]
        if newline is not None:
            slots = torch.stack([slot_mask(segs, T) for segs in layouts]).to(tokens.device)
            tokens = torch.where(slots[..., None], newline.to(tokens.dtype).to(tokens.device), tokens)
        clock.lap("combine")
        ph, pw = self.backbone.patch_size
        return EncoderOutput(
            tokens=tokens,
            token_mask=token_mask,
            geometries=[plans[s].geometry for s in sizes],
            layout=layouts,
            valid_masks=[plans[s].geometry.valid_mask((ph, pw)) for s in sizes],
            encoded={"encoded": int(stack.shape[0]), "skipped": 0},
            timings=clock.times,
            plans=[plans[s] for s in sizes],
        )

    @staticmethod
    def _scatter(feats: torch.Tensor, idx: torch.Tensor, n: int, complete: bool) -> torch.Tensor:
        """Encoded features back at their stack positions; skipped sub-images read as zeros."""
        if complete:
            return feats
        full = feats.new_zeros(n, *feats.shape[1:])
        return full.index_copy(0, idx.to(feats.device), feats)

    def _enhance(self, local_feats, global_feats, thumb, geos, offsets):
        """``[(members, tokens (len(members), T_g, D))]``, one entry per distinct grid in the batch.

        Images sharing a grid go through the DEM (and the combine) together: a uniform batch is one call.
        """
        ht, wt = self.tile_tokens
        by_grid: dict[tuple[int, int], list[int]] = {}
        for b, geo in enumerate(geos):
            by_grid.setdefault(geo.grid, []).append(b)
        out = []
        for grid, members in by_grid.items():
            n = grid[0] * grid[1]
            if len(members) == len(geos):
                loc, glo, th = local_feats, global_feats, thumb
            else:
                idx = torch.cat([torch.arange(offsets[b], offsets[b] + n) for b in members]).to(local_feats.device)
                loc, glo = local_feats[idx], global_feats[idx]
                th = None if thumb is None else thumb[torch.tensor(members, device=thumb.device)]
            if self.dem is not None:
                self._check_mean(grid)
                # A DEM may have no parameters at all (directions="none", fusion="add": the paper's
                # plain-addition / crop-only ablations); it then computes in the backbone's dtype.
                p = next(self.dem.parameters(), None)
                dtype = p.dtype if p is not None else loc.dtype
                hi = self.dem(loc.to(dtype), glo.to(dtype), grid, tile_size=(ht, wt))
            else:
                D = loc.shape[-1]
                loc_map = local_merge(loc.reshape(-1, ht, wt, D), grid, layout="nhwc")
                glo_map = stride_merge(glo.reshape(-1, ht, wt, D), grid, layout="nhwc")
                hi = torch.cat([loc_map.flatten(1, 2), glo_map.flatten(1, 2)], dim=1)
            out.append((members, self._combine(hi, th)))
        return out

    def _combine(self, hi: torch.Tensor, thumb: torch.Tensor | None) -> torch.Tensor:
        """``hi`` ``(b, T_hi, D)`` and ``thumb`` ``(b, ht*wt, D)`` -> ``(b, T, D)`` by ``combine``."""
        if self.combine == "mean":
            return (hi + thumb.to(hi.dtype)) / 2
        if self.combine == "concat" and thumb is not None:
            return torch.cat([thumb.to(hi.dtype), hi], dim=1)
        return hi


def _recipe_dem(backbone):
    """A fresh DEM for a recipe's DCM+DEM upgrade: the released attention and fusion, no reduction (the
    enhanced map takes the place of the tiles' map, so the recipe's own layout and token count stay)."""
    from .modules.dem import DualPerspectiveEnhancement

    return DualPerspectiveEnhancement(backbone.hidden_size, heads=default_heads(backbone.hidden_size), reduction="none")


class _Clock:
    """Stage timings for ``forward(timings=True)``; synchronizes CUDA so the numbers mean something."""

    def __init__(self, enabled: bool, device) -> None:
        self.enabled, self.device, self.times = enabled, torch.device(device), {}
        self._last = self._now() if enabled else 0.0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self, name: str) -> None:
        if self.enabled:
            now = self._now()
            self.times[name] = self.times.get(name, 0.0) + now - self._last
            self._last = now
