"""ViT backbones behind one protocol, :class:`VisionBackbone`; build by name with :func:`create_backbone`.

One file per family: ``timm_vit`` (timm), ``open_clip_vit`` (open_clip), ``hf_vit`` (transformers), each
with its adapter, its ``create`` function (checkpoint filter, warnings) and its ``wrap`` probe, registered
with :func:`register_family` under its prefix (``timm:``, ``open_clip:``, ``hf:``). ``base`` holds the
protocol, ``factory`` the family registry, the name parsing, :func:`create_backbone` and
:func:`wrap_backbone`; ``_loading`` the strict checkpoint loading every family shares.

Example::

    >>> import hrperc
    >>> bb = hrperc.create_backbone("timm:vit_tiny_patch16_224")          # random weights
    >>> bb.family, bb.image_size, bb.grid_size, bb.hidden_size
    ('timm', (224, 224), (14, 14), 192)
"""

from .base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, VisionBackbone, resolve_layer
from .factory import BackboneFamily, create_backbone, list_families, register_family, wrap_backbone

# Importing a family module registers it; wrap_backbone asks the families in this order.
from .timm_vit import TimmBackbone  # isort: skip
from .open_clip_vit import OpenClipBackbone  # isort: skip
from .hf_vit import HFBackbone  # isort: skip

__all__ = [
    "VisionBackbone",
    "TimmBackbone",
    "OpenClipBackbone",
    "HFBackbone",
    "create_backbone",
    "wrap_backbone",
    "register_family",
    "list_families",
    "BackboneFamily",
    "resolve_layer",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
]
