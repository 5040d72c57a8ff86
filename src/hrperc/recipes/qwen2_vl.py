"""``qwen2_vl``: Qwen2-VL's native-resolution front end -- one view of the image's own size, packed.

Exactly ``Qwen2VLImageProcessor`` (transformers' default torchvision backend) followed by
``Qwen2VLForConditionalGeneration``'s ``get_image_features``, around the model's own vision tower::

    image (H, W) --qwen_resize: multiples of patch * merge (28), h * w in [min_pixels, max_pixels]--> (h, w)
          --resize (bicubic, antialias, uint8 kept)--> one view (3, h, w)
          --tower, EVERY view of the batch in one packed call (attention per image)--> (h/28) * (w/28) tokens

The tokens are the merged ones the LLM reads (width: the LLM's), in raster order over ``(h / 28, w / 28)``;
their count is the processor's number of ``<|image_pad|>`` tokens (:func:`hrperc.ops.native.qwen_num_tokens`).

Options: ``min_pixels`` / ``max_pixels`` (default: the released checkpoints' budget, 3136 / 12845056;
transformers' class defaults are 3136 / 1003520, pass those to match a processor built without a
checkpoint), ``reading`` (``"transformers"``, the default, or ``"qwen-vl-utils"``: the official
preprocessing's sizes; ``docs/recipes.md`` and :mod:`hrperc.ops.native` say where they differ) and the
encoder options (``max_batch``, ``train_backbone``, ``grad_checkpointing``, ``check_range``). ``backbone``
is the model's vision tower (``model.model.visual``) or a :class:`~hrperc.backbones.qwen_vl.QwenBackbone`.
``qwen2_5_vl`` and ``qwen3_vl`` run this front end on their towers. ``dcm=True`` (and ``dcm_grid``, default
``(2, 2)``) adds INF-LLaVA's strided global views of the same resized image, through the same packed tower
pass, and a DEM (``dem=``, default a fresh one, ``reduction="none"``) that enhances the merged-token map;
the count, the layout and the deepstack levels stay (:mod:`hrperc.modules.native_dcm`, ``docs/recipes.md``).

Example::

    >>> import torch, hrperc
    >>> from transformers import Qwen2VLVisionConfig
    >>> from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
    >>> tower = Qwen2VisionTransformerPretrainedModel(Qwen2VLVisionConfig(depth=1, embed_dim=32, hidden_size=48,
    ...                                                                   num_heads=2)).eval()
    >>> enc = hrperc.create_encoder("qwen2_vl", tower)
    >>> enc.num_tokens((480, 640)), enc([torch.rand(3, 480, 640), torch.rand(3, 100, 60)]).num_tokens
    (391, [391, 8])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._validation import as_int
from ..backbones.qwen_vl import QwenBackbone
from ..modules.frontend import FrontEnd, ViewPlan, make_layout
from ..modules.native_dcm import NativeDualPerspective
from ..ops import native
from ..ops import preprocess as pp
from ..ops.canvas import CropGeometry
from . import register_recipe
from ._common import build, split_options

__all__ = ["build_qwen2_vl", "NativeFrontEnd", "NativePlan", "qwen_backbone"]


@dataclass(frozen=True)
class NativePlan(ViewPlan):
    """One image: resized to ``resized = (h, w)``, ``layout[0].shape = (h // f, w // f)`` tokens; with
    ``dcm=True`` also ``global_cells = (Rv, Cv)``, the cells per side of each strided global view."""

    resized: tuple[int, int]
    global_cells: tuple[int, int] | None = None


class NativeFrontEnd(NativeDualPerspective, FrontEnd[NativePlan]):
    """One view of the image resized to its own budgeted size (see the module docs).

    ``patch`` / ``merge``: the tower's patch side and merge factor (one token per ``patch * merge`` pixels a
    side); ``deepstack``: how many deepstack levels the backbone's features carry after the tokens
    (Qwen3-VL), returned as ``EncoderOutput.extras["deepstack.<k>"]``. ``dcm`` / ``dcm_grid``: INF-LLaVA's
    global views and DEM on the merged-token map (:mod:`hrperc.modules.native_dcm`).
    """

    def __init__(
        self,
        tile_size,
        patch_size,
        *,
        min_pixels: int = native.QWEN2_VL_BUDGET[0],
        max_pixels: int = native.QWEN2_VL_BUDGET[1],
        reading: str = "transformers",
        patch: int = native.QWEN_PATCH_SIZE,
        merge: int = native.QWEN_MERGE_SIZE,
        deepstack: int = 0,
        dcm: bool = False,
        dcm_grid=(2, 2),
    ) -> None:
        super().__init__(None, patch_size)  # no fixed tile: every image has its own view size
        self._init_dcm(dcm, dcm_grid)
        self.patch, self.merge = as_int(patch, "patch"), as_int(merge, "merge")
        self.deepstack = as_int(deepstack, "deepstack", minimum=0)
        self.min_pixels, self.max_pixels, self.reading = min_pixels, max_pixels, reading
        native.qwen_resize((64, 64), **self._sizing())  # the budget and reading, checked once here

    def _sizing(self) -> dict:
        return dict(
            patch_size=self.patch,
            merge_size=self.merge,
            min_pixels=self.min_pixels,
            max_pixels=self.max_pixels,
            reading=self.reading,
        )

    def plan(self, image_size) -> NativePlan:
        h, w = native.qwen_resize(image_size, **self._sizing())
        f = self.patch * self.merge
        geo = CropGeometry(tuple(image_size), (1, 1), (h, w), (h, w), (0, 0, h, w))
        layout = make_layout(("image", (h // f) * (w // f), (h // f, w // f)))
        cells = self.dcm_cells((h // f, w // f))
        views = 1 if cells is None else 1 + self.dcm_grid[0] * self.dcm_grid[1]
        return NativePlan(tuple(image_size), views, geo, layout, (h, w), cells)

    def views(self, pixels: torch.Tensor, plan: NativePlan):
        resized = pp.resize(pixels, plan.resized)  # uint8 stays uint8: the processor's rounding
        if plan.global_cells is None:
            return resized[:, None]
        return resized[:, None], self.global_views(resized, plan.global_cells, self.patch * self.merge)

    def token_width(self, width: int) -> int:
        return width

    def assemble(self, feats, plan, *, project=None):
        native = feats[0] if isinstance(feats, tuple) else feats
        d = native.shape[-1] // (1 + self.deepstack)
        tokens = native[:, 0, :, :d]
        if plan.global_cells is not None:  # the DEM enhances the merged-token map; the layout stays
            rows, cols = plan.layout[0].shape
            fmap = tokens.unflatten(1, (rows, cols))
            tokens = self.enhance(fmap, feats[1][..., :d], plan.global_cells).flatten(1, 2)
        return tokens if project is None else project(tokens)

    def extras(self, feats, plan) -> dict[str, torch.Tensor]:
        if not self.deepstack:
            return {}
        native = feats[0] if isinstance(feats, tuple) else feats
        levels = native[:, 0].chunk(1 + self.deepstack, dim=-1)[1:]
        return {f"deepstack.{k}": level for k, level in enumerate(levels)}

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, min_pixels={self.min_pixels}, max_pixels={self.max_pixels}, "
            f"reading={self.reading!r}, patch={self.patch}, merge={self.merge}, deepstack={self.deepstack}"
            f"{self.dcm_repr()}"
        )


def qwen_backbone(backbone, family: str, layer) -> QwenBackbone:
    """``backbone`` (a Qwen vision tower, a ``QwenVisionTower`` or a ``QwenBackbone``) as a ``QwenBackbone``
    of ``family``; another family's tower or another model is refused, naming what to pass."""
    bb = backbone if isinstance(backbone, QwenBackbone) else QwenBackbone(backbone, layer=layer)
    if bb.qwen.family != family:
        raise ValueError(
            f"backbone is a {bb.qwen.family} vision tower, but this recipe is {family!r}: the two differ in their "
            f"patch, budget or normalization. Use create_encoder({bb.qwen.family!r}, tower), or pass a {family} tower."
        )
    return bb


def qwen_spec(budget: tuple[int, int]) -> dict:
    """A Qwen family's registration: :class:`NativeFrontEnd` less what its tower sets (patch, merge, deepstack),
    the family's pixel ``budget`` ``(min_pixels, max_pixels)``."""
    return dict(
        front_end=NativeFrontEnd,
        leave_out=("patch", "merge", "deepstack"),
        defaults={"layer": -1, "min_pixels": budget[0], "max_pixels": budget[1]},
    )


def build_native(name: str, backbone, options: dict):
    """A Qwen family's encoder: the front end with the family's defaults (its spec) around its tower."""
    own, enc = split_options(name, options)
    bb = qwen_backbone(backbone, name, enc["layer"])
    q = bb.qwen
    front_end = NativeFrontEnd(
        None, bb.patch_size, patch=q.patch_size, merge=q.merge_size, deepstack=bb.deepstack_levels, **own
    )
    return build(front_end, bb, enc)


@register_recipe("qwen2_vl", **qwen_spec(native.QWEN2_VL_BUDGET))
def build_qwen2_vl(backbone, **options):
    """Qwen2-VL's front end around its vision tower (see the module docs for the options)."""
    return build_native("qwen2_vl", backbone, options)
