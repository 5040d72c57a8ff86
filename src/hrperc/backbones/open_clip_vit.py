"""open_clip ``VisionTransformer`` (``model.visual``) as a backbone, and the ``open_clip:`` family:
``create_backbone("open_clip:<config>", pretrained=<file>)`` or ``"open_clip:local-dir:<folder>"``.

Tokens come from open_clip's ``forward_intermediates(indices=[k-1], output_fmt="NLC",
intermediates_only=True, stop_early=True)``: conv patch embedding, class token, positional embedding,
``ln_pre``, then the first ``k`` residual blocks; ``ln_post`` and the projection are not applied (LLaVA
reads the un-normalized block output). Several layers (``layer=[-2, -5]``) are its ``indices`` in one such
call; ``prefix=True`` asks for the class token too (``output_extra_tokens``). The prefix-token count is
read off the positional embedding.
open_clip's tower adds a positional embedding of its native grid and cannot resample it, so the
adapter runs the native size only (``accepts``).
open_clip models whose tower is a timm trunk (``TimmModel``, e.g. SigLIP) are adapted through
:class:`~hrperc.backbones.TimmBackbone` with open_clip's preprocessing mean/std.

Loading: hrperc reads the checkpoint with its safe reader (``backbones._loading``: format from the
content, ``weights_only=True``, wrappers removed), hands the state dict to open_clip's own conversions
(the public helpers ``open_clip.load_checkpoint`` applies: third-party layouts, the old text-tower
layout, position embeddings resampled), then loads it strictly. ``local-dir:`` folders are read with
open_clip's config (``create_model(..., load_weights=False)``) and hrperc's loader; ``hf-hub:`` names are
refused (hrperc never downloads). A GELU config given OpenAI-looking weights warns that its
``-quickgelu`` twin is the one they need.

Example::

    >>> import torch, hrperc
    >>> from open_clip.transformer import VisionTransformer
    >>> vit = VisionTransformer(image_size=28, patch_size=14, width=32, layers=2, heads=2, mlp_ratio=4.0)
    >>> hrperc.backbones.OpenClipBackbone(vit).features(torch.randn(3, 3, 28, 28)).shape
    torch.Size([3, 4, 32])
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._errors import public
from ._loading import checkpoint_path, load_strict, missing_package, read_checkpoint, warn_quickgelu
from .base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, VisionBackbone, class_name
from .factory import register_family
from .timm_vit import TimmBackbone, is_timm_vit

__all__ = ["OpenClipBackbone", "is_open_clip_vit"]


def is_open_clip_vit(model) -> bool:
    try:
        from open_clip.transformer import VisionTransformer
    except ImportError:  # pragma: no cover - open_clip is a dependency
        return False
    return isinstance(model, VisionTransformer)


class OpenClipBackbone(VisionBackbone):
    """Adapter for ``open_clip.transformer.VisionTransformer``; pass ``model.visual`` or the CLIP model."""

    family = "open_clip"
    reads_layers = True

    @public(name=class_name())
    def __init__(self, model: nn.Module, layer: int = -2, mean=None, std=None, source: str | None = None) -> None:
        visual: Any = getattr(model, "visual", model)  # open_clip's attributes, not nn.Module's
        if not is_open_clip_vit(visual):
            raise TypeError(
                f"{type(visual).__name__} is not an open_clip VisionTransformer. For open_clip "
                f"models with a timm tower use hrperc.wrap_backbone(model), which adapts model.visual.trunk."
            )
        pp = getattr(visual, "preprocess_cfg", None) or {}
        gh, gw = visual.grid_size
        super().__init__(
            visual,
            image_size=visual.image_size,
            patch_size=visual.patch_size,
            hidden_size=visual.conv1.out_channels,
            num_layers=len(visual.transformer.resblocks),
            num_prefix_tokens=visual.positional_embedding.shape[0] - gh * gw,
            mean=(pp.get("mean", OPENAI_CLIP_MEAN) if mean is None else mean),
            std=(pp.get("std", OPENAI_CLIP_STD) if std is None else std),
            layer=layer,
            source=source,
        )

    def _set_grad_checkpointing(self, enable: bool) -> None:
        self.model.set_grad_checkpointing(enable)

    def _patch_tokens(self, pixels: torch.Tensor, k: int) -> torch.Tensor:
        out = self.model.forward_intermediates(
            pixels, indices=[k - 1], output_fmt="NLC", intermediates_only=True, stop_early=True
        )["image_intermediates"][0]
        # open_clip strips one prefix token (its class token); a layout with more leaves the others first.
        return out if self.num_prefix_tokens == 1 else out[:, self.num_prefix_tokens - 1 :]

    def _hidden_states(self, pixels: torch.Tensor, blocks: tuple[int, ...], prefix: bool) -> list[torch.Tensor]:
        out = self.model.forward_intermediates(
            pixels,
            indices=[k - 1 for k in blocks],
            output_fmt="NLC",
            intermediates_only=True,
            stop_early=True,
            output_extra_tokens=prefix,
        )
        tokens = out["image_intermediates"]
        if prefix:  # open_clip hands its class token back apart: the whole sequence is that token, then the rest
            return [torch.cat([c, t], dim=1) for t, c in zip(tokens, out["image_intermediates_prefix"])]
        return tokens if self.num_prefix_tokens == 1 else [t[:, self.num_prefix_tokens - 1 :] for t in tokens]


def _timm_trunk_backbone(visual, layer, mean, std, source, name) -> TimmBackbone:
    """An open_clip tower built on a timm trunk (``TimmModel``): the trunk, with open_clip's mean/std."""
    trunk = getattr(visual, "trunk", None)
    if trunk is None or not is_timm_vit(trunk):
        raise TypeError(
            f"open_clip model {name!r} has a {type(visual).__name__} image tower, which is not a ViT "
            f"hrperc can read patch tokens from. Pick a ViT config, e.g. 'open_clip:ViT-L-14-336-quickgelu'."
        )
    pp = getattr(visual, "preprocess_cfg", None) or {}
    return TimmBackbone(
        trunk,
        layer=layer,
        mean=mean if mean is not None else pp.get("mean"),
        std=std if std is not None else pp.get("std"),
        source=source,
    )


