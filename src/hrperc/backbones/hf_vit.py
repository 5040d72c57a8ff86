"""Hugging Face ``CLIPVisionModel``, ``SiglipVisionModel`` (or the full CLIP/SigLIP models) and InternVL's
vision tower ``InternVLVisionModel`` as a backbone, and the ``hf:`` family: ``create_backbone("hf:<dir>")``.

Layer ``k`` is ``hidden_states[k]`` of the model's own forward (``hidden_states[0]`` being the
embeddings), prefix tokens dropped: CLIP and InternVL have one class token, SigLIP none; the count is
read off the embeddings (``num_positions - num_patches``; InternVL's embeddings always prepend their
``cls_token``). The adapter runs the model's own modules in the model's order -- ``embeddings``, CLIP's
``pre_layrnorm``, then only the first ``k`` entries of ``encoder.layers`` (InternVL: ``encoder.layer``)
-- instead of the full forward with ``output_hidden_states=True``: the later blocks, the final norm and
SigLIP's pooling head never run and no other layer's activations are kept, with or without gradient
checkpointing (the layers checkpoint themselves in transformers >= 4.52, where they are
``GradientCheckpointingLayer``; for older layers the adapter wraps each call in
``torch.utils.checkpoint`` as the encoder would). Mean/std come from ``preprocessor_config.json`` when
loaded from a directory; otherwise CLIP uses OpenAI CLIP's, SigLIP ``0.5``, InternVL ImageNet's
(``(0.485, 0.456, 0.406)``, ``(0.229, 0.224, 0.225)``: what InternVL checkpoints'
``preprocessor_config.json`` hold, although transformers' ``GotOcr2ImageProcessor`` class defaults to
OpenAI CLIP's) -- pass ``mean``/``std`` to override.

Several layers (``layer=[-2, -5, -8]``, as a list ``vision_feature_layer``) come from one such pass up to
the deepest of them; ``prefix=True`` keeps the class token, as ``vision_feature_select_strategy="full"``.

Other view sizes: the three towers resample their position embeddings (CLIP and SigLIP when the
embeddings are called with ``interpolate_pos_encoding=True``, which the adapter passes for a view other
than the native size only; InternVL always), so ``accepts`` any whole multiple of the patch.

InternVL and the final norm: ``InternVLModel`` takes ``last_hidden_state`` for
``vision_feature_layer=-1``, i.e. the last block's output passed through the tower's ``layernorm``.
hrperc reads block outputs before any final norm, so its layer ``-1`` equals that only with the default
``use_mean_pooling=True`` (``layernorm`` is ``Identity``). With ``use_mean_pooling=False`` the last
layer's features differ from InternVL's by that final LayerNorm, which hrperc does not apply; other
layers (``vision_feature_layer=-k``, ``k > 1``, read from ``hidden_states``) are equal either way.

``hf:<dir>`` (or ``pretrained=<dir>``) loads the folder's vision tower with ``from_pretrained(dir,
local_files_only=True)``: ``CLIPVisionModel`` / ``SiglipVisionModel`` / ``InternVLVisionModel`` by the
config's ``model_type`` (a full CLIP / SigLIP checkpoint gives its vision tower; its text tower and heads
are expected, not a misfit). What transformers reports missing, unexpected or mismatched is refused
(``strict=True``) or warned about by ``backbones._loading``. Mean/std come from the folder's
``preprocessor_config.json`` when it has one.

Example::

    >>> import torch, hrperc
    >>> from transformers import CLIPVisionConfig, CLIPVisionModel
    >>> cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                        num_attention_heads=2, image_size=28, patch_size=14)
    >>> bb = hrperc.backbones.HFBackbone(CLIPVisionModel(cfg))
    >>> bb.num_prefix_tokens, bb.features(torch.randn(2, 3, 28, 28)).shape
    (1, torch.Size([2, 4, 32]))
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .._errors import public
from ._loading import check_loading_info, missing_package
from .base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, VisionBackbone, class_name
from .factory import register_family

__all__ = ["HFBackbone", "hf_vision_transformer"]

_SUPPORTED = (
    "CLIPVisionModel",
    "CLIPVisionModelWithProjection",
    "CLIPModel",
    "SiglipVisionModel",
    "SiglipModel",
    "InternVLVisionModel",
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def hf_vision_transformer(model):
    """The module holding ``embeddings`` + ``encoder`` of a supported transformers model, else ``None``."""
    name = type(model).__name__
    if name not in _SUPPORTED and name not in ("CLIPVisionTransformer", "SiglipVisionTransformer"):
        return None
    # transformers 4.x nests the tower in ``vision_model``; 5.x flattens it into the model itself.
    vision = getattr(model, "vision_model", model)
    if not (hasattr(vision, "embeddings") and hasattr(vision, "encoder")):
        return None
    return vision


def _encoder_layers(encoder) -> nn.ModuleList:
    """The encoder's blocks: ``encoder.layers`` (CLIP, SigLIP) or ``encoder.layer`` (InternVL)."""
    layers = getattr(encoder, "layers", None)
    return layers if layers is not None else encoder.layer


