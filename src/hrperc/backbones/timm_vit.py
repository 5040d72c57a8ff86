"""timm ViTs (``VisionTransformer``, ``Eva``, ... anything with ``forward_intermediates``) as a backbone,
and the ``timm:`` family: ``create_backbone("timm:<model>", pretrained=<file>)``.

Tokens come from timm's own ``forward_intermediates(indices=[k-1], output_fmt="NLC",
intermediates_only=True, stop_early=True)``, which drops the ``model.num_prefix_tokens`` class and
register tokens and stops after the requested block. Several layers (``layer=[-2, -5]``) are its
``indices`` in one such call; ``prefix=True`` asks for ``return_prefix_tokens``. Mean/std come from the
model's pretrained config.
A model built with ``dynamic_img_size=True`` resamples its position embeddings to each input, so
the adapter also runs views other than the native size (whole multiples of the patch; ``accepts``).

``timm:<model>`` builds ``timm.create_model(<model>, pretrained=False, num_classes=0, **kwargs)`` and
loads ``pretrained=`` strictly (``backbones._loading``) after timm's own conversion of the checkpoint:
the ``checkpoint_filter_fn`` of the module that defines the model (OpenAI CLIP / DINOv2 layouts,
position embeddings resampled), then the classifier keys dropped when the model has no head, as
``timm.create_model`` does. A ``vit_*_clip_*`` (GELU) config given OpenAI-looking weights warns that
``vit_*_clip_quickgelu_*`` is the one they need.

Example::

    >>> import torch, hrperc
    >>> from timm.models.vision_transformer import VisionTransformer
    >>> vit = VisionTransformer(img_size=28, patch_size=7, embed_dim=32, depth=2, num_heads=2, reg_tokens=4)
    >>> bb = hrperc.backbones.TimmBackbone(vit, layer=-1)
    >>> bb.num_prefix_tokens, bb.features(torch.randn(2, 3, 28, 28)).shape
    (5, torch.Size([2, 16, 32]))
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch
from torch import nn

from .._errors import public
from ._loading import checkpoint_path, load_strict, missing_package, read_checkpoint, warn_quickgelu
from .base import VisionBackbone, class_name
from .factory import register_family

__all__ = ["TimmBackbone", "is_timm_vit"]


def is_timm_vit(model) -> bool:
    """True for timm token ViTs: ``forward_intermediates``, ``num_prefix_tokens``, ``patch_embed``, ``blocks``."""
    return all(hasattr(model, a) for a in ("forward_intermediates", "num_prefix_tokens", "patch_embed", "blocks"))


class TimmBackbone(VisionBackbone):
    """Adapter for a timm ViT (see module docs). ``mean``/``std`` override the pretrained config's."""

    family = "timm"
    reads_layers = True

    @public(name=class_name())
    def __init__(self, model: nn.Module, layer: int = -2, mean=None, std=None, source: str | None = None) -> None:
        if not is_timm_vit(model):
            raise TypeError(
                f"{type(model).__name__} is not a timm token ViT (needs forward_intermediates, "
                f"num_prefix_tokens, patch_embed and blocks, like timm's VisionTransformer or Eva)."
            )
        from timm.data import resolve_model_data_config

        vit: Any = model  # timm's attributes, not nn.Module's
        cfg = resolve_model_data_config(vit)
        patch = tuple(vit.patch_embed.patch_size)
        size = tuple(vit.patch_embed.img_size) if vit.patch_embed.img_size is not None else cfg["input_size"][1:]
        super().__init__(
            model,
            image_size=size,
            patch_size=patch,
            hidden_size=getattr(vit, "embed_dim", None) or vit.num_features,
            num_layers=len(vit.blocks),
            num_prefix_tokens=vit.num_prefix_tokens,
            mean=cfg["mean"] if mean is None else mean,
            std=cfg["std"] if std is None else std,
            layer=layer,
            source=source,
        )
        self.dynamic_size = bool(getattr(model, "dynamic_img_size", False))

    def _set_grad_checkpointing(self, enable: bool) -> None:
        self.model.set_grad_checkpointing(enable)

    def _patch_tokens(self, pixels: torch.Tensor, k: int) -> torch.Tensor:
        out = self.model.forward_intermediates(
            pixels, indices=[k - 1], output_fmt="NLC", intermediates_only=True, stop_early=True, norm=False
        )
        return out[0]

    def _hidden_states(self, pixels: torch.Tensor, blocks: tuple[int, ...], prefix: bool) -> list[torch.Tensor]:
        indices = [k - 1 for k in blocks]
        kw = dict(output_fmt="NLC", intermediates_only=True, stop_early=True, norm=False)
        if not (prefix and self.num_prefix_tokens):
            return list(self.model.forward_intermediates(pixels, indices=indices, **kw))
        if "return_prefix_tokens" not in inspect.signature(self.model.forward_intermediates).parameters:
            raise ValueError(
                f"prefix=True: this timm {type(self.model).__name__} cannot return its prefix tokens "
                f"(forward_intermediates has no return_prefix_tokens). Use prefix=False (the patch tokens), or a "
                f"timm VisionTransformer."
            )
        out = self.model.forward_intermediates(pixels, indices=indices, return_prefix_tokens=True, **kw)
        return [torch.cat([p, t], dim=1) for t, p in out]  # timm hands back (patches, prefix) pairs


