"""``gemma3``: Gemma 3's image path -- the whole image as one fixed square view of the SigLIP tower (896 px for
the released models), plus, with ``do_pan_and_scan=True``, "pan and scan" crops of an elongated image.

Exactly ``Gemma3ImageProcessor`` (transformers' default torchvision backend; ``Gemma3ImageProcessorPil`` cuts the
same crops), ``Gemma3Processor``'s image-token count and ``Gemma3Model.get_image_features``::

    image (H, W) --pan and scan (do_pan_and_scan=True, an elongated image): 2..max crops along its long side
                   (hrperc.ops.pan_and_scan; none for a square-ish image or crops under min_crop_size)
          --the image, then each crop, resized to the tower's (t, t), bilinear, antialiased (uint8 kept)
          --SigLIP, last_hidden_state (its post_layernorm applied), (t/p)^2 patches per view
          --average pool (Gemma3MultiModalProjector's AvgPool2d) to s x s = mm_tokens_per_image per view
          --> (1 + crops) * mm_tokens_per_image tokens of width D

The pooling is the front end's step (as InternVL's pixel shuffle is): the tokens are the pooled tower features,
``(1 + crops) * mm_tokens_per_image`` of them, :meth:`~hrperc.HighResEncoder.num_tokens` equal to the count of
``<image_soft_token>`` the processor writes (:func:`hrperc.ops.pan_and_scan.gemma3_num_tokens`). The rest of
the model's projector -- its RMSNorm and its projection matrix, per token -- is ``project=``:
``enc(images, project=model.model.multi_modal_projector)`` applies it through :class:`Gemma3Projector` (taken
automatically for a ``Gemma3MultiModalProjector``), giving ``get_image_features``' ``pooler_output``.

**Text layout.** The processor writes, for each view, ``"\\n\\n<start_of_image>"``, ``mm_tokens_per_image``
``<image_soft_token>``, ``"<end_of_image>\\n\\n"``; an image with crops becomes ``"Here is the original image
{view} and here are some crops to help you see better {view} {view} ..."``. The encoder's layout has one run per
view -- ``"image"`` (the whole image), then ``"crop"`` runs, each an ``(s, s)`` map -- and :func:`image_text`
writes the processor's text from it (the model embeds the markers from ``input_ids``; only the soft tokens get
features, so there are no slots).

Options, under transformers' names: ``do_pan_and_scan`` (default ``False``, as transformers),
``pan_and_scan_min_crop_size`` (256), ``pan_and_scan_max_num_crops`` (4),
``pan_and_scan_min_ratio_to_activate`` (1.2) -- the released processors' -- and ``mm_tokens_per_image`` (the
model config's, 256: 16 x 16), ``layer`` (default -1) and the encoder options. The tower's image must be a
square of whole patches whose patch grid pools evenly to ``mm_tokens_per_image`` (SigLIP-896/14: 64 x 64
patches, 4 x 4 each); anything else is refused, naming the value and the fix.

``backbone``: the model's ``vision_tower`` (a ``SiglipVisionModel``; wrapped as a :class:`Gemma3Tower`, which
reads layer -1 as ``last_hidden_state``, the final LayerNorm included, as the model does) or any
:class:`~hrperc.backbones.VisionBackbone` (used as it is: its layers are block outputs, before any final norm).

Example::

    >>> import torch, hrperc
    >>> from transformers import SiglipVisionConfig, SiglipVisionModel
    >>> config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
    ...                             image_size=64, patch_size=8)                  # 8 x 8 patches
    >>> enc = hrperc.create_encoder("gemma3", SiglipVisionModel(config).eval(), mm_tokens_per_image=16)
    >>> enc.num_tokens((300, 700)), [s.source for s in enc.plan((300, 700)).layout]
    (16, ['image'])
    >>> pas = hrperc.create_encoder("gemma3", enc.backbone, mm_tokens_per_image=16, do_pan_and_scan=True)
    >>> pas.num_tokens((300, 700)), [s.source for s in pas.plan((300, 700)).layout]    # 2 crops of 300 x 350
    (48, ['image', 'crop', 'crop'])
    >>> pas([torch.rand(3, 300, 700), torch.rand(3, 50, 60)]).tokens.shape
    torch.Size([2, 48, 32])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import public
from .._validation import as_bool, as_int
from ..backbones import VisionBackbone
from ..backbones.hf_vit import HFBackbone, hf_vision_transformer
from ..modules.frontend import FrontEnd, TokenSegment, ViewPlan, make_layout
from ..ops import pan_and_scan as pas
from ..ops import preprocess as pp
from ..ops.canvas import CropGeometry
from . import register_recipe
from ._common import as_backbone, build, split_options

__all__ = ["build_gemma3", "Gemma3FrontEnd", "Gemma3Plan", "Gemma3Projector", "Gemma3Tower", "image_text"]


@dataclass(frozen=True)
class Gemma3Plan(ViewPlan):
    """One image: ``num_crops`` pan-and-scan crops (``grid`` their ``(rows, cols)``, ``(1, 1)`` for none) after
    the whole image; the crops' boxes are :func:`hrperc.ops.pan_and_scan.pan_and_scan_crops` of the size."""

    num_crops: int


