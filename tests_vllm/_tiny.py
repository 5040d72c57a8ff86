"""Tiny random LLaVA-NeXT, LLaVA-1.5 and LLaVA-OneVision models saved as checkpoint directories vLLM and
transformers both load, offline.

Sizes vLLM's CPU attention accepts (the LLM's head size 32); 56 px tiles of 4 x 4 patches keep an image
to a few hundred tokens; a word-level tokenizer. ``save(directory, front_end=..., family=...)`` writes the
model with ``save_pretrained`` and, for ``"identity"`` (the model's own front end) or ``"upgraded"``
(``dcm=True`` with a random DEM; LLaVA-1.5: ``inf_llava``), hrperc's front-end files next to it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf

WORDS = "what is in the image describe it a red blue square circle yes no".split()
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
TILE = 56
PINPOINTS = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]
# OneVision's 36 canvases of 384 px tiles (anyres_max_9), scaled to the 56 px tile
ONEVISION_PINPOINTS = [[TILE * a, TILE * b] for a in range(1, 7) for b in range(1, 7)]
FAMILIES = ("llava_next", "llava", "llava_onevision")
# The batch the tests send to the OneVision models (``_harness.REQUESTS`` for the others): images past its
# anyres_max_9 shrink ((330, 250), (300, 150)), the image of the most tokens ((182, 168): a map just under
# the shrink), two images in one prompt, a prompt without an image; ``[h, w, seed]`` as :func:`image` takes.
ONEVISION_REQUESTS = [
    {"prompt": "<image> what is in the image", "images": [[40, 90, 1]]},
    {"prompt": "describe it <image>", "images": [[300, 150, 2]]},
    {"prompt": "<image> a <image> what is in the image", "images": [[60, 60, 3], [182, 168, 4]]},
    {"prompt": "<image> describe it", "images": [[330, 250, 5]]},
    {"prompt": "what is in the image", "images": []},
]


def tokenizer(video: bool = False):
    """The word-level tokenizer; ``video=True`` adds OneVision's ``<video>`` token (after the others' ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS + (["<video>"] if video else []))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    tok = tf.PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<image>", "<video>"] if video else ["<image>"],
    )
    tok.image_token = "<image>"
    return tok


def build(seed: int = 0):
    """``(model, processor)``: a random ``LlavaNextForConditionalGeneration`` (float32) and its real processor."""
    tok = tokenizer()
    torch.manual_seed(seed)
    text = _text_config(tok)
    vision = tf.CLIPVisionConfig(
        image_size=TILE, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    cfg = tf.LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=PINPOINTS,
    )
    model = tf.LlavaNextForConditionalGeneration(cfg)
    with torch.no_grad():  # a visible newline: slots that stayed zero would show
        model.model.image_newline.normal_()
    ip = tf.LlavaNextImageProcessor(
        size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS
    )
    proc = tf.LlavaNextProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=14,
        num_additional_image_tokens=1,
        vision_feature_select_strategy="default",
    )
    return model.eval(), proc


def _text_config(tok):
    """The LLM: head size 32, as vLLM's CPU attention needs."""
    return tf.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=2048,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )


def build_llava(seed: int = 0):
    """``(model, processor)``: a random ``LlavaForConditionalGeneration`` (LLaVA-1.5, float32), its processor."""
    tok = tokenizer()
    torch.manual_seed(seed)
    text = _text_config(tok)
    vision = tf.CLIPVisionConfig(
        image_size=TILE, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    cfg = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"))
    model = tf.LlavaForConditionalGeneration(cfg)
    crop = {"height": TILE, "width": TILE}
    ip = tf.LlavaImageProcessor(size={"shortest_edge": TILE}, crop_size=crop, do_pad=True)
    proc = tf.LlavaProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return model.eval(), proc


def build_onevision(seed: int = 0):
    """``(model, processor)``: a random ``LlavaOnevisionForConditionalGeneration`` (float32; a SigLIP tower read
    whole, ``"full"``, as OneVision's; ``anyres_max_9`` over 36 pinpoints of 56 px tiles), its real processor."""
    tok = tokenizer(video=True)
    torch.manual_seed(seed)
    vision = tf.SiglipVisionConfig(
        image_size=TILE, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    cfg = tf.LlavaOnevisionConfig(
        vision_config=vision,
        text_config=_text_config(tok),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        video_token_id=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=ONEVISION_PINPOINTS,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    model = tf.LlavaOnevisionForConditionalGeneration(cfg)
    with torch.no_grad():  # a visible newline: slots that stayed zero would show
        model.model.image_newline.normal_()
    tile = {"height": TILE, "width": TILE}
    ip = tf.LlavaOnevisionImageProcessor(size=tile, image_grid_pinpoints=ONEVISION_PINPOINTS)
    proc = tf.LlavaOnevisionProcessor(
        image_processor=ip,
        tokenizer=tok,
        video_processor=tf.LlavaOnevisionVideoProcessor(size=tile),
        num_image_tokens=(TILE // 14) ** 2,
        vision_feature_select_strategy="full",
    )
    return model.eval(), proc


def upgrade(model, processor, seed: int = 1):
    """``(model, attached processor)``: ``model`` with LLaVA-NeXT's front end plus INF-LLaVA's dual perspectives
    (``dcm=True``; LLaVA-1.5: the ``inf_llava`` recipe) and a DEM of random weights (a fresh DEM could leave the
    tokens as they were)."""
    import hrperc
    from hrperc.integrations.transformers import attach, encoder_from_model

    if model.config.model_type == "llava":  # LLaVA-1.5: INF-LLaVA's own front end around the model's tower
        encoder = hrperc.create_encoder("inf_llava", encoder_from_model(model, processor).backbone)
    else:
        encoder = encoder_from_model(model, processor, dcm=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in encoder.front_end.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return attach(model, processor, encoder)


def hub_layout(directory) -> None:
    """Rename the tower's weights as the hub's LLaVA checkpoints have them (``vision_tower.vision_model.*``),
    which vLLM's loader expects and transformers reads too (transformers 5 writes ``vision_tower.*``)."""
    from safetensors.torch import load_file, save_file

    path = Path(directory) / "model.safetensors"
    tensors = load_file(str(path))
    if any(k.startswith("vision_tower.vision_model.") for k in tensors):
        return  # already in the hub's layout
    renamed = {
        (f"vision_tower.vision_model.{k[len('vision_tower.') :]}" if k.startswith("vision_tower.") else k): v
        for k, v in tensors.items()
    }
    save_file(renamed, str(path), metadata={"format": "pt"})


BUILDERS = {"llava_next": build, "llava": build_llava, "llava_onevision": build_onevision}


def save(directory, front_end: str | None = None, seed: int = 0, family: str = "llava_next") -> Path:
    """Save the tiny model of ``family`` (one of :data:`FAMILIES`) and its processor to ``directory``;
    ``front_end``: ``None``, ``"identity"`` or ``"upgraded"`` (hrperc's front-end files too)."""
    from hrperc.integrations.transformers import attach, encoder_from_model, save_front_end

    if family not in BUILDERS:
        raise ValueError(f"family={family!r}; pass one of {sorted(BUILDERS)}")
    model, proc = BUILDERS[family](seed)
    directory = Path(directory)
    if front_end == "identity":
        model, _ = attach(model, proc, encoder_from_model(model, proc))
    elif front_end == "upgraded":
        model, _ = upgrade(model, proc)
    elif front_end is not None:
        raise ValueError(f"front_end={front_end!r}; pass None, 'identity' or 'upgraded'")
    model.save_pretrained(directory)
    hub_layout(directory)
    proc.save_pretrained(directory)
    if front_end is not None:
        save_front_end(model, directory)
    return directory


def image(height: int, width: int, seed: int):
    """A seeded random RGB ``PIL.Image`` of ``height x width`` pixels (the same in every process)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
