"""Build a :class:`VisionBackbone` by name, from local files only, or wrap a model you already have.

Names carry the family as a prefix, like open_clip's ``hf-hub:`` / ``local-dir:`` schemas:

===========================  ===================================================================
``"timm:<model name>"``      ``timm.create_model``; ``pretrained=`` a local ``.safetensors`` /
                             ``.pth`` / ``.bin`` file (loaded through timm's own checkpoint filters).
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

Example::

    >>> import hrperc
    >>> bb = hrperc.create_backbone("timm:vit_base_patch16_224")           # random weights
    >>> bb.image_size, bb.patch_size, bb.hidden_size, bb.num_prefix_tokens
    ((224, 224), (16, 16), 768, 1)
    >>> bb = hrperc.create_backbone(                                                  # doctest: +SKIP
    ...     "open_clip:ViT-L-14-336-quickgelu", pretrained="/ckpt/l14-336.bin")
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from torch import nn

from .base import VisionBackbone
from .hf_vit import HFBackbone, hf_vision_transformer
from .open_clip_vit import OpenClipBackbone, is_open_clip_vit
from .timm_vit import TimmBackbone, is_timm_vit

__all__ = ["create_backbone", "wrap_backbone"]

_FAMILIES = {
    "timm": "timm",
    "open_clip": "open_clip",
    "open-clip": "open_clip",
    "openclip": "open_clip",
    "hf": "hf",
    "transformers": "hf",
}
_USAGE = "Use 'timm:<model>', 'open_clip:<model>' or 'hf:<local dir>', e.g. 'open_clip:ViT-L-14-336-quickgelu'."


def _missing(package: str, pip: str, fn: str) -> ImportError:
    return ImportError(
        f"{fn}: this backbone needs the '{package}' package, which is not installed. Run: pip install {pip}"
    )


def _check_file(pretrained, fn: str, what: str) -> str | None:
    if pretrained is None:
        return None
    if not isinstance(pretrained, (str, os.PathLike)):
        raise TypeError(f"{fn}: pretrained={pretrained!r}; expected None or a local file path (str or Path).")
    path = Path(pretrained).expanduser()
    if path.is_dir():
        for name in (
            "open_clip_model.safetensors",
            "model.safetensors",
            "open_clip_pytorch_model.bin",
            "pytorch_model.bin",
            "model.pth",
        ):
            if (path / name).is_file():
                return str(path / name)
        raise FileNotFoundError(
            f"{fn}: pretrained={str(pretrained)!r} is a folder without a checkpoint (model.safetensors, "
            f"pytorch_model.bin, ...). Point pretrained= at the weights file of {what}."
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"{fn}: pretrained={str(pretrained)!r} does not exist. hrperc never downloads weights: fetch the "
            f"checkpoint of {what} yourself (e.g. `huggingface-cli download <repo> --local-dir DIR`) and pass "
            f"its local path, or pretrained=None for random weights."
        )
    return str(path)


_QUICKGELU_MSG = (
    "{fn}: loading {path!r} into {family} config {name!r}, which uses GELU, but {why}. OpenAI's CLIP "
    "weights (what LLaVA and INF-LLaVA use) were trained with QuickGELU and give wrong features under GELU: "
    "use {fix} instead. Ignore this if the weights really were trained with GELU."
)


def _warn_quickgelu_open_clip(open_clip, name: str, path: str | None, kw: dict) -> None:
    """Warn when weights go into a GELU open_clip config whose QuickGELU twin is what they most likely need:
    the only weights published for this architecture are OpenAI's, or the file name says 'openai'."""
    if path is None or kw.get("force_quick_gelu") or name.endswith("-quickgelu"):
        return
    twin = f"{name}-quickgelu"
    if twin not in open_clip.list_models():
        return
    cfg = open_clip.get_model_config(name) or {}
    if cfg.get("quick_gelu"):
        return
    tags = set(open_clip.list_pretrained_tags_by_model(name))
    if tags == {"openai"}:
        why = f"OpenAI's are the only weights published for {name!r}"
    elif "openai" in Path(path).name.lower() or "openai" in str(Path(path).parent).lower():
        why = "the path says 'openai'"
    else:
        return
    fix = f"'open_clip:{twin}' (or force_quick_gelu=True)"
    warnings.warn(
        _QUICKGELU_MSG.format(fn="create_backbone", path=path, family="open_clip", name=name, why=why, fix=fix),
        UserWarning,
        stacklevel=4,
    )


def _warn_quickgelu_timm(timm, name: str, path: str | None) -> None:
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
    warnings.warn(
        _QUICKGELU_MSG.format(fn="create_backbone", path=path, family="timm", name=name, why=why, fix=f"'timm:{twin}'"),
        UserWarning,
        stacklevel=4,
    )


