"""A tiny random Gemma 3 (``Gemma3ForConditionalGeneration``) and its real ``Gemma3Processor``, built offline.

SigLIP tower of 64 px images and 8 px patches (8 x 8 patches, pooled 2 x 2 to ``mm_tokens_per_image = 16``), a
two-layer Gemma 3 LLM (one sliding-window layer, one global), and a word-level tokenizer holding Gemma 3's
``<start_of_image>`` / ``<end_of_image>`` / ``<image_soft_token>`` and the words of the processor's
pan-and-scan text, so that a difference in that text changes ``input_ids``.
"""

from __future__ import annotations

import torch
import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
WORDS = "Here is the original image and here are some crops to help you see better what describe it".split()
IMAGE, PATCH, MM_TOKENS = 64, 8, 16
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vision_use_head=False)


def tokenizer():
    """A word-level tokenizer with Gemma 3's image tokens as its ``boi_token`` / ``eoi_token`` / ``image_token``."""
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        extra_special_tokens={"boi_token": SPECIALS[4], "eoi_token": SPECIALS[5], "image_token": SPECIALS[6]},
    )


def processor(**image_options):
    """``Gemma3Processor`` around the real ``Gemma3ImageProcessor`` (64 px, the released mean / std / bilinear)."""
    settings = dict(size={"height": IMAGE, "width": IMAGE}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    ip = tf.Gemma3ImageProcessor(**{**settings, **image_options})
    return tf.Gemma3Processor(image_processor=ip, tokenizer=tokenizer(), image_seq_length=MM_TOKENS)


def build_gemma3(seed: int = 0, **image_options):
    """``(model, processor)``: a tiny random ``Gemma3ForConditionalGeneration`` (eval mode) and its processor."""
    proc = processor(**image_options)
    tok = proc.tokenizer
    text = tf.Gemma3TextConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=24,
        layer_types=["sliding_attention", "full_attention"],
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    vision = tf.SiglipVisionConfig(image_size=IMAGE, patch_size=PATCH, **VISION)
    config = tf.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=MM_TOKENS,
        boi_token_index=tok.boi_token_id,
        eoi_token_index=tok.convert_tokens_to_ids(SPECIALS[5]),
        image_token_index=tok.image_token_id,
    )
    torch.manual_seed(seed)
    model = tf.Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # transformers starts the projection at zero, which would hide the image features
        pj = model.model.multi_modal_projector
        pj.mm_input_projection_weight.normal_(std=0.5)
        pj.mm_soft_emb_norm.weight.normal_(std=0.1)
    return model.eval(), proc


def images(sizes, seed: int = 0):
    """uint8 ``(3, H, W)`` random images of ``sizes``."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]