# --- the timm: family --------------------------------------------------------------------------------------
def _warn_quickgelu(timm, name: str, path: str) -> None:
    """timm: ``vit_*_clip_*`` is GELU, ``vit_*_clip_quickgelu_*`` QuickGELU; warn for OpenAI-looking weights."""
    arch, _, tag = name.partition(".")
    if "_clip_" not in arch or "quickgelu" in arch:
        return
    twin = arch.replace("_clip_", "_clip_quickgelu_", 1)
    if not timm.is_model(twin):
        return
    if tag == "openai":
        why = "the tag '.openai' names OpenAI's weights"
    elif "openai" in str(path).lower():
        why = "the path says 'openai'"
    else:
        return
    warn_quickgelu(path=path, family="timm", name=name, why=why, fix=f"'timm:{twin}'", stacklevel=6)


def _checkpoint_filter(timm, name: str, model: nn.Module, sd: dict) -> dict:
    """timm's own conversion of a checkpoint for this model (OpenAI CLIP / DINOv2 layouts, pos-embed resampling),
    then the classifier keys dropped when the model has no such head (as ``timm.create_model`` does)."""
    # The filter is a public function of the module that registers the model; model_entrypoint is public API.
    module = importlib.import_module(timm.models.model_entrypoint(name).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            sd = filter_fn(sd, model)
        except TypeError:  # filters of one argument
            sd = filter_fn(sd)
    own = model.state_dict()
    classifiers = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    for c in (classifiers,) if isinstance(classifiers, str) else classifiers:
        for key in (f"{c}.weight", f"{c}.bias"):
            if key in sd and key not in own:
                del sd[key]
    return dict(sd)


def create(name: str, pretrained, *, layer: int, mean, std, strict: bool, **kwargs) -> TimmBackbone:
    """``create_backbone("timm:<name>", ...)`` (see the module docs)."""
    try:
        import timm
    except ImportError as e:  # pragma: no cover - timm is a dependency
        raise missing_package("timm", "timm") from e
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:12]}*")[:8]
        hint = f"Close names: {', '.join(close)}. " if close else ""
        raise ValueError(f"'timm:{name}' is not a timm model name. {hint}List them with timm.list_models('*vit*').")
    what = f"timm model {name!r}"
    path = checkpoint_path(pretrained, what)
    if path is not None:
        _warn_quickgelu(timm, name, path)
    kwargs.setdefault("num_classes", 0)  # the classifier head is never used; its weights are dropped on load
    sd = read_checkpoint(path) if path is not None else None  # a broken file fails before any model is built
    model = timm.create_model(name, pretrained=False, **kwargs)  # random; the checkpoint is loaded below, strictly
    if not is_timm_vit(model):
        raise TypeError(
            f"'timm:{name}' builds a {type(model).__name__}, not a token ViT (hrperc needs "
            f"forward_intermediates, num_prefix_tokens, patch_embed and blocks). Pick a ViT, e.g. "
            f"'timm:vit_large_patch14_clip_336'."
        )
    if path is not None and sd is not None:
        if not load_strict(model, _checkpoint_filter(timm, name, model, sd), path, strict=strict, what=what):
            path = None  # nothing loaded: no source recorded
    return TimmBackbone(model, layer=layer, mean=mean, std=std, source=path)


def wrap(model: nn.Module, *, layer: int, mean, std) -> TimmBackbone | None:
    """``wrap_backbone``'s probe: a timm token ViT, else ``None``."""
    return TimmBackbone(model, layer=layer, mean=mean, std=std) if is_timm_vit(model) else None


register_family(
    "timm",
    create,
    wrap=wrap,
    usage="'timm:<model>'",
    supports="timm VisionTransformer (and other timm ViTs with forward_intermediates)",
)
