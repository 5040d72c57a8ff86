"""The ``nn.Module`` layers, one concept per file, each a thin holder of options around :mod:`hrperc.ops`.

=============================  ================================================================
:mod:`~hrperc.modules.crop`    :class:`LocalCrop`, :class:`StrideGlobalCrop`, :class:`Recombine`
:mod:`~hrperc.modules.dual_crop`  :class:`DualPerspectiveCrop` (INF-LLaVA's DCM front door), :class:`DualCrops`
:mod:`~hrperc.modules.dem`     :class:`DualPerspectiveEnhancement` (the DEM)
:mod:`~hrperc.modules.fusion`  :class:`Fusion`: the fusions of the two enhanced maps
:mod:`~hrperc.modules.projector`  :func:`build_projector`: LLaVA's vision-to-language projectors
=============================  ================================================================

(:class:`~hrperc.WindowCrossAttention` lives with the attention backends, in :mod:`hrperc.attention`.)
"""

from .crop import LocalCrop, Recombine, StrideGlobalCrop
from .dem import DualPerspectiveEnhancement
from .dual_crop import DualCrops, DualPerspectiveCrop
from .fusion import Fusion
from .projector import build_projector

__all__ = [
    "LocalCrop",
    "StrideGlobalCrop",
    "Recombine",
    "DualPerspectiveCrop",
    "DualCrops",
    "DualPerspectiveEnhancement",
    "Fusion",
    "build_projector",
]