# --- the open_clip: family ---------------------------------------------------------------------------------
def _warn_quickgelu(open_clip, name: str, path: str, kwargs: dict) -> None:
    """Warn when weights go into a GELU open_clip config whose QuickGELU twin is what they most likely need:
    the only weights published for this architecture are OpenAI's, or the file name says 'openai'."""
    if kwargs.get("force_quick_gelu") or name.endswith("-quickgelu"):
        return
    twin = f"{name}-quickgelu"
    if twin not in open_clip.list_models():
        return
    if (open_clip.get_model_config(name) or {}).get("quick_gelu"):
        return
    if set(open_clip.list_pretrained_tags_by_model(name)) == {"openai"}:
        why = f"OpenAI's are the only weights published for {name!r}"
    elif "openai" in Path(path).name.lower() or "openai" in str(Path(path).parent).lower():
        why = "the path says 'openai'"
    else:
        return
    fix = f"'open_clip:{twin}' (or force_quick_gelu=True)"
    warn_quickgelu(path=path, family="open_clip", name=name, why=why, fix=fix, stacklevel=6)


def _convert(model: nn.Module, sd: dict) -> dict:
    """What ``open_clip.load_checkpoint`` does to a state dict before its ``load_state_dict``.

    open_clip has no public function that converts a state dict held in memory: ``load_checkpoint(model,
    path)`` reads the file itself, picking the reader by the file's name (a safetensors file named
    ``.bin`` fails there) and unwrapping only ``{"state_dict": ...}``. So hrperc reads the file and hands
    the dict to the public helpers ``load_checkpoint`` calls; the three small fixes it writes inline
    (scalar vs 1-d ``logit_scale`` / ``logit_bias``, a missing ``logit_bias``, stale text ``position_ids``)
    are repeated here. ``tests/test_backbones.py`` checks that the weights equal ``load_checkpoint``'s.
    """
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    try:
        from open_clip.convert import convert_state_dict  # third-party layouts (MobileCLIP)
    except ImportError:  # pragma: no cover - open_clip without that module has no such layouts
        pass
    else:
        sd = convert_state_dict(model, sd)
    if "positional_embedding" in sd and not hasattr(model, "positional_embedding"):
        sd = convert_to_custom_text_state_dict(sd)
    for key in ("logit_scale", "logit_bias"):
        param = getattr(model, key, None)
        if key in sd and param is not None and param.ndim != sd[key].ndim:
            sd[key] = sd[key].reshape(param.shape)
    if "logit_bias" not in sd and getattr(model, "logit_bias", None) is not None and "logit_scale" in sd:
        sd["logit_bias"] = torch.zeros_like(sd["logit_scale"])
    position_id_key = "text.transformer.embeddings.position_ids"
    if position_id_key in sd and not hasattr(model, position_id_key):
        del sd[position_id_key]
    resize_pos_embed(sd, model)
    resize_text_pos_embed(sd, model)
    return sd


