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

import torch
from torch import nn

from .._weights import read_weights, unwrap
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


def _short(keys, n: int = 6) -> str:
    keys = list(keys)
    return str(keys[:n])[:-1] + (f", ... (+{len(keys) - n} more)]" if len(keys) > n else "]")


def _read_checkpoint(path: str, fn: str) -> dict[str, torch.Tensor]:
    """The state dict in ``path``: content-routed, unwrapped, without a DistributedDataParallel ``module.`` prefix."""
    sd = unwrap(read_weights(Path(path), fn), fn, repr(path))
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _load_into(model: nn.Module, sd: dict, path: str, strict: bool, fn: str, what: str) -> bool:
    """Load ``sd`` into ``model``. Strict: refuse any misfit in one ``ValueError``; else warn.

    Returns whether any tensor was loaded."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    common = [k for k in own if k in sd]
    mismatched = [k for k in common if tuple(sd[k].shape) != tuple(own[k].shape)]
    not_float = [
        k for k in common if k not in mismatched and own[k].is_floating_point() and not sd[k].is_floating_point()
    ]
    nonfinite = [
        k for k in common
        if k not in mismatched and k not in not_float and sd[k].is_floating_point() and not torch.isfinite(sd[k]).all()
    ]  # fmt: skip
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys {_short(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys {_short(unexpected)}")
    if mismatched:
        shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched[:4]]
        problems.append(f"{len(mismatched)} shape mismatches [{'; '.join(shapes)}]")
    if not_float:
        problems.append(f"{len(not_float)} integer/bool tensors for float weights {_short(not_float)}")
    if nonfinite:
        problems.append(f"{len(nonfinite)} tensors holding NaN or Inf {_short(nonfinite)}")
    if problems and strict:
        raise ValueError(
            f"{fn}: the checkpoint {path!r} does not fit {what} ({len(common)} of {len(own)} model keys match): "
            f"{', '.join(problems)}. Check that the file holds the weights of this model (same architecture and "
            "size) and pick the matching model name; pass strict=False only to load the keys that fit and leave "
            "the rest random."
        )
    skip = set(mismatched) | set(not_float) | set(nonfinite)
    fit = {k: v for k, v in sd.items() if k in own and k not in skip}
    if problems:
        random = sorted(set(missing) | skip)
        warnings.warn(
            f"{fn}: strict=False: loaded {len(fit)} of {len(own)} tensors of {what} from {path!r}; "
            f"{len(random)} stayed random {_short(random)}; {len(unexpected)} checkpoint keys were ignored "
            f"{_short(unexpected)}. Use the checkpoint of this model for all of them.",
            UserWarning,
            stacklevel=4,
        )
    model.load_state_dict(fit, strict=False)
    return bool(fit)


def _timm_filter(timm, name: str, model: nn.Module, sd: dict) -> dict:
    """timm's own conversion of a checkpoint for this model (OpenAI CLIP / DINOv2 layouts, pos-embed resampling),
    then the classifier keys dropped when the model has no such head (as ``timm.create_model`` does)."""
    import importlib

    module = timm.models._registry._model_to_module.get(name.split(".")[0])
    filter_fn = None
    if module:
        filter_fn = getattr(importlib.import_module(f"timm.models.{module}"), "checkpoint_filter_fn", None)
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


def _open_clip_filter(model: nn.Module, sd: dict) -> dict:
    """The conversions ``open_clip.load_checkpoint`` applies before its (strict) ``load_state_dict``."""
    from open_clip import factory

    sd = factory.convert_state_dict(model, sd)
    if "positional_embedding" in sd and not hasattr(model, "positional_embedding"):
        sd = factory.convert_to_custom_text_state_dict(sd)
    for key in ("logit_scale", "logit_bias"):
        param = getattr(model, key, None)
        if key in sd and param is not None and param.ndim != sd[key].ndim:
            sd[key] = sd[key].reshape(param.shape)
    if "logit_bias" not in sd and getattr(model, "logit_bias", None) is not None and "logit_scale" in sd:
        sd["logit_bias"] = torch.zeros_like(sd["logit_scale"])
    position_id_key = "text.transformer.embeddings.position_ids"
    if position_id_key in sd and not hasattr(model, position_id_key):
        del sd[position_id_key]
    factory.resize_pos_embed(sd, model)
    factory.resize_text_pos_embed(sd, model)
    return sd


def _create_timm(name: str, pretrained, layer: int, mean, std, kw, strict: bool = True) -> VisionBackbone:
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
    sd = _read_checkpoint(path, fn) if path is not None else None  # a broken file fails before any model is built
    model = timm.create_model(name, pretrained=False, **kw)  # random; the checkpoint is loaded below, strictly
    if not is_timm_vit(model):
        raise TypeError(
            f"{fn}: 'timm:{name}' builds a {type(model).__name__}, not a token ViT (hrperc needs "
            f"forward_intermediates, num_prefix_tokens, patch_embed and blocks). Pick a ViT, e.g. "
            f"'timm:vit_large_patch14_clip_336'."
        )
    if path is not None:
        sd = _timm_filter(timm, name, model, sd)
        if not _load_into(model, sd, path, strict, fn, f"timm model {name!r}"):
            path = None
    return TimmBackbone(model, layer=layer, mean=mean, std=std, source=path)


def _create_open_clip(name: str, pretrained, layer: int, mean, std, kw, strict: bool = True) -> VisionBackbone:
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
        import inspect

        if pretrained is not None:
            # open_clip ignores pretrained= for schema names; honour it: the folder's config, this file.
            path = _check_file(pretrained, fn, f"open_clip model {name!r}")
            weights = path
        else:
            if not any(any(folder.glob(f"*.{ext}")) for ext in ("safetensors", "bin", "pth")):
                raise FileNotFoundError(
                    f"{fn}: 'open_clip:{name}' has open_clip_config.json but no checkpoint "
                    f"(open_clip_model.safetensors or open_clip_pytorch_model.bin) in {folder}; add it, or pass "
                    f"pretrained=<file>."
                )
            path = str(folder)
            weights = open_clip.factory._find_checkpoint_in_dir(folder)
        if "load_weights" in inspect.signature(open_clip.create_model).parameters:
            sd = _read_checkpoint(str(weights), fn)
            model = open_clip.create_model(name, **{"load_weights": False, **kw})  # random; loaded below, strictly
            what = f"open_clip model {name!r}"
            if not _load_into(model, _open_clip_filter(model, sd), str(weights), strict, fn, what):
                path = None
        else:  # pragma: no cover - old open_clip: its own (strict) loader
            model = open_clip.create_model(name, **kw)
            if pretrained is not None:
                open_clip.load_checkpoint(model, path)
    else:
        if name not in open_clip.list_models():
            close = [m for m in open_clip.list_models() if name.lower()[:6] in m.lower()][:8]
            raise ValueError(
                f"{fn}: 'open_clip:{name}' is not an open_clip model config. "
                f"{'Close names: ' + ', '.join(close) + '. ' if close else ''}See open_clip.list_models()."
            )
        path = _check_file(pretrained, fn, f"open_clip model {name!r}")
        _warn_quickgelu_open_clip(open_clip, name, path, kw)
        sd = _read_checkpoint(path, fn) if path is not None else None  # fails before any model is built
        model = open_clip.create_model(name, **kw)  # random; the checkpoint is loaded below, strictly
        if path is not None:
            sd = _open_clip_filter(model, sd)
            if not _load_into(model, sd, path, strict, fn, f"open_clip model {name!r}"):
                path = None
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


def _create_hf(name: str, pretrained, layer: int, mean, std, kw, strict: bool = True) -> VisionBackbone:
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
        "internvl_vision": "InternVLVisionModel",
    }
    cls_name = classes.get(config.model_type)
    if cls_name is None:
        raise TypeError(
            f"{fn}: {str(where)!r} holds a '{config.model_type}' model; hrperc's Hugging Face adapter supports "
            f"CLIP, SigLIP and InternViT vision towers ({', '.join(sorted(classes))}). Wrap other ViTs through timm."
        )
    # mismatched sizes are reported (and refused below, when strict) instead of transformers' RuntimeError
    model, info = getattr(transformers, cls_name).from_pretrained(
        str(where), local_files_only=True, output_loading_info=True, **{"ignore_mismatched_sizes": True, **kw}
    )
    missing = sorted(info.get("missing_keys") or [])
    mismatched = [
        f"{m[0]}: checkpoint {tuple(m[1])} vs model {tuple(m[2])}" if isinstance(m, tuple) and len(m) == 3 else str(m)
        for m in info.get("mismatched_keys") or []
    ]
    # a full CLIP / SigLIP checkpoint also holds the text tower and the heads: expected, not a misfit
    other_tower = ("text_model.", "text_projection.", "visual_projection.", "logit_scale", "logit_bias")
    unexpected = sorted(k for k in info.get("unexpected_keys") or [] if not k.startswith(other_tower))
    if missing or mismatched or unexpected:
        parts = [f"{len(missing)} missing keys {_short(missing)}"] if missing else []
        parts += [f"{len(unexpected)} unexpected keys {_short(unexpected)}"] if unexpected else []
        parts += [f"{len(mismatched)} shape mismatches [{'; '.join(mismatched[:4])}]"] if mismatched else []
        what = ", ".join(parts)
        if strict:
            raise ValueError(
                f"{fn}: the checkpoint in {str(where)!r} does not fit its {cls_name}: {what}. Check that the folder "
                "holds the weights its config.json describes; pass strict=False only to keep those tensors random."
            )
        random = missing + [m.split(":")[0] for m in mismatched]
        warnings.warn(
            f"{fn}: strict=False: loaded the checkpoint in {str(where)!r} into its {cls_name}; {len(random)} tensors "
            f"stayed random {_short(random)}; {len(unexpected)} checkpoint keys were ignored {_short(unexpected)}. "
            "Use a checkpoint that fits its config for all of them.",
            UserWarning,
            stacklevel=3,
        )
    file_mean, file_std = _read_preprocessor(folder) if folder.is_dir() else (None, None)
    return HFBackbone(
        model,
        layer=layer,
        mean=mean if mean is not None else file_mean,
        std=std if std is not None else file_std,
        source=str(where),
    )


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

    Returns: a :class:`VisionBackbone`; its ``features((N, 3, h, w)) -> (N, ht*wt, D)``.
    """
    fn = "create_backbone"
    if not isinstance(name, str):
        raise TypeError(f"{fn}: name={name!r} must be a string. {_USAGE} To wrap a model object use wrap_backbone.")
    family, sep, model_name = name.partition(":")
    if not sep or family not in _FAMILIES:
        raise ValueError(f"{fn}: name={name!r} has no known family prefix. {_USAGE}")
    if not isinstance(strict, bool):
        raise TypeError(f"{fn}: strict={strict!r} is not a bool. Pass strict=True (the default) or strict=False.")
    builder = {"timm": _create_timm, "open_clip": _create_open_clip, "hf": _create_hf}[_FAMILIES[family]]
    return builder(model_name, pretrained, layer, mean, std, dict(kwargs), strict).eval()


def wrap_backbone(model: nn.Module, layer: int = -2, mean=None, std=None) -> VisionBackbone:
    """Adapt a model object you already built to :class:`VisionBackbone`.

    Accepts a timm ViT, an open_clip CLIP model or its ``.visual`` (ViT or timm trunk), a transformers
    ``CLIPVisionModel`` / ``CLIPModel`` / ``SiglipVisionModel`` / ``SiglipModel`` / ``InternVLVisionModel``
    (also as the ``vision_tower`` of a LLaVA-family or InternVL model), or a :class:`VisionBackbone`
    (returned as is).

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
        f"CLIPVisionModel / CLIPModel / SiglipVisionModel / SiglipModel / InternVLVisionModel."
    )
