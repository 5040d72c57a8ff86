"""``inf_llava``: the released INF-LLaVA front end (``docs/released.md`` has the facts it follows).

A 3x3 grid of the backbone's native tiles (1008 px for ViT-L/14-336), bicubic resizing without
antialias (the thumbnail too), local and strided sub-images plus the thumbnail through the ViT's
second-to-last layer (CLS dropped), the released DEM with its bilinear reduction back to one tile's
token grid, and the mean with the thumbnail's tokens: 576 tokens for ViT-L/14-336. Only 11 of the
19 sub-images are encoded; the other 8 cannot reach the output.

Options: ``dem`` -- ``"default"`` (a fresh released-configuration DEM), a
:class:`~hrperc.DualPerspectiveEnhancement`, a released checkpoint (a state dict, a file or a
directory of shards, loaded by :func:`hrperc.pretrained.inf_llava.load_dem`), or ``None`` (no DEM, as
everywhere: then ``combine="concat"`` or ``"none"``); crop options (the keyword arguments of
:class:`~hrperc.DualPerspectiveCrop`: ``grid``, ``max_tiles``, ``min_tiles``, ``fit``, ``mode``,
``antialias``, ``fill``, ``thumbnail``, ``auto_rule``) and encoder options (``combine``, ``layer``,
``max_batch``, ``encode_all``, ``train_backbone``, ``grad_checkpointing``, ``check_range``; see
:class:`~hrperc.HighResEncoder`) override the released values; any other name is refused.

The released model uses OpenAI's CLIP ViT-L/14-336, trained with QuickGELU: in open_clip that is
the ``ViT-L-14-336-quickgelu`` config (``ViT-L-14-336`` is the GELU variant and gives wrong features
with OpenAI weights), in timm ``vit_large_patch14_clip_quickgelu_336``; a Hugging Face ``hf:<dir>``
checkpoint reads the activation from its ``config.json``.

Example::

    >>> import hrperc
    >>> vit = hrperc.create_backbone(                               # doctest: +SKIP
    ...     "open_clip:ViT-L-14-336-quickgelu", pretrained="/ckpt/openai-clip-l14-336.bin")
    >>> enc = hrperc.create_encoder("inf_llava", vit, dem="/ckpt/inf-llava-llama3-8b")   # doctest: +SKIP
    >>> enc.num_tokens((1008, 1008)), enc.num_backbone_passes((1008, 1008))              # doctest: +SKIP
    (576, 11)
"""

from __future__ import annotations

from torch import nn

from ..backbones import create_backbone, wrap_backbone
from ..encoder import HighResEncoder
from ..modules.dual_crop import DualPerspectiveCrop
from ..pretrained.inf_llava import load_dem
from . import register_recipe
from ._common import ENCODER_OPTIONS, split_options

__all__ = ["build", "CROP", "ENCODER"]

#: The released crop settings (tile size: the backbone's).
CROP = dict(grid=(3, 3), max_tiles=9, thumbnail=True, fit="resize", mode="bicubic", antialias=False)
#: The released encoder settings.
ENCODER = dict(combine="mean", layer=-2)


@register_recipe(
    "inf_llava",
    front_end=DualPerspectiveCrop,
    defaults={**CROP, **ENCODER},
    encoder_options=(*ENCODER_OPTIONS, "combine", "encode_all"),
)
def build(backbone, dem="default", **options) -> HighResEncoder:
    """The released INF-LLaVA front end around ``backbone`` (see the module docs for the options)."""
    crop_kw, enc_kw = split_options("inf_llava", options)  # CROP and ENCODER filled in
    backbone = wrap_backbone(create_backbone(backbone) if isinstance(backbone, str) else backbone)
    if dem is not None and not isinstance(dem, nn.Module) and not (isinstance(dem, str) and dem == "default"):
        dem = load_dem(dem)
    crop = DualPerspectiveCrop(tile_size=backbone.image_size, **crop_kw)
    return HighResEncoder(backbone, crop, dem=dem, **enc_kw)
