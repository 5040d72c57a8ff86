"""INF-LLaVA's released checkpoint: its DEM and projector key maps, and loaders that refuse a misfit.

The released model stores the DEM under ``spatial_embed.`` and the projector under ``mm_projector.``
(usually behind an outer prefix such as ``model.``); the key names and the options the weights fix
are listed in ``docs/released.md``. This module converts between those names and hrperc's modules:

* :func:`load_dem` -- a :class:`~hrperc.DualPerspectiveEnhancement` in the released configuration
  with the released weights (``D`` read from them; ``heads``, 8 as released, cannot be).
* :func:`load_projector` -- the ``mlp2x_gelu`` projector (``mm_projector.{0,2}.{weight,bias}``).
* :func:`released_state_dict` -- a DEM's weights under the released names (to export, or to test).

Each accepts a state dict, a weight file (safetensors, or a torch file read with
``weights_only=True`` unless ``allow_pickle=True``) or a directory of checkpoint shards, of which
only the shards holding the wanted keys are read.

Example::

    >>> import torch, hrperc
    >>> from hrperc.pretrained.inf_llava import load_dem, released_state_dict
    >>> src = hrperc.DualPerspectiveEnhancement(64, heads=2)
    >>> ckpt = {"model.spatial_embed." + k: v for k, v in released_state_dict(src).items()}
    >>> dem = load_dem(ckpt, heads=2)
    >>> torch.equal(dem.attention.linears[0].weight, src.attention.linears[0].weight)
    True
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..modules.dem import DualPerspectiveEnhancement
from ..modules.projector import build_projector
from ._io import check_state_dict, load_state_dict, select_prefixed

__all__ = ["load_dem", "load_projector", "released_state_dict", "DEM_PREFIX", "PROJECTOR_PREFIX", "RELEASED_OPTIONS"]

#: Marker of the DEM's keys in a released checkpoint (any outer prefix before it is accepted).
DEM_PREFIX = "spatial_embed."
#: Marker of the projector's keys.
PROJECTOR_PREFIX = "mm_projector."
#: Options the released DEM weights fix (:func:`load_dem` refuses to override them), with their values.
RELEASED_OPTIONS = {
    "pairing": "released", "shared_attention": True, "residual_norm": True, "directions": "both", "fusion": "released",
}  # fmt: skip
_DOCS = "docs/released.md lists the released keys"
# The released fusion's sub-modules sit at the DEM's top level; hrperc keeps them in `fusion.`.
_FUSION_KEYS = ("ffn_crop", "ffn_stride", "ln_fuse")


def _to_released(key: str) -> str:
    return key[len("fusion.") :] if key.startswith("fusion.") else key


def _from_released(key: str) -> str:
    return "fusion." + key if key.split(".")[0] in _FUSION_KEYS else key


def load_dem(source, *, heads: int = 8, allow_pickle: bool = False, device=None, dtype=None,
             **overrides) -> DualPerspectiveEnhancement:  # fmt: skip
    """Build the released DEM and load INF-LLaVA weights (``spatial_embed.*`` keys).

    ``source``: a state dict, a weight file or a directory of shards. Keys may carry any prefix ending
    in ``spatial_embed.`` (``model.spatial_embed.attention.linears.0.weight``); when such keys exist,
    every other key (LLM, projector, ViT) is ignored. Without that prefix the dict must hold exactly
    the DEM keys. ``D`` is read from the weights; ``heads`` (8 as released) cannot be and is an
    argument. ``overrides`` change options the weights do not fix (e.g. ``skip_unread=False``).

    Example::

        >>> dem = load_dem("/ckpt/inf-llava-llama3-8b")                    # doctest: +SKIP
        >>> dem.dim, dem.heads                                              # doctest: +SKIP
        (1024, 8)
    """
    fn = "load_dem"
    for bad, fixed in RELEASED_OPTIONS.items():
        if bad in overrides:
            raise ValueError(
                f"{fn}: {bad}={overrides[bad]!r} was passed, but {bad}= cannot be overridden: the released weights "
                f"were trained with {bad}={fixed!r}. Drop {bad}= to load them; for another {bad}, build "
                f"DualPerspectiveEnhancement(dim, heads, {bad}=...) and train it or load weights of that layout."
            )
    sd = _load_part(source, DEM_PREFIX, allow_pickle, fn)
    w = sd.get("attention.linears.0.weight")
    if w is None or w.ndim != 2:
        raise ValueError(
            f"{fn}: no 'spatial_embed.attention.linears.0.weight' (2-D) in the weights; found keys "
            f"{sorted(sd)[:8]}. Is this an INF-LLaVA checkpoint ({_DOCS})?"
        )
    dem = DualPerspectiveEnhancement(w.shape[1], heads, device=device, dtype=dtype, **overrides)
    names = {k: _to_released(k) for k in dem.state_dict()}  # messages use the checkpoint's names
    check_state_dict(
        sd, {names[k]: v.shape for k, v in dem.state_dict().items()}, fn,
        hint=f"Keys are relative to 'spatial_embed.'; {_DOCS}.",
    )  # fmt: skip
    dem.load_state_dict({_from_released(k): v for k, v in sd.items()}, strict=True)
    return dem


def released_state_dict(dem: DualPerspectiveEnhancement) -> dict[str, torch.Tensor]:
    """``dem``'s weights under the released key names (without the ``spatial_embed.`` prefix).

    Only for the released configuration (shared attention, released fusion, both directions).

    Example::

        >>> sorted(released_state_dict(DualPerspectiveEnhancement(32, 2)))[:2]
        ['attention.linears.0.bias', 'attention.linears.0.weight']
    """
    if not (dem.shared_attention and dem.fusion.mode == "released" and dem.directions == "both"):
        raise ValueError(
            "released_state_dict: only the released configuration (shared_attention=True, fusion='released', "
            f"directions='both') has released key names; this module is {dem.extra_repr()}."
        )
    return {_to_released(k): v for k, v in dem.state_dict().items()}


def load_projector(source, *, allow_pickle: bool = False, device=None, dtype=None) -> nn.Module:
    """Build INF-LLaVA's ``mlp2x_gelu`` projector from ``mm_projector.{0,2}.{weight,bias}`` and load it.

    ``source`` as in :func:`load_dem`; keys may carry any prefix ending in ``mm_projector.``; other keys
    of a full checkpoint are then ignored. Sizes are read from the weights (1024 -> 4096 as released).

    Example::

        >>> sd = {"model.mm_projector.0.weight": torch.randn(32, 16), "model.mm_projector.0.bias": torch.zeros(32),
        ...       "model.mm_projector.2.weight": torch.randn(32, 32), "model.mm_projector.2.bias": torch.zeros(32)}
        >>> load_projector(sd)(torch.randn(1, 5, 16)).shape
        torch.Size([1, 5, 32])
    """
    fn = "load_projector"
    sd = _load_part(source, PROJECTOR_PREFIX, allow_pickle, fn)
    w0 = sd.get("0.weight")
    if w0 is None or w0.ndim != 2:
        raise ValueError(
            f"{fn}: no 'mm_projector.0.weight' (2-D) in the weights; found keys {sorted(sd)[:8]}. Expected "
            f"mm_projector.{{0,2}}.{{weight,bias}} (LLaVA mlp2x_gelu; {_DOCS})."
        )
    proj = build_projector("mlp2x_gelu", w0.shape[1], w0.shape[0], device=device, dtype=dtype)
    check_state_dict(sd, {k: v.shape for k, v in proj.state_dict().items()}, fn)
    proj.load_state_dict(sd, strict=True)
    return proj


def _load_part(source, marker: str, allow_pickle: bool, fn: str) -> dict[str, torch.Tensor]:
    """The keys of one submodule (``marker`` and everything before it removed). From files and shard
    directories only the tensors under ``marker`` are read; a file without any (a bare submodule
    state dict) is read whole."""
    if isinstance(source, Mapping):
        return select_prefixed(load_state_dict(source, fn=fn), marker, fn)
    sd = load_state_dict(source, allow_pickle=allow_pickle, fn=fn, keep=lambda k: marker in k)
    if not sd:
        sd = load_state_dict(source, allow_pickle=allow_pickle, fn=fn)
    return select_prefixed(sd, marker, fn)
