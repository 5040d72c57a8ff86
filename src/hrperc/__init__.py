"""hrperc: high-resolution perception modules for multimodal LLMs (INF-LLaVA and friends).

Pipeline, one module per stage: crop -> encode -> recombine -> enhance -> reduce -> project.
"""

from .attention import (
    WindowCrossAttention,
    attention_backend,
    available_backends,
    register_backend,
    window_attention,
    window_cross_attention,
)
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
from .dem import DualPerspectiveEnhancement
from .dual_crop import CropGeometry, DualCrops, DualPerspectiveCrop, candidate_grids, select_grid
from .encoder import EncoderOutput, HighResEncoder, TokenSegment
from .fusion import Fusion
from .kernels import HAS_TRITON, triton_window_attention  # also registers the "triton" attention backend
from .projector import build_projector, load_inf_llava_projector
from .reduction import reduce_tokens, reduction_footprint

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
    # drop-in high-resolution encoder
    "HighResEncoder",
    "EncoderOutput",
    "TokenSegment",
    # fused Triton kernel (lazy: triton is imported on first use)
    "kernels",
    "HAS_TRITON",
    "triton_window_attention",
    # DEM: windowed cross-attention, fusion, reduction, projector
    "window_attention",
    "window_cross_attention",
    "WindowCrossAttention",
    "attention_backend",
    "available_backends",
    "register_backend",
    "DualPerspectiveEnhancement",
    "Fusion",
    "reduce_tokens",
    "reduction_footprint",
    "build_projector",
    "load_inf_llava_projector",
]
