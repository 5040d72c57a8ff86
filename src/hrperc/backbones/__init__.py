"""ViT backbones behind one protocol, :class:`VisionBackbone`; build by name with :func:`create_backbone`.

One file per family: ``timm_vit`` (timm), ``open_clip_vit`` (open_clip), ``hf_vit`` (transformers);
``base`` holds the protocol, ``factory`` the name-based builder and :func:`wrap_backbone`.

Example::

    >>> import hrperc
    >>> bb = hrperc.create_backbone("timm:vit_tiny_patch16_224")          # random weights
    >>> bb.family, bb.image_size, bb.grid_size, bb.hidden_size
    ('timm', (224, 224), (14, 14), 192)
"""

from .base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, VisionBackbone, resolve_layer
from .factory import create_backbone, wrap_backbone
from .hf_vit import HFBackbone
from .open_clip_vit import OpenClipBackbone
from .timm_vit import TimmBackbone

__all__ = [
    "VisionBackbone",
    "TimmBackbone",
    "OpenClipBackbone",
    "HFBackbone",
    "create_backbone",
    "wrap_backbone",
    "resolve_layer",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
]
