"""The ``nn.Module`` layers, one concept per file, each a thin holder of options around :mod:`hrperc.ops`.

=============================  ================================================================
:mod:`~hrperc.modules.crop`    :class:`LocalCrop`, :class:`StrideGlobalCrop`, :class:`Recombine`
:mod:`~hrperc.modules.dual_crop`  :class:`DualPerspectiveCrop` (INF-LLaVA's DCM front door), :class:`DualCrops`
:mod:`~hrperc.modules.dem`     :class:`DualPerspectiveEnhancement` (the DEM)
:mod:`~hrperc.modules.frontend`  :class:`FrontEnd`, :class:`ViewPlan`: the contract every front end meets
:mod:`~hrperc.modules.dual_front_end`  :class:`DualFrontEnd`: INF-LLaVA's front end (crops, DEM, combine)
:mod:`~hrperc.modules.fusion`  :class:`Fusion`: the fusions of the two enhanced maps
:mod:`~hrperc.modules.projector`  :func:`build_projector`: LLaVA's vision-to-language projectors
=============================  ================================================================

(:class:`~hrperc.WindowCrossAttention` lives with the attention backends, in :mod:`hrperc.attention`.)

Example::

    >>> import torch
    >>> from hrperc.modules import DualPerspectiveCrop, DualPerspectiveEnhancement
    >>> crops = DualPerspectiveCrop(grid=(2, 2), tile_size=32)(torch.rand(1, 3, 100, 60))
    >>> crops.local.shape, crops.offsets
    (torch.Size([4, 3, 32, 32]), [0])
    >>> DualPerspectiveEnhancement(64, heads=2).num_tokens((2, 2), (4, 4))
    16
"""

from .crop import LocalCrop, Recombine, StrideGlobalCrop
from .dem import DualPerspectiveEnhancement
from .dual_crop import DualCrops, DualPerspectiveCrop
from .dual_front_end import DualFrontEnd
from .frontend import FrontEnd, ViewPlan
from .fusion import Fusion
from .projector import build_projector

__all__ = [
    "LocalCrop",
    "StrideGlobalCrop",
    "Recombine",
    "DualPerspectiveCrop",
    "DualCrops",
    "DualPerspectiveEnhancement",
    "FrontEnd",
    "ViewPlan",
    "DualFrontEnd",
    "Fusion",
    "build_projector",
]