def _create_timm(name: str, pretrained, layer: int, mean, std, kw) -> VisionBackbone:
    fn = "create_backbone"
    try:
        import timm
    except ImportError as e:  # pragma: no cover - timm is a dependency
        raise _missing("timm", "timm", fn) from e
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:12]}*")[:8]
        hint = f"Close names: {', '.join(close)}. " if close else ""
        raise ValueError(
            f"{fn}: 'timm:{name}' is not a timm model name. {hint}List them with timm.list_models('*vit*')."
        )
    path = _check_file(pretrained, fn, f"timm model {name!r}")
    if path is not None:
        _warn_quickgelu_timm(timm, name, path)
    kw.setdefault("num_classes", 0)  # the classifier head is never used; its weights are dropped on load
    if path is not None:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": path}, **kw)
    else:
        model = timm.create_model(name, pretrained=False, **kw)
    if not is_timm_vit(model):
        raise TypeError(
            f"{fn}: 'timm:{name}' builds a {type(model).__name__}, not a token ViT (hrperc needs "
            f"forward_intermediates, num_prefix_tokens, patch_embed and blocks). Pick a ViT, e.g. "
            f"'timm:vit_large_patch14_clip_336'."
        )
    return TimmBackbone(model, layer=layer, mean=mean, std=std, source=path)


def _create_open_clip(name: str, pretrained, layer: int, mean, std, kw) -> VisionBackbone:
    fn = "create_backbone"
    try:
        import open_clip
    except ImportError as e:  # pragma: no cover - open_clip is a dependency
        raise _missing("open_clip", "open_clip_torch", fn) from e
    if name.startswith("hf-hub:"):
        raise ValueError(
            f"{fn}: 'open_clip:{name}' would download from the Hugging Face hub; hrperc only loads local files. "
            f"Download the repo yourself and pass 'open_clip:local-dir:<folder>'."
        )
    if name.startswith("local-dir:"):
        folder = Path(name[len("local-dir:") :]).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise FileNotFoundError(
                f"{fn}: 'open_clip:{name}' needs {folder}/open_clip_config.json plus a checkpoint "
                f"(open_clip_model.safetensors or open_clip_pytorch_model.bin) in that folder."
            )
        if pretrained is not None:
            # open_clip ignores pretrained= for schema names; honour it: the folder's config, this file.
            path = _check_file(pretrained, fn, f"open_clip model {name!r}")
            import inspect

            if "load_weights" in inspect.signature(open_clip.create_model).parameters:
                kw = {"load_weights": False, **kw}  # the folder's own checkpoint is not read
            model = open_clip.create_model(name, **kw)
            open_clip.load_checkpoint(model, path)
        else:
            if not any(any(folder.glob(f"*.{ext}")) for ext in ("safetensors", "bin", "pth")):
                raise FileNotFoundError(
                    f"{fn}: 'open_clip:{name}' has open_clip_config.json but no checkpoint "
                    f"(open_clip_model.safetensors or open_clip_pytorch_model.bin) in {folder}; add it, or pass "
                    f"pretrained=<file>."
                )
            path = str(folder)
            model = open_clip.create_model(name, **kw)
    else:
        if name not in open_clip.list_models():
            close = [m for m in open_clip.list_models() if name.lower()[:6] in m.lower()][:8]
            raise ValueError(
                f"{fn}: 'open_clip:{name}' is not an open_clip model config. "
                f"{'Close names: ' + ', '.join(close) + '. ' if close else ''}See open_clip.list_models()."
            )
        path = _check_file(pretrained, fn, f"open_clip model {name!r}")
        _warn_quickgelu_open_clip(open_clip, name, path, kw)
        model = open_clip.create_model(name, pretrained=path, **kw)
    visual = model.visual
    if is_open_clip_vit(visual):
        return OpenClipBackbone(visual, layer=layer, mean=mean, std=std, source=path)
    return _wrap_open_clip_timm(visual, layer, mean, std, path, fn, name)