class Gemma3Tower(HFBackbone):
    """A transformers SigLIP tower read as Gemma 3 reads it: the last layer is ``last_hidden_state``, the
    tower's final ``post_layernorm`` applied (``HFBackbone`` reads block outputs before any final norm)."""

    def _patch_tokens(self, pixels: torch.Tensor, k: int) -> torch.Tensor:
        hidden = super()._patch_tokens(pixels, k)
        norm = getattr(self.model, "post_layernorm", None)
        return norm(hidden) if k == self.num_layers and norm is not None else hidden


class Gemma3Projector(nn.Module):
    """Gemma 3's projector (``Gemma3MultiModalProjector``) after its pooling, as a per-token map of the ``gemma3``
    recipe's pooled tokens: ``(..., D)`` -> ``(..., D_llm)``, the model's RMSNorm and projection matrix."""

    projector: Any  # a transformers module: its attributes are the model's, not nn.Module's

    @public(name="Gemma3Projector")
    def __init__(self, projector: nn.Module) -> None:
        super().__init__()
        if not isinstance(projector, nn.Module) or not all(
            hasattr(projector, a) for a in ("mm_soft_emb_norm", "mm_input_projection_weight")
        ):
            raise TypeError(
                f"projector={type(projector).__name__}; expected Gemma 3's multi_modal_projector (mm_soft_emb_norm, "
                f"mm_input_projection_weight). Pass model.model.multi_modal_projector of a "
                f"Gemma3ForConditionalGeneration."
            )
        self.projector = projector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pj = self.projector
        return torch.matmul(pj.mm_soft_emb_norm(x), pj.mm_input_projection_weight).type_as(x)


def _token_map(project):
    """``project`` as a per-token map: Gemma 3's projector (its pooling is the front end's) wrapped."""
    if isinstance(project, nn.Module) and hasattr(project, "mm_input_projection_weight"):
        return Gemma3Projector(project)
    return project


@public
def image_text(layout, *, boi: str, image: str, eoi: str) -> str:
    """The text ``Gemma3Processor`` writes for one image whose tokens are laid out as ``layout`` (the whole
    image's run, then one run per crop): each run is ``"\\n\\n" + boi + image * length + eoi + "\\n\\n"``, and
    with crops the processor's "Here is the original image ... and here are some crops ..." around them."""
    runs = tuple(layout)
    if not runs or not all(isinstance(seg, TokenSegment) for seg in runs):
        raise TypeError(
            f"layout={layout!r}; pass an image's token layout, a tuple of TokenSegment (encoder.plan(size).layout)."
        )
    views = [f"\n\n{boi}{image * seg.length}{eoi}\n\n" for seg in runs]
    if len(views) == 1:
        return views[0]
    return f"Here is the original image {views[0]} and here are some crops to help you see better " + " ".join(
        views[1:]
    )


