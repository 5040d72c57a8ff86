"""The encoder runner: :class:`HighResEncoder` runs any front end around any backbone.

* :mod:`~hrperc.encoder.runner` -- :class:`HighResEncoder`: plan -> views -> one backbone pass -> assemble -> pad.
* :mod:`~hrperc.encoder.batching` -- the backbone pass: views in chunks, one call per view shape.
* :mod:`~hrperc.encoder.output` -- :class:`EncoderOutput`, the ragged batch padded once, the stage clock.

Example::

    >>> import torch
    >>> from timm.models.vision_transformer import VisionTransformer
    >>> from hrperc.encoder import HighResEncoder
    >>> vit = VisionTransformer(img_size=28, patch_size=7, embed_dim=32, depth=2, num_heads=2)
    >>> out = HighResEncoder(vit, dem=None, combine="concat")([torch.rand(3, 60, 50), torch.rand(3, 28, 28)])
    >>> out.tokens.shape, out.num_tokens
    (torch.Size([2, 304, 32]), [304, 304])
"""

from ..modules.dem import default_heads  # noqa: F401 - its old home, kept importable
from .output import EncoderOutput
from .runner import HighResEncoder, SubimageFeatures, TokenSegment

__all__ = ["HighResEncoder", "EncoderOutput", "SubimageFeatures", "TokenSegment"]