def _wrap_open_clip_timm(visual, layer, mean, std, source, fn, name) -> VisionBackbone:
    trunk = getattr(visual, "trunk", None)
    if trunk is None or not is_timm_vit(trunk):
        raise TypeError(
            f"{fn}: open_clip model {name!r} has a {type(visual).__name__} image tower, which is not a ViT "
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


def _read_preprocessor(folder: Path):
    cfg = folder / "preprocessor_config.json"
    if not cfg.is_file():
        return None, None
    data = json.loads(cfg.read_text())
    return data.get("image_mean"), data.get("image_std")


def _create_hf(name: str, pretrained, layer: int, mean, std, kw) -> VisionBackbone:
    fn = "create_backbone"
    try:
        import transformers
    except ImportError as e:
        raise _missing("transformers", "'hrperc[hf]' (or: pip install transformers)", fn) from e
    where = pretrained if pretrained is not None else name
    if not where:
        raise ValueError(f"{fn}: 'hf:' needs a local folder, e.g. 'hf:/models/clip-vit-large-patch14-336'.")
    folder = Path(str(where)).expanduser()
    try:
        config = transformers.AutoConfig.from_pretrained(str(where), local_files_only=True)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"{fn}: no Hugging Face model at {str(where)!r} (needs config.json and model.safetensors from "
            f"save_pretrained). hrperc never downloads: run `huggingface-cli download <repo> --local-dir DIR` "
            f"and pass 'hf:DIR'."
        ) from e
    classes = {
        "clip": "CLIPVisionModel",
        "clip_vision_model": "CLIPVisionModel",
        "siglip": "SiglipVisionModel",
        "siglip_vision_model": "SiglipVisionModel",
    }
    cls_name = classes.get(config.model_type)
    if cls_name is None:
        raise TypeError(
            f"{fn}: {str(where)!r} holds a '{config.model_type}' model; hrperc's Hugging Face adapter supports "
            f"CLIP and SigLIP vision towers ({', '.join(sorted(classes))}). Wrap other ViTs through timm."
        )
    model = getattr(transformers, cls_name).from_pretrained(str(where), local_files_only=True, **kw)
    file_mean, file_std = _read_preprocessor(folder) if folder.is_dir() else (None, None)
    return HFBackbone(
        model,
        layer=layer,
        mean=mean if mean is not None else file_mean,
        std=std if std is not None else file_std,
        source=str(where),
    )


def create_backbone(
    name: str, pretrained=None, layer: int = -2, mean=None, std=None, **kwargs
) -> VisionBackbone:
    """Build a ViT backbone by ``"family:name"`` and wrap it as a :class:`VisionBackbone` (see module docs).

    Args:
        name: ``"timm:<model>"``, ``"open_clip:<model>"`` or ``"hf:<local dir>"``.
        pretrained: a local checkpoint path (``hf:`` may also pass the folder here), or ``None`` for
            random weights. Never downloads.
        layer: default layer for ``features`` (-2: LLaVA's second-to-last block).
        mean, std: override the normalization the weights come with.
        **kwargs: forwarded to ``timm.create_model`` / ``open_clip.create_model`` / ``from_pretrained``.

    Returns: a :class:`VisionBackbone`; its ``features((N, 3, h, w)) -> (N, ht*wt, D)``.
    """
    fn = "create_backbone"
    if not isinstance(name, str):
        raise TypeError(
            f"{fn}: name={name!r} must be a string. {_USAGE} To wrap a model object use wrap_backbone."
        )
    family, sep, model_name = name.partition(":")
    if not sep or family not in _FAMILIES:
        raise ValueError(f"{fn}: name={name!r} has no known family prefix. {_USAGE}")
    builder = {"timm": _create_timm, "open_clip": _create_open_clip, "hf": _create_hf}[_FAMILIES[family]]
    return builder(model_name, pretrained, layer, mean, std, dict(kwargs)).eval()


def wrap_backbone(model: nn.Module, layer: int = -2, mean=None, std=None) -> VisionBackbone:
    """Adapt a model object you already built to :class:`VisionBackbone`.

    Accepts a timm ViT, an open_clip CLIP model or its ``.visual`` (ViT or timm trunk), a transformers
    ``CLIPVisionModel`` / ``CLIPModel`` / ``SiglipVisionModel`` / ``SiglipModel``, or a
    :class:`VisionBackbone` (returned as is).

    Example::

        >>> from timm.models.vision_transformer import VisionTransformer
        >>> wrap_backbone(VisionTransformer(img_size=56, patch_size=14, embed_dim=32, depth=2, num_heads=2)).grid_size
        (4, 4)
    """
    if isinstance(model, VisionBackbone):
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"wrap_backbone: model is a {type(model).__name__}; expected a torch nn.Module ViT.")
    if is_timm_vit(model):
        return TimmBackbone(model, layer=layer, mean=mean, std=std)
    visual = getattr(model, "visual", model)
    if is_open_clip_vit(visual):
        return OpenClipBackbone(visual, layer=layer, mean=mean, std=std)
    if hasattr(visual, "trunk") and is_timm_vit(visual.trunk):
        return _wrap_open_clip_timm(visual, layer, mean, std, None, "wrap_backbone", type(model).__name__)
    if hf_vision_transformer(model) is not None:
        return HFBackbone(model, layer=layer, mean=mean, std=std)
    raise TypeError(
        f"wrap_backbone: {type(model).__name__} is not a supported model class. Supported: timm VisionTransformer "
        f"(and other timm ViTs with forward_intermediates), open_clip CLIP / VisionTransformer, transformers "
        f"CLIPVisionModel / CLIPModel / SiglipVisionModel / SiglipModel."
    )
