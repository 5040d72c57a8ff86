"""INF-LLaVA's released checkpoint: its DEM and projector key maps, and loaders that refuse a misfit.

The released model stores the DEM under ``spatial_embed.`` and the projector under ``mm_projector.``
(usually behind an outer prefix such as ``model.``); the key names and the options the weights fix
are listed in ``docs/released.md``. This module converts between those names and hrperc's modules:

* :func:`load_dem` -- a :class:`~hrperc.DualPerspectiveEnhancement` in the released configuration
  with the released weights (``D`` read from them; ``heads``, 8 as released, cannot be).
* :func:`load_projector` -- the ``mlp2x_gelu`` projector (``mm_projector.{0,2}.{weight,bias}``).
* :func:`released_state_dict` -- a DEM's weights under the released names (to export, or to test).

Each accepts a state dict, a weight file (safetensors, or a torch file read with
``weights_only=True``; the format is read from the file's first bytes) or a directory of checkpoint
shards, of which only the shards holding the wanted keys are read. Wrapped checkpoints
(``{"state_dict": ...}``, ``{"model": ...}``, ``{"module": ...}``) are unwrapped.

Before any module is built, the weights are checked against limits and against each other: the
width read from the weights must be at most :data:`MAX_DEM_DIM` (projector: :data:`MAX_PROJECTOR_IN`
in, :data:`MAX_PROJECTOR_OUT` out), and every key and shape must fit a module of that width, which is
built on the ``meta`` device (no memory) for the check. A small file declaring a huge width is thus
refused without allocating the module. Reading the tensors themselves costs at most the file's size.
Then the tensors must be floating point (integers and bools are refused, not cast) and finite (NaN and
Inf are refused). Two copies of the weights (``model.spatial_embed.*`` and ``ema.spatial_embed.*``)
are refused unless ``prefix=`` picks one. Every refusal is a ``ValueError`` naming the keys
(``TypeError`` for non-tensor entries; ``FileNotFoundError`` / ``IsADirectoryError`` for paths).

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

from .._errors import public
from ..modules.dem import DualPerspectiveEnhancement
from ..modules.projector import build_projector
from ._io import check_state_dict, list_keys, load_state_dict, select_prefixed

#: Largest DEM width ``D`` accepted from a checkpoint (the released DEM has 1024; ViT-g has 1664).
MAX_DEM_DIM = 16384
#: Largest projector input / output width accepted from a checkpoint (vision 1024, LLM 4096 as released).
MAX_PROJECTOR_IN = 16384
MAX_PROJECTOR_OUT = 32768

__all__ = [
    "load_dem",
    "load_projector",
    "released_state_dict",
    "DEM_PREFIX",
    "PROJECTOR_PREFIX",
    "RELEASED_OPTIONS",
    "MAX_DEM_DIM",
    "MAX_PROJECTOR_IN",
    "MAX_PROJECTOR_OUT",
]

#: Marker of the DEM's keys in a released checkpoint (any outer prefix before it is accepted).
DEM_PREFIX = "spatial_embed."
#: Marker of the projector's keys.
PROJECTOR_PREFIX = "mm_projector."
#: Options the released DEM weights fix (:func:`load_dem` refuses to override them), with their values.
RELEASED_OPTIONS = {
    "pairing": "released",
    "shared_attention": True,
    "residual_norm": True,
    "directions": "both",
    "fusion": "released",
}
_DOCS = "docs/released.md lists the released keys"
# The released fusion's sub-modules sit at the DEM's top level; hrperc keeps them in `fusion.`.
_FUSION_KEYS = ("ffn_crop", "ffn_stride", "ln_fuse")


def _to_released(key: str) -> str:
    return key[len("fusion.") :] if key.startswith("fusion.") else key


def _from_released(key: str) -> str:
    return "fusion." + key if key.split(".")[0] in _FUSION_KEYS else key


@public
def load_dem(
    source,
    *,
    heads: int = 8,
    allow_pickle: bool = False,
    device=None,
    dtype=None,
    prefix: str | None = None,
    **overrides,
) -> DualPerspectiveEnhancement:
    """Build the released DEM and load INF-LLaVA weights (``spatial_embed.*`` keys).

    ``source``: a state dict, a weight file or a directory of shards. Keys may carry any prefix ending
    in ``spatial_embed.`` (``model.spatial_embed.attention.linears.0.weight``); when such keys exist,
    every other key (LLM, projector, ViT) is ignored. Without that prefix the dict must hold exactly
    the DEM keys. ``D`` is read from the weights; ``heads`` (8 as released) cannot be and is an
    argument. ``overrides`` change options the weights do not fix (e.g. ``skip_unread=False``).
    ``prefix`` picks one copy when the checkpoint holds several (``prefix="ema.spatial_embed."``).
    Limits and checks: see the module docs (``D <= MAX_DEM_DIM``, shapes built on ``meta`` first).

    Example::

        >>> dem = load_dem("/ckpt/inf-llava-llama3-8b")                    # doctest: +SKIP
        >>> dem.dim, dem.heads                                              # doctest: +SKIP
        (1024, 8)
    """
    for bad, fixed in RELEASED_OPTIONS.items():
        if bad in overrides:
            raise ValueError(
                f"{bad}={overrides[bad]!r} was passed, but {bad}= cannot be overridden: the released weights "
                f"were trained with {bad}={fixed!r}. Drop {bad}= to load them; for another {bad}, build "
                f"DualPerspectiveEnhancement(dim, heads, {bad}=...) and train it or load weights of that layout."
            )
    sd = _load_part(source, DEM_PREFIX, allow_pickle, prefix)
    w = sd.get("attention.linears.0.weight")
    if w is None or w.ndim != 2:
        raise ValueError(
            f"no 'spatial_embed.attention.linears.0.weight' (2-D) in the weights; found keys "
            f"{sorted(sd)[:8]}. Is this an INF-LLaVA checkpoint ({_DOCS})?"
        )
    dim = w.shape[1]
    if not 1 <= dim <= MAX_DEM_DIM:
        raise ValueError(
            f"'spatial_embed.attention.linears.0.weight' has shape {tuple(w.shape)}, declaring a DEM of width "
            f"D={dim}; the limit is {MAX_DEM_DIM} (the released DEM has 1024). Check that this is an INF-LLaVA "
            "checkpoint, not a corrupt or hostile file; build DualPerspectiveEnhancement(dim, heads) yourself for a "
            "wider one."
        )
    if isinstance(heads, int) and not isinstance(heads, bool) and heads > 0 and dim % heads:
        raise ValueError(
            f"the weights give D={dim} ('spatial_embed.attention.linears.0.weight' {tuple(w.shape)}), which "
            f"heads={heads} does not divide. Pass the heads the checkpoint was trained with (8 as released)."
        )
    # the expected keys and shapes from a module on the meta device: no memory until the weights fit
    shape_of = DualPerspectiveEnhancement(dim, heads, device="meta", **overrides).state_dict()
    check_state_dict(
        sd,
        {_to_released(k): v.shape for k, v in shape_of.items()},  # messages use the checkpoint's names
        hint=f"Keys are relative to 'spatial_embed.'; {_DOCS}.",
    )
    dem = DualPerspectiveEnhancement(dim, heads, device=device, dtype=dtype, **overrides)
    dem.load_state_dict({_from_released(k): v for k, v in sd.items()}, strict=True)
    return dem


@public
def released_state_dict(dem: DualPerspectiveEnhancement) -> dict[str, torch.Tensor]:
    """``dem``'s weights under the released key names (without the ``spatial_embed.`` prefix).

    Only for the released configuration (shared attention, released fusion, both directions).

    Example::

        >>> sorted(released_state_dict(DualPerspectiveEnhancement(32, 2)))[:2]
        ['attention.linears.0.bias', 'attention.linears.0.weight']
    """
    if not (dem.shared_attention and dem.fusion.mode == "released" and dem.directions == "both"):
        raise ValueError(
            "only the released configuration (shared_attention=True, fusion='released', "
            f"directions='both') has released key names; this module is {dem.extra_repr()}."
        )
    return {_to_released(k): v for k, v in dem.state_dict().items()}


@public
def load_projector(
    source, *, allow_pickle: bool = False, device=None, dtype=None, prefix: str | None = None
) -> nn.Module:
    """Build INF-LLaVA's ``mlp2x_gelu`` projector from ``mm_projector.{0,2}.{weight,bias}`` and load it.

    ``source`` as in :func:`load_dem`; keys may carry any prefix ending in ``mm_projector.``; other keys
    of a full checkpoint are then ignored. Sizes are read from the weights (1024 -> 4096 as released),
    at most ``MAX_PROJECTOR_IN`` -> ``MAX_PROJECTOR_OUT``; ``prefix`` picks one copy of several.

    Example::

        >>> sd = {"model.mm_projector.0.weight": torch.randn(32, 16), "model.mm_projector.0.bias": torch.zeros(32),
        ...       "model.mm_projector.2.weight": torch.randn(32, 32), "model.mm_projector.2.bias": torch.zeros(32)}
        >>> load_projector(sd)(torch.randn(1, 5, 16)).shape
        torch.Size([1, 5, 32])
    """
    sd = _load_part(source, PROJECTOR_PREFIX, allow_pickle, prefix)
    w0 = sd.get("0.weight")
    if w0 is None or w0.ndim != 2:
        raise ValueError(
            f"no 'mm_projector.0.weight' (2-D) in the weights; found keys {sorted(sd)[:8]}. Expected "
            f"mm_projector.{{0,2}}.{{weight,bias}} (LLaVA mlp2x_gelu; {_DOCS})."
        )
    out_dim, in_dim = w0.shape
    if not (1 <= in_dim <= MAX_PROJECTOR_IN and 1 <= out_dim <= MAX_PROJECTOR_OUT):
        raise ValueError(
            f"'mm_projector.0.weight' has shape {tuple(w0.shape)}, declaring a projector {in_dim} -> {out_dim}; "
            f"the limits are {MAX_PROJECTOR_IN} in and {MAX_PROJECTOR_OUT} out (released: 1024 -> 4096). Check that "
            "this is a LLaVA checkpoint, not a corrupt or hostile file; use build_projector yourself for a wider one."
        )
    shape_of = build_projector("mlp2x_gelu", in_dim, out_dim, device="meta").state_dict()
    check_state_dict(sd, {k: v.shape for k, v in shape_of.items()})
    proj = build_projector("mlp2x_gelu", in_dim, out_dim, device=device, dtype=dtype)
    proj.load_state_dict(sd, strict=True)
    return proj


def _load_part(source, marker: str, allow_pickle: bool, prefix: str | None = None) -> dict[str, torch.Tensor]:
    """The keys of one submodule (``marker`` and everything before it removed). From files and shard
    directories only the tensors under ``marker`` are read; a file without any (a bare submodule
    state dict) is read whole."""
    if isinstance(source, Mapping):
        return select_prefixed(load_state_dict(source), marker, prefix=prefix)
    sd = load_state_dict(source, allow_pickle=allow_pickle, keep=lambda k: marker in k)
    if not sd and prefix is None:
        # a bare submodule state dict, or a checkpoint without this submodule: when the keys can be listed
        # without loading (safetensors headers, shard indexes), refuse the latter before reading any tensor
        keys = list_keys(source)
        if keys is not None and not any(_bare_key(k, marker) for k in keys):
            raise ValueError(
                f"{str(source)!r} holds no {marker!r} weights ({len(keys)} keys, e.g. {keys[:5]}). Is this the "
                f"checkpoint of the model that has them? Pass the INF-LLaVA checkpoint ({_DOCS})."
            )
        sd = load_state_dict(source, allow_pickle=allow_pickle)
    return select_prefixed(sd, marker, prefix=prefix)


def _bare_key(key: str, marker: str) -> bool:
    """Whether ``key`` can be a key of the bare submodule (no prefix): its first part is one of the submodule's."""
    head = key.split(".")[0]
    return head.isdigit() if marker == PROJECTOR_PREFIX else head in ("attention", "fusion", *_FUSION_KEYS)
