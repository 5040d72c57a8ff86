"""Pure tensor operations: no parameters, no ``nn.Module``; everything else in hrperc builds on them.

=============================  ================================================================
:mod:`~hrperc.ops.geometry`    window geometry: kinds and orders, tile-size inference, index maths
:mod:`~hrperc.ops.crop`        local / strided crops and their exact merges (three layouts),
                               the direct permutation between window orders
:mod:`~hrperc.ops.canvas`      grid selection, the :class:`CropGeometry` record, resize and pad
:mod:`~hrperc.ops.anyres`      LLaVA-NeXT's anyres geometry: best resolution, unpadding, token count
:mod:`~hrperc.ops.reduce`      token reduction (bilinear / avg / area / none) and its exact footprint
:mod:`~hrperc.ops.dem_plan`    the DEM's index plan: what its skipping path reads
:mod:`~hrperc.ops.pixels`      images (tensors, PIL) as float RGB in ``[0, 1]``
=============================  ================================================================

Example::

    >>> import torch
    >>> from hrperc import ops
    >>> x = torch.randn(1, 3, 6, 6)
    >>> torch.equal(ops.merge(ops.crop(x, (2, 3), "strided"), (2, 3), "strided"), x)
    True
"""

from .canvas import CropGeometry, candidate_grids, place_on_canvas, resize_image, select_grid
from .crop import crop, local_crop, local_merge, merge, permute_windows, stride_crop, stride_merge, window_permutation
from .geometry import ORDERS, WINDOW_KINDS, infer_tile_size
from .pixels import to_pixels
from .reduce import reduce_tokens, reduction_footprint

__all__ = [
    "crop",
    "merge",
    "local_crop",
    "stride_crop",
    "local_merge",
    "stride_merge",
    "window_permutation",
    "permute_windows",
    "infer_tile_size",
    "WINDOW_KINDS",
    "ORDERS",
    "CropGeometry",
    "candidate_grids",
    "select_grid",
    "resize_image",
    "place_on_canvas",
    "reduce_tokens",
    "reduction_footprint",
    "to_pixels",
]
