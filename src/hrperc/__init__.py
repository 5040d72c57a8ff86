"""hrperc: high-resolution perception modules for multimodal LLMs (INF-LLaVA and friends).

Pipeline, one module per stage: crop -> encode -> recombine -> enhance -> reduce -> project.
"""

from .backbones import VisionBackbone, create_encoder, wrap_backbone  # also binds hrperc.backbones
from .crop import (
    LocalCrop,
    Recombine,
    StrideGlobalCrop,
    crop,
    local_crop,
    local_merge,
    merge,
    permute_windows,
    stride_crop,
    stride_merge,
    window_permutation,
)
from .dual_crop import CropGeometry, DualCrops, DualPerspectiveCrop, candidate_grids, select_grid
from .kernels import HAS_TRITON, triton_window_attention  # also registers the "triton" attention backend

__version__ = "0.1.0"

__all__ = [
    "__version__",
    # crop / recombine (DCM)
    "crop",
    "merge",
    "local_crop",
    "stride_crop",
    "local_merge",
    "stride_merge",
    "window_permutation",
    "permute_windows",
    "LocalCrop",
    "StrideGlobalCrop",
    "Recombine",
    "DualPerspectiveCrop",
    "DualCrops",
    "CropGeometry",
    "select_grid",
    "candidate_grids",
    # backbones (encoder adapters)
    "backbones",
    "VisionBackbone",
    "create_encoder",
    "wrap_backbone",
    # fused Triton kernel (lazy: triton is imported on first use)
    "kernels",
    "HAS_TRITON",
    "triton_window_attention",
]