class Gemma3FrontEnd(FrontEnd[Gemma3Plan]):
    """Gemma 3's whole-image view and pan-and-scan crops, pooled to ``mm_tokens_per_image`` each (see
    :mod:`hrperc.recipes.gemma3`)."""

    tile_size: tuple[int, int]  # always set: the tower's square

    def __init__(
        self,
        tile_size,
        patch_size,
        *,
        do_pan_and_scan: bool = False,
        pan_and_scan_min_crop_size: int = pas.MIN_CROP_SIZE,
        pan_and_scan_max_num_crops: int = pas.MAX_NUM_CROPS,
        pan_and_scan_min_ratio_to_activate: float = pas.MIN_RATIO_TO_ACTIVATE,
        mm_tokens_per_image: int = pas.MM_TOKENS_PER_IMAGE,
    ) -> None:
        super().__init__(tile_size, patch_size)
        (th, tw), (ph, pw) = self.tile_size, self.patch_size
        if th != tw or th % ph or tw % pw or th // ph != tw // pw:
            raise ValueError(
                f"the tower's image_size={self.tile_size} with patch_size={self.patch_size} is not a square of whole "
                f"patches; Gemma 3 resizes every view to the tower's square and pools its square patch grid. Use a "
                f"square tower of whole patches, e.g. SigLIP's 896 x 896 with patch 14 (the released models')."
            )
        per = as_int(
            mm_tokens_per_image, "mm_tokens_per_image", example=f"mm_tokens_per_image={pas.MM_TOKENS_PER_IMAGE}"
        )
        side, grid = math.isqrt(per), th // ph
        if side * side != per or grid % side:
            fits = [k * k for k in range(1, grid + 1) if grid % k == 0]
            raise ValueError(
                f"mm_tokens_per_image={per} does not pool the tower's {grid} x {grid} patch grid (image_size {th} / "
                f"patch {ph}) evenly: it must be s * s with s dividing {grid}. Pass one of {fits} (the model "
                f"config's mm_tokens_per_image), or a tower whose patch grid is a multiple of its side."
            )
        size, crops, ratio = pas.check_pan_and_scan(
            pan_and_scan_min_crop_size, pan_and_scan_max_num_crops, pan_and_scan_min_ratio_to_activate
        )
        self.do_pan_and_scan = as_bool(do_pan_and_scan, "do_pan_and_scan")
        self.pan_and_scan_min_crop_size, self.pan_and_scan_max_num_crops = size, crops
        self.pan_and_scan_min_ratio_to_activate = ratio
        self.mm_tokens_per_image, self.side, self.kernel = per, side, grid // side

    def _crop_options(self) -> dict:
        return dict(
            min_crop_size=self.pan_and_scan_min_crop_size,
            max_num_crops=self.pan_and_scan_max_num_crops,
            min_ratio_to_activate=self.pan_and_scan_min_ratio_to_activate,
        )

    def plan(self, image_size) -> Gemma3Plan:
        H, W = image_size
        grid = pas.pan_and_scan_grid((H, W), **self._crop_options()) if self.do_pan_and_scan else (0, 0)
        n, s = grid[0] * grid[1], self.side
        runs = [("image", s * s, (s, s))] + [("crop", s * s, (s, s))] * n
        t = self.tile_size
        geo = CropGeometry((H, W), grid if n else (1, 1), t, (H, W), (0, 0, H, W), "resize")
        return Gemma3Plan((H, W), 1 + n, geo, make_layout(*runs), n)

    def views(self, pixels: torch.Tensor, plan: Gemma3Plan) -> torch.Tensor:
        b, t = pixels.shape[0], self.tile_size
        whole = pp.resize(pixels, t, mode="bilinear")[:, None]  # uint8 stays uint8: the processor's rounding
        if not plan.num_crops:
            return whole
        # The crops along the long side: all but the last have the same size and are resized in one call.
        (H, W), (rows, cols) = plan.image_size, plan.grid
        axis, side, count = (-1, W, cols) if cols > 1 or rows == 1 else (-2, H, rows)
        step = -(-side // count)
        full = side // step  # crops entirely inside the image; the last one is cut when side % step
        cut = pixels.narrow(axis, 0, full * step).unflatten(axis, (full, step)).movedim(axis - 1, 1)
        parts = [whole, pp.resize(cut.flatten(0, 1).contiguous(), t, mode="bilinear").unflatten(0, (b, full))]
        if side % step:
            parts.append(pp.resize(pixels.narrow(axis, full * step, side % step), t, mode="bilinear")[:, None])
        return torch.cat(parts, 1)

    def assemble(self, feats, plan: Gemma3Plan, *, project=None):
        b, views, t, d = feats.shape
        g = self.tile_tokens[0]
        # Gemma3MultiModalProjector's pooling, the same operations: (N, t, D) -> (N, D, g, g) -> s x s averages
        x = feats.reshape(b * views, t, d).transpose(1, 2).reshape(b * views, d, g, g).contiguous()
        x = F.avg_pool2d(x, kernel_size=self.kernel, stride=self.kernel).flatten(2).transpose(1, 2)
        tokens = x.reshape(b, views * self.side * self.side, d)
        return tokens if project is None else _token_map(project)(tokens)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, mm_tokens_per_image={self.mm_tokens_per_image}, "
            f"do_pan_and_scan={self.do_pan_and_scan}, pan_and_scan_min_crop_size={self.pan_and_scan_min_crop_size}, "
            f"pan_and_scan_max_num_crops={self.pan_and_scan_max_num_crops}, "
            f"pan_and_scan_min_ratio_to_activate={self.pan_and_scan_min_ratio_to_activate}"
        )


def _is_siglip(module) -> bool:
    vision = hf_vision_transformer(module)
    return vision is not None and "Siglip" in type(vision).__name__


@register_recipe("gemma3", front_end=Gemma3FrontEnd, defaults={"layer": -1})
def build_gemma3(backbone, **options):
    """Gemma 3's front end around its SigLIP tower (see the module docs for the options)."""
    own, enc = split_options("gemma3", options)
    if isinstance(backbone, nn.Module) and not isinstance(backbone, VisionBackbone) and _is_siglip(backbone):
        bb = Gemma3Tower(backbone, layer=enc["layer"])
    else:
        bb = as_backbone(backbone, enc["layer"])
    return build(Gemma3FrontEnd(bb.image_size, bb.patch_size, **own), bb, enc)
