"""INF-LLaVA as a transformers ``LlavaForConditionalGeneration`` (CLIP tower, LLaMA-3 text model) whose image
path is hrperc's ``inf_llava`` encoder, attached with ``hrperc.integrations.transformers.attach``.

Example::

    >>> import torch
    >>> from inf_llava import get_config, build_tokenizer, build_inf_llava
    >>> from inf_llava.data import encode_prompts
    >>> cfg = get_config("tiny")
    >>> tok = build_tokenizer(cfg)
    >>> model = build_inf_llava(cfg, tok)                              # a LlavaForConditionalGeneration
    >>> batch = encode_prompts(tok, cfg, ["what is in the image ?"], torch.rand(1, 3, *cfg.image_size),
    ...                        model_num_tokens(model))
    >>> int((batch["input_ids"] == model.config.image_token_id).sum())  # one placeholder per visual token
    16
    >>> model(**batch).logits.shape                                    # (B, L, vocab)
    torch.Size([1, 27, 40])

What transformers does: embedding the ids, putting the image features at the image placeholders
(``LlavaModel``), the LLaMA forward, the KV-cached ``generate``. What hrperc does: the image features,
``model.model.get_image_features`` = DCM crops -> CLIP (the model's own ``vision_tower``, layer -2) -> DEM
-> thumbnail mean -> the model's ``multi_modal_projector`` (``docs/transformers.md``). The caller (``data.py``)
repeats each image placeholder ``encoder.num_tokens((H, W))`` times and packs the images with
``hrperc.integrations.transformers.pack_images``.

Parts (what the training stages freeze, :func:`set_stage`): ``model.vision_tower`` (always frozen),
``hrperc_front_end.front_end.dem`` (the DEM), ``model.multi_modal_projector``, ``model.language_model`` + ``lm_head``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configs import LLAMA3_8B_SHAPE, InfLlavaConfig

__all__ = [
    "build_inf_llava",
    "set_stage",
    "encoder_of",
    "model_num_tokens",
    "token_loss_sum",
    "llm_parts",
    "IGNORE_INDEX",
]

IGNORE_INDEX = -100


# ---- parts and stages -----------------------------------------------------------------------------------------
def _unwrap(model):
    return getattr(model, "module", model)  # DDP keeps the model under .module


def encoder_of(model):
    """The attached ``hrperc.HighResEncoder`` (the image path) of an example model (plain or DDP-wrapped)."""
    encoder = getattr(_unwrap(model).model, "_hrperc_encoder", None)
    if encoder is None:
        raise ValueError("encoder_of: the model has no hrperc encoder attached; build it with build_inf_llava.")
    return encoder


def model_num_tokens(model):
    """``(H, W) -> number of visual tokens`` of the model's encoder: the count of image placeholders per image."""
    return encoder_of(model).num_tokens


def llm_parts(model) -> list[nn.Module]:
    """The text model's modules: ``model.language_model`` (embeddings, decoder layers, norm) and ``lm_head``."""
    m = _unwrap(model)
    return [m.model.language_model, m.lm_head]


