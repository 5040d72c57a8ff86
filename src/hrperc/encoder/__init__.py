"""The encoder runner: :class:`HighResEncoder` runs any front end around any backbone.

* :mod:`~hrperc.encoder.runner` -- :class:`HighResEncoder`: plan -> views -> one backbone pass -> assemble -> pad.
* :mod:`~hrperc.encoder.batching` -- the backbone pass: views in chunks, one call per view shape.
* :mod:`~hrperc.encoder.output` -- :class:`EncoderOutput`, the ragged batch padded once, the stage clock.
"""

from ..modules.dem import default_heads  # noqa: F401 - its old home, kept importable
from .output import EncoderOutput
from .runner import HighResEncoder, SubimageFeatures, TokenSegment

__all__ = ["HighResEncoder", "EncoderOutput", "SubimageFeatures", "TokenSegment"]
