"""Released checkpoints: converters from published models' weights to hrperc's modules.

One module per released model: :mod:`hrperc.pretrained.inf_llava` (the DEM and the projector of
INF-LLaVA; its facts are in ``docs/released.md``).

Example::

    >>> from hrperc.pretrained import inf_llava
    >>> inf_llava.load_dem("/ckpt/inf-llava-llama3-8b")      # doctest: +SKIP
"""

from . import inf_llava

__all__ = ["inf_llava"]