def set_stage(model, stage: int) -> list[str]:
    """Freeze ``model`` for training stage 1 (DEM + projector train) or 2 (DEM + projector + LLM train).

    The CLIP tower is frozen in both (Sec. 5.2). Returns the names of the trainable parameters.
    """
    if stage not in (1, 2):
        raise ValueError(f"set_stage: stage must be 1 (pretraining) or 2 (fine-tuning); got {stage!r}.")
    m = _unwrap(model)
    m.requires_grad_(False)
    m.hrperc_front_end.requires_grad_(True)
    m.model.multi_modal_projector.requires_grad_(True)
    if stage == 2:
        for part in llm_parts(m):
            part.requires_grad_(True)
    m.model.vision_tower.requires_grad_(False)
    return [n for n, p in m.named_parameters() if p.requires_grad]


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of the next-token cross-entropies over the label tokens, their count)``, in float32.

    ``logits`` ``(B, L, V)`` of ``input_ids`` ``(B, L)``, ``labels`` ``(B, L)`` aligned with them (``-100`` =
    not scored): position ``t`` predicts label ``t + 1``. Summed, not averaged, so the trainer can divide
    by the label tokens of the whole global batch.
    """
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    loss_sum = F.cross_entropy(logits[:, :-1][scored].float(), targets[scored], reduction="sum")
    return loss_sum, scored.sum()


# ---- building ---------------------------------------------------------------------------------------------------
def _check_llama3_8b(cfg, config) -> None:
    rope_theta = getattr(config, "rope_theta", None) or (getattr(config, "rope_parameters", None) or {}).get(
        "rope_theta"
    )
    got = {k: (rope_theta if k == "rope_theta" else getattr(config, k, None)) for k in LLAMA3_8B_SHAPE}
    bad = {k: (got[k], v) for k, v in LLAMA3_8B_SHAPE.items() if got[k] != v}
    if bad:
        raise ValueError(
            f"build_inf_llava: {cfg.llm['path']} is not LLaMA-3-8B shaped; (got, expected): {bad}. "
            "Point --llm-dir at a LLaMA-3-8B(-Instruct) transformers checkpoint."
        )


def _build_tower(cfg: InfLlavaConfig) -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    v = cfg.vision
    if v["kind"] == "random":
        return CLIPVisionModel(CLIPVisionConfig(**{k: val for k, val in v.items() if k != "kind"}))
    if v["kind"] == "pretrained":
        return CLIPVisionModel.from_pretrained(v["path"], dtype=torch.float32, local_files_only=True)
    raise ValueError(f"build_inf_llava: vision kind {v['kind']!r} is not 'random' or 'pretrained'.")


def _build_llm(cfg: InfLlavaConfig, tokenizer, dtype) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    if cfg.llm["kind"] == "random":
        kwargs = {k: v for k, v in cfg.llm.items() if k != "kind"}
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **kwargs,
        )
        return LlamaForCausalLM(config).to(dtype)
    llm = LlamaForCausalLM.from_pretrained(cfg.llm["path"], dtype=dtype, local_files_only=True)
    if cfg.name == "llama3-8b":
        _check_llama3_8b(cfg, llm.config)
    return llm


def _load_released_projector(projector: nn.Module, released) -> None:
    """Copy the released ``mm_projector.{0,2}`` (``load_projector``'s ``Sequential``: Linear, GELU, Linear)
    into Llava's ``linear_1`` / ``linear_2``."""
    from hrperc.pretrained.inf_llava import load_projector

    src = load_projector(released)
    for i, dst in ((0, projector.linear_1), (2, projector.linear_2)):
        if src[i].weight.shape != dst.weight.shape:
            raise ValueError(
                f"build_inf_llava: the released mm_projector.{i}.weight has shape {tuple(src[i].weight.shape)} but "
                f"the model's projector takes {tuple(dst.weight.shape)} (vision width -> LLM width); the released "
                "weights were made for another CLIP or LLM."
            )
        with torch.no_grad():
            dst.weight.copy_(src[i].weight)
            dst.bias.copy_(src[i].bias)


def build_inf_llava(cfg: InfLlavaConfig, tokenizer, *, llm_dtype: torch.dtype | None = None):
    """The attached ``LlavaForConditionalGeneration`` of ``cfg``.

    The text model (``model.language_model`` + ``lm_head``) is ``llm_dtype`` (default float32: trainable
    master weights; bfloat16 halves the memory of a frozen or inference-only LLM); the CLIP tower, the
    DEM and the projector are float32. Random parts are drawn from ``cfg.seed``, so rebuilding gives the
    same frozen weights (checkpoints then only hold the trained parts). Released INF-LLaVA weights
    (``cfg.inf_llava_weights``: ``spatial_embed.*``, ``mm_projector.*``) are loaded through
    ``hrperc.pretrained.inf_llava.load_dem`` and ``load_projector``.
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    import hrperc
    from hrperc.backbones import HFBackbone
    from hrperc.integrations.transformers import attach

    image_token_id = cfg.image_token_id(tokenizer)
    released = cfg.inf_llava_weights or None  # a file or a directory of shards; each loader reads its keys
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        tower = _build_tower(cfg)
        llm = _build_llm(cfg, tokenizer, llm_dtype or torch.float32)
        config = LlavaConfig(
            vision_config=tower.config,
            text_config=llm.config,
            image_token_id=image_token_id,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            projector_hidden_act="gelu",  # LLaVA's mlp2x_gelu: Linear -> GELU -> Linear
        )
        if not 0 <= image_token_id < llm.config.vocab_size:
            raise ValueError(
                f"build_inf_llava: the image token id {image_token_id} is outside the LLM's vocabulary of "
                f"{llm.config.vocab_size}; resize the LLM's embeddings to the tokenizer (len {len(tokenizer)})."
            )
        # The shell on the meta device (no memory), then the real parts put in: nothing is initialised twice.
        with torch.device("meta"):
            model = LlavaForConditionalGeneration(config)
        model.model.vision_tower = tower
        model.model.language_model = llm.model
        model.lm_head = llm.lm_head
        model.model.multi_modal_projector = LlavaMultiModalProjector(config)
        if released is not None:
            _load_released_projector(model.model.multi_modal_projector, released)
            dem = hrperc.pretrained.inf_llava.load_dem(released, heads=cfg.dem.get("heads", 8))
        else:
            dem = hrperc.DualPerspectiveEnhancement(tower.config.hidden_size, **cfg.dem)
    meta = [n for n, t in model.state_dict().items() if t.is_meta]
    if meta:
        raise RuntimeError(f"build_inf_llava: parts left unbuilt on the meta device: {meta[:5]}")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    encoder = hrperc.create_encoder(
        "inf_llava", HFBackbone(model.model.vision_tower, layer=-2), dem=dem, grid=tuple(cfg.grid)
    )
    model, _ = attach(model, None, encoder)
    return model
