"""hrperc: high-resolution perception modules for multimodal LLMs (INF-LLaVA and friends).

The pipeline, stage by stage (``docs/architecture.md`` maps each stage to its file): one runner,
:class:`HighResEncoder`, and a front end that plans, cuts and assembles (INF-LLaVA's, a recipe's, yours)::

    image --plan + views (crop)--> sub-images --backbone, one batched pass--> tokens
          --assemble (recombine + enhance (DEM) + reduce + combine)--> tokens to the LLM

The top level holds one obvious way for each job; everything else lives in the subpackages
(:mod:`hrperc.ops` pure tensor operations, :mod:`hrperc.modules` layers, :mod:`hrperc.attention`
attention and its kernels, :mod:`hrperc.backbones`, :mod:`hrperc.recipes`, :mod:`hrperc.pretrained`).

Example::

    >>> import torch, hrperc
    >>> x = torch.rand(2, 3, 1008, 1008)
    >>> torch.equal(hrperc.stride_merge(hrperc.stride_crop(x, (3, 3)), (3, 3)), x)
    True
"""

from . import attention, backbones, modules, ops, pretrained, recipes  # noqa: F401 - the subpackages, bound
from ._version import __version__ as __version__
from .attention import WindowCrossAttention, attention_backend, window_attention
from .backbones import create_backbone, wrap_backbone
from .encoder import HighResEncoder
from .modules import DualPerspectiveCrop, DualPerspectiveEnhancement, LocalCrop, Recombine, StrideGlobalCrop
from .ops import local_crop, local_merge, permute_windows, stride_crop, stride_merge
from .recipes import create_encoder, list_recipes

__all__ = [
    # crop / recombine (DCM)
    "local_crop",
    "stride_crop",
    "local_merge",
    "stride_merge",
    "permute_windows",
    "LocalCrop",
    "StrideGlobalCrop",
    "Recombine",
    "DualPerspectiveCrop",
    # enhance (DEM)
    "window_attention",
    "attention_backend",
    "WindowCrossAttention",
    "DualPerspectiveEnhancement",
    # backbones
    "create_backbone",
    "wrap_backbone",
    # the encoder and its named front ends
    "HighResEncoder",
    "create_encoder",
    "list_recipes",
]