# How open_clip's create_model('local-dir:...') picks a folder's checkpoint (a private helper of its factory,
# with no public equivalent): the first of these names, else the first file by name, safetensors first.
_FOLDER_ORDER = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.pth",
    "model.pth",
)


def _folder_checkpoint(folder: Path) -> str | None:
    files = sorted(p for ext in ("safetensors", "bin", "pth") for p in folder.glob(f"*.{ext}"))
    if not files:
        return None
    preferred = [folder / name for name in _FOLDER_ORDER if folder / name in files]
    return str(preferred[0] if preferred else sorted(files, key=lambda p: p.suffix != ".safetensors")[0])


def create(name: str, pretrained, *, layer: int, mean, std, strict: bool, **kwargs) -> VisionBackbone:
    """``create_backbone("open_clip:<name>", ...)`` (see the module docs)."""
    try:
        import open_clip
    except ImportError as e:  # pragma: no cover - open_clip is a dependency
        raise missing_package("open_clip", "open_clip_torch") from e
    what = f"open_clip model {name!r}"
    if name.startswith("hf-hub:"):
        raise ValueError(
            f"'open_clip:{name}' would download from the Hugging Face hub; hrperc only loads local files. "
            f"Download the repo yourself and pass 'open_clip:local-dir:<folder>'."
        )
    if name.startswith("local-dir:"):
        folder = Path(name[len("local-dir:") :]).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise FileNotFoundError(
                f"'open_clip:{name}' needs {folder}/open_clip_config.json plus a checkpoint "
                f"(open_clip_model.safetensors or open_clip_pytorch_model.bin) in that folder."
            )
        if "load_weights" not in inspect.signature(open_clip.create_model).parameters:  # pragma: no cover
            raise ValueError(
                f"this open_clip ({open_clip.__version__}) cannot build 'open_clip:{name}' without loading "
                "its weights itself. Use a newer open_clip_torch (pip install -U open_clip_torch)."
            )
        kwargs = {"load_weights": False, **kwargs}  # random; the checkpoint is loaded below, strictly
        if pretrained is not None:  # open_clip ignores pretrained= for schema names; honour it: this file
            path = weights = checkpoint_path(pretrained, what)
        else:
            weights = _folder_checkpoint(folder)
            if weights is None:
                raise FileNotFoundError(
                    f"'open_clip:{name}' has open_clip_config.json but no checkpoint "
                    f"(open_clip_model.safetensors or open_clip_pytorch_model.bin) in {folder}; add it, or pass "
                    f"pretrained=<file>."
                )
            path = str(folder)
    else:
        if name not in open_clip.list_models():
            close = [m for m in open_clip.list_models() if name.lower()[:6] in m.lower()][:8]
            raise ValueError(
                f"'open_clip:{name}' is not an open_clip model config. "
                f"{'Close names: ' + ', '.join(close) + '. ' if close else ''}See open_clip.list_models()."
            )
        path = weights = checkpoint_path(pretrained, what)
        if path is not None:
            _warn_quickgelu(open_clip, name, path, kwargs)
    sd = read_checkpoint(weights) if weights is not None else None  # a broken file fails before any model
    model = open_clip.create_model(name, **kwargs)  # random; the checkpoint is loaded below, strictly
    if weights is not None and sd is not None:
        if not load_strict(model, _convert(model, sd), weights, strict=strict, what=what):
            path = None  # nothing loaded: no source recorded
    visual = model.visual
    if is_open_clip_vit(visual):
        return OpenClipBackbone(visual, layer=layer, mean=mean, std=std, source=path)
    return _timm_trunk_backbone(visual, layer, mean, std, path, name)


def wrap(model: nn.Module, *, layer: int, mean, std) -> VisionBackbone | None:
    """``wrap_backbone``'s probe: an open_clip CLIP model or its ``.visual`` (a ViT, or a timm trunk), else ``None``."""
    visual = getattr(model, "visual", model)
    if is_open_clip_vit(visual):
        return OpenClipBackbone(visual, layer=layer, mean=mean, std=std)
    if hasattr(visual, "trunk") and is_timm_vit(visual.trunk):
        return _timm_trunk_backbone(visual, layer, mean, std, None, type(model).__name__)
    return None


register_family(
    "open_clip",
    create,
    wrap=wrap,
    aliases=("open-clip", "openclip"),
    usage="'open_clip:<model>'",
    supports="open_clip CLIP / VisionTransformer",
)
