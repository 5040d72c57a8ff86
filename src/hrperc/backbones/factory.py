"""Build a :class:`VisionBackbone` by name, from local files only, or wrap a model you already have.

Names carry the family as a prefix, like open_clip's ``hf-hub:`` / ``local-dir:`` schemas:

===========================  ===================================================================
``"timm:<model name>"``      ``timm.create_model``; ``pretrained=`` a local ``.safetensors`` /
                             ``.pth`` / ``.bin`` file (converted by timm's own checkpoint filter).
``"open_clip:<model name>"`` ``open_clip.create_model``; ``pretrained=`` a local checkpoint file.
                             OpenAI CLIP weights need the ``-quickgelu`` config, e.g.
                             ``"open_clip:ViT-L-14-336-quickgelu"`` (a warning says so when the
                             mismatch is detectable).
                             ``"open_clip:local-dir:<dir>"`` reads config and weights from a folder;
                             ``pretrained=`` a file replaces the folder's weights.
``"hf:<dir>"``               ``CLIPVisionModel`` / ``SiglipVisionModel.from_pretrained(dir,
                             local_files_only=True)``; a full CLIP/SigLIP checkpoint loads its
                             vision tower. A hub id works only if it is already in the local cache.
===========================  ===================================================================

Nothing is ever downloaded. ``pretrained=None`` gives random weights (``backbone.source is None``).

Loading is strict. A timm or open_clip checkpoint is read by hrperc's own safe reader (the format from the
file's first bytes; torch files with ``weights_only=True``; ``{"state_dict": ...}`` / ``{"model": ...}`` /
``{"module": ...}`` wrappers and a ``module.`` key prefix removed), converted by the family's own
checkpoint filter (timm's ``checkpoint_filter_fn``, open_clip's ``load_checkpoint`` conversions), and
must then fit the model exactly: missing keys, unexpected keys, shape mismatches, integer weights for
float parameters and tensors holding NaN / Inf are listed in one ``ValueError`` naming the file. (A
timm classifier head the model does not have, ``num_classes=0`` by default, is dropped as timm drops
it.) ``strict=False`` loads the keys that fit and warns (``UserWarning``) listing what stayed random.
``hf:`` raises the same way when transformers reports missing, mismatched or unexpected keys (the
text tower and heads of a full CLIP / SigLIP checkpoint are expected and ignored). ``backbone.source``
records the file only when weights were loaded.

The families: this module holds only the registry and the name parsing. Each family module
(``timm_vit``, ``open_clip_vit``, ``hf_vit``) holds its adapter, its ``create`` function (checkpoint
filter, warnings) and its ``wrap`` probe, and registers them with :func:`register_family`; the strict
loading they share is ``backbones._loading``.

Example::

    >>> import hrperc
    >>> bb = hrperc.create_backbone("timm:vit_base_patch16_224")           # random weights
    >>> bb.image_size, bb.patch_size, bb.hidden_size, bb.num_prefix_tokens
    ((224, 224), (16, 16), 768, 1)
    >>> bb = hrperc.create_backbone(                                                  # doctest: +SKIP
    ...     "open_clip:ViT-L-14-336-quickgelu", pretrained="/ckpt/l14-336.bin")
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .._errors import public
from .base import VisionBackbone

__all__ = ["create_backbone", "wrap_backbone", "register_family", "BackboneFamily", "list_families"]


@dataclass(frozen=True)
class BackboneFamily:
    """One family of ViTs: how ``"<prefix>:<name>"`` is built, and how a model object of it is recognised.

    Attributes:
        prefix: the name's prefix (``"timm"``); ``aliases`` are other spellings of it (``"open-clip"``).
        create: ``create(name, pretrained, *, layer, mean, std, strict, **kwargs) -> VisionBackbone``, with
            ``name`` the part after ``"<prefix>:"``.
        wrap: ``wrap(model, *, layer, mean, std) -> VisionBackbone | None``: the adapted model, or ``None``
            when ``model`` is not of this family (:func:`wrap_backbone` asks the families in order).
        usage: the name pattern, for messages (``"'timm:<model>'"``).
        supports: the model classes ``wrap`` adapts, for messages.
    """

    prefix: str
    create: Callable[..., VisionBackbone]
    wrap: Callable[..., VisionBackbone | None] | None = None
    aliases: tuple[str, ...] = ()
    usage: str = ""
    supports: str = ""


_FAMILIES: dict[str, BackboneFamily] = {}  # every prefix and alias -> its family, in registration order


@public
def register_family(
    prefix: str,
    create: Callable[..., VisionBackbone],
    *,
    wrap: Callable[..., VisionBackbone | None] | None = None,
    aliases: tuple[str, ...] = (),
    usage: str | None = None,
    supports: str = "",
) -> BackboneFamily:
    """Make ``create_backbone("<prefix>:<name>")`` call ``create`` and :func:`wrap_backbone` try ``wrap``.

    See :class:`BackboneFamily` for the two callables. A prefix or alias already taken is refused
    (``ValueError``); families are asked by :func:`wrap_backbone` in the order they were registered.

    Example (the families hrperc registers itself)::

        >>> [(f.prefix, f.aliases) for f in list_families()]
        [('timm', ()), ('open_clip', ('open-clip', 'openclip')), ('hf', ('transformers',))]
    """
    names = (prefix, *aliases) if isinstance(aliases, tuple) else None
    if names is None or not all(isinstance(n, str) and n and ":" not in n for n in names):
        raise TypeError(
            f"prefix={prefix!r}, aliases={aliases!r}; expected a non-empty string without ':' and a tuple of "
            "such strings. Pass e.g. register_family('timm', create, aliases=('timm-vit',))."
        )
    if not callable(create) or (wrap is not None and not callable(wrap)):
        raise TypeError(
            f"create={create!r}, wrap={wrap!r}; expected functions. Pass create(name, pretrained, *, layer, "
            "mean, std, strict, **kwargs) and, optionally, wrap(model, *, layer, mean, std)."
        )
    taken = [n for n in names if n in _FAMILIES]
    if taken:
        raise ValueError(
            f"prefix {taken[0]!r} is already the '{_FAMILIES[taken[0]].prefix}' family's. Pick another prefix."
        )
    family = BackboneFamily(prefix, create, wrap, tuple(aliases), usage or f"'{prefix}:<model>'", supports)
    for n in names:
        _FAMILIES[n] = family
    return family


def list_families() -> list[BackboneFamily]:
    """The registered families, in registration order (each once, however many aliases it has)."""
    return list(dict.fromkeys(_FAMILIES.values()))


def _usage() -> str:
    usages = [f.usage for f in list_families()]
    listed = ", ".join(usages[:-1]) + " or " + usages[-1] if len(usages) > 1 else "".join(usages)
    return f"Use {listed}, e.g. 'open_clip:ViT-L-14-336-quickgelu'."


@public
def create_backbone(
    name: str, pretrained=None, layer: int = -2, mean=None, std=None, *, strict: bool = True, **kwargs
) -> VisionBackbone:
    """Build a ViT backbone by ``"family:name"`` and wrap it as a :class:`VisionBackbone` (see module docs).

    Args:
        name: ``"timm:<model>"``, ``"open_clip:<model>"`` or ``"hf:<local dir>"``.
        pretrained: a local checkpoint path (``hf:`` may also pass the folder here), or ``None`` for
            random weights. Never downloads.
        layer: default layer for ``features`` (-2: LLaVA's second-to-last block).
        mean, std: override the normalization the weights come with.
        strict: refuse (``ValueError``, naming the file, the counts and the first keys) a checkpoint whose
            keys or shapes do not fit the model exactly; ``False`` loads what fits and warns
            (``UserWarning``) listing the tensors that stayed random.
        **kwargs: forwarded to ``timm.create_model`` / ``open_clip.create_model`` / ``from_pretrained``.

    Returns: a :class:`VisionBackbone` in eval mode; its ``features((N, 3, h, w)) -> (N, ht*wt, D)``.
    """
    if not isinstance(name, str):
        raise TypeError(f"name={name!r} must be a string. {_usage()} To wrap a model object use wrap_backbone.")
    prefix, sep, model_name = name.partition(":")
    if not sep or prefix not in _FAMILIES:
        raise ValueError(f"name={name!r} has no known family prefix. {_usage()}")
    if not isinstance(strict, bool):
        raise TypeError(f"strict={strict!r} is not a bool. Pass strict=True (the default) or strict=False.")
    create = _FAMILIES[prefix].create
    return create(model_name, pretrained, layer=layer, mean=mean, std=std, strict=strict, **kwargs).eval()


@public
def wrap_backbone(model: nn.Module, layer: int = -2, mean=None, std=None) -> VisionBackbone:
    """Adapt a model object you already built to :class:`VisionBackbone`.

    Accepts a timm ViT, an open_clip CLIP model or its ``.visual`` (ViT or timm trunk), a transformers
    ``CLIPVisionModel`` / ``CLIPModel`` / ``SiglipVisionModel`` / ``SiglipModel`` / ``InternVLVisionModel``
    (also as the ``vision_tower`` of a LLaVA-family or InternVL model), or a :class:`VisionBackbone`
    (returned as is). The registered families are asked in order (timm, open_clip, hf).

    Example::

        >>> from timm.models.vision_transformer import VisionTransformer
        >>> wrap_backbone(VisionTransformer(img_size=56, patch_size=14, embed_dim=32, depth=2, num_heads=2)).grid_size
        (4, 4)
    """
    if isinstance(model, VisionBackbone):
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"model is a {type(model).__name__}; expected a torch nn.Module ViT.")
    families = list_families()
    for family in families:
        if family.wrap is not None:
            backbone = family.wrap(model, layer=layer, mean=mean, std=std)
            if backbone is not None:
                return backbone
    supported = ", ".join(f.supports for f in families if f.wrap is not None and f.supports)
    raise TypeError(f"{type(model).__name__} is not a supported model class. Supported: {supported}.")