def _is_self_checkpointing(layer) -> bool:
    """True for transformers' ``GradientCheckpointingLayer`` (>= 4.52), which checkpoints its own call."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # older transformers: the encoder's loop did the checkpointing
        return False
    return isinstance(layer, GradientCheckpointingLayer)


_LAYER_ARGS: dict[type, int] = {}


def _call_layer(layer, hidden: torch.Tensor) -> torch.Tensor:
    """One encoder layer on ``hidden`` with no attention mask, across transformers versions and models:
    4.x CLIP layers take a positional ``causal_attention_mask`` and return a tuple, 5.x ones a tensor;
    InternVL layers take ``hidden_states`` only."""
    cls = type(layer)
    if cls not in _LAYER_ARGS:
        params = inspect.signature(cls.forward).parameters
        _LAYER_ARGS[cls] = 2 if "causal_attention_mask" in params else 1 if "attention_mask" in params else 0
    out = layer(hidden, *([None] * _LAYER_ARGS[cls]))
    return out[0] if isinstance(out, tuple) else out


def _pair(value) -> tuple[int, int]:
    """``image_size`` / ``patch_size`` of a config: an int (CLIP, SigLIP) or a (h, w) list/tuple (InternVL)."""
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


class HFBackbone(VisionBackbone):
    """Adapter for transformers CLIP / SigLIP / InternVL vision towers (see module docs)."""

    family = "hf"
    reads_layers = True

    @public(name=class_name())
    def __init__(
        self, model: nn.Module, layer: int | Sequence[int] = -2, mean=None, std=None, source: str | None = None
    ) -> None:
        vision = hf_vision_transformer(model)
        if vision is None:
            raise TypeError(
                f"{type(model).__name__} is not supported; pass one of {', '.join(_SUPPORTED)}. "
                f"Other ViTs: wrap a timm or open_clip model instead."
            )
        cfg = vision.config
        emb = vision.embeddings
        name = type(vision).__name__
        if "Siglip" in name:
            default_mean, default_std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        elif "InternVL" in name:
            default_mean, default_std = IMAGENET_MEAN, IMAGENET_STD
        else:
            default_mean, default_std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        if hasattr(emb, "num_positions"):  # CLIP, SigLIP
            num_prefix = emb.num_positions - emb.num_patches
        else:  # InternVL: the class token is always prepended, position embeddings or not
            num_prefix = 1 if getattr(emb, "cls_token", None) is not None else 0
        super().__init__(
            vision,
            image_size=_pair(cfg.image_size),
            patch_size=_pair(cfg.patch_size),
            hidden_size=cfg.hidden_size,
            num_layers=len(_encoder_layers(vision.encoder)),
            num_prefix_tokens=num_prefix,
            mean=default_mean if mean is None else mean,
            std=default_std if std is None else std,
            layer=layer,
            source=source,
        )
        self.dynamic_size = hasattr(emb, "interpolate_pos_encoding")
        # CLIP / SigLIP resample only when asked; InternVL's embeddings always do and take no such argument.
        self._interpolate_arg = "interpolate_pos_encoding" in inspect.signature(emb.forward).parameters

    def _set_grad_checkpointing(self, enable: bool) -> None:
        from transformers import PreTrainedModel

        model = self.model
        if isinstance(model, PreTrainedModel):  # the tower's own switch (transformers 5: every tower is one)
            if hasattr(model, "activation_checkpointing_enable"):  # the newer name; the older one warns there
                if enable:
                    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                else:
                    model.activation_checkpointing_disable()
            elif enable:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_disable()
            return
        # transformers 4 keeps the tower of a full model in a plain module (CLIPVisionTransformer) that has no
        # public switch: set what gradient_checkpointing_enable sets (its private checkpoint function
        # included), on the tower only.
        from functools import partial

        from torch.utils.checkpoint import checkpoint

        for module in model.modules():
            if hasattr(module, "gradient_checkpointing"):
                setattr(module, "_gradient_checkpointing_func", partial(checkpoint, use_reentrant=False))  # noqa: B010
                setattr(module, "gradient_checkpointing", enable)  # noqa: B010

    def _patch_tokens(self, pixels: torch.Tensor, k: int) -> torch.Tensor:
        return self._run_blocks(pixels, (k,))[0][:, self.num_prefix_tokens :]

    def _hidden_states(self, pixels: torch.Tensor, blocks: tuple[int, ...], prefix: bool) -> list[torch.Tensor]:
        drop = 0 if prefix else self.num_prefix_tokens
        return [h[:, drop:] for h in self._run_blocks(pixels, blocks)]

    def _run_blocks(self, pixels: torch.Tensor, blocks: tuple[int, ...]) -> list[torch.Tensor]:
        """The outputs of the sorted ``blocks`` (prefix tokens included): ``hidden_states[k]`` for each ``k``,
        from one pass that stops after the last of them."""
        vision = self.model
        if self._interpolate_arg and tuple(pixels.shape[-2:]) != self.image_size:
            hidden = vision.embeddings(pixels, interpolate_pos_encoding=True)
        else:  # the native size: exactly the model's own default call
            hidden = vision.embeddings(pixels)
        pre_norm = getattr(vision, "pre_layrnorm", None)  # CLIP (sic); SigLIP has no pre-norm
        if pre_norm is not None:
            hidden = pre_norm(hidden)
        encoder = vision.encoder
        # Checkpointing as the model's own forward would do it: only in training mode, with grad on.
        outer_ckpt = bool(getattr(encoder, "gradient_checkpointing", False)) and encoder.training
        outer_ckpt = outer_ckpt and torch.is_grad_enabled()
        kept = []
        # blocks after the last one read (and the final norm, SigLIP's head) never run
        for i, layer in enumerate(_encoder_layers(encoder)[: blocks[-1]], start=1):
            if outer_ckpt and not _is_self_checkpointing(layer):
                from torch.utils.checkpoint import checkpoint

                hidden = checkpoint(_call_layer, layer, hidden, use_reentrant=False)
            else:
                hidden = _call_layer(layer, hidden)
            if i in blocks:
                kept.append(hidden)
        return kept


# --- the hf: family ----------------------------------------------------------------------------------------
# config.model_type -> the transformers class that loads its vision tower
_CLASSES = {
    "clip": "CLIPVisionModel",
    "clip_vision_model": "CLIPVisionModel",
    "siglip": "SiglipVisionModel",
    "siglip_vision_model": "SiglipVisionModel",
    "internvl_vision": "InternVLVisionModel",
}
# a full CLIP / SigLIP checkpoint also holds the text tower and the heads: expected, not a misfit
_OTHER_TOWER = ("text_model.", "text_projection.", "visual_projection.", "logit_scale", "logit_bias")


def _read_preprocessor(folder: Path):
    cfg = folder / "preprocessor_config.json"
    if not cfg.is_file():
        return None, None
    data = json.loads(cfg.read_text())
    return data.get("image_mean"), data.get("image_std")


def create(name: str, pretrained, *, layer: int, mean, std, strict: bool, **kwargs) -> HFBackbone:
    """``create_backbone("hf:<dir>", ...)`` (see the module docs)."""
    try:
        import transformers
    except ImportError as e:
        raise missing_package("transformers", "'hrperc[hf]' (or: pip install transformers)") from e
    if pretrained is not None and not isinstance(pretrained, (str, os.PathLike)):  # the rule of the other families
        raise TypeError(
            f"pretrained={pretrained!r} is a {type(pretrained).__name__}; pass None or the local folder "
            "save_pretrained wrote (a str or Path)."
        )
    where = pretrained if pretrained is not None else name
    if not where:
        raise ValueError("'hf:' needs a local folder, e.g. 'hf:/models/clip-vit-large-patch14-336'.")
    folder = Path(str(where)).expanduser()
    try:
        config = transformers.AutoConfig.from_pretrained(str(where), local_files_only=True)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"no Hugging Face model at {str(where)!r} (needs config.json and model.safetensors from "
            f"save_pretrained). hrperc never downloads: run `huggingface-cli download <repo> --local-dir DIR` "
            f"and pass 'hf:DIR'."
        ) from e
    cls_name = _CLASSES.get(config.model_type)
    if cls_name is None:
        raise TypeError(
            f"{str(where)!r} holds a '{config.model_type}' model; hrperc's Hugging Face adapter supports "
            f"CLIP, SigLIP and InternViT vision towers ({', '.join(sorted(_CLASSES))}). Wrap other ViTs through timm."
        )
    # mismatched sizes are reported (and refused below, when strict) instead of transformers' RuntimeError
    model, info = getattr(transformers, cls_name).from_pretrained(
        str(where), local_files_only=True, output_loading_info=True, **{"ignore_mismatched_sizes": True, **kwargs}
    )
    check_loading_info(info, str(where), cls_name, strict=strict, ignore=_OTHER_TOWER)
    file_mean, file_std = _read_preprocessor(folder) if folder.is_dir() else (None, None)
    return HFBackbone(
        model,
        layer=layer,
        mean=mean if mean is not None else file_mean,
        std=std if std is not None else file_std,
        source=str(where),
    )


def wrap(model: nn.Module, *, layer: int, mean, std) -> HFBackbone | None:
    """``wrap_backbone``'s probe: a supported transformers vision model, else ``None``."""
    return HFBackbone(model, layer=layer, mean=mean, std=std) if hf_vision_transformer(model) is not None else None


register_family(
    "hf",
    create,
    wrap=wrap,
    aliases=("transformers",),
    usage="'hf:<local dir>'",
    supports="transformers CLIPVisionModel / CLIPModel / SiglipVisionModel / SiglipModel / InternVLVisionModel",
)
