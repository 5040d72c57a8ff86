"""Tiny random Pixtral-12B (LLaVA with a Pixtral tower) and Mistral 3 models and their processors, built offline.

``build_pixtral("llava")``: 16-px patches, no merge, longest side 256 (Pixtral-12B's layout at a small
size); ``build_pixtral("mistral3")``: 14-px patches merged 2 x 2 by the projector, longest side 224.
"""

from __future__ import annotations

import torch
import transformers as tf
from _hf_tiny import TEXT_SIZES, VISION_SIZES, word_tokenizer

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
WORDS = "what is in the image describe it".split()
VISION = dict(VISION_SIZES, head_dim=16)
#: (patch, merge, longest_edge) of each tiny family
SETTINGS = {"llava": (16, 1, 256), "mistral3": (14, 2, 224)}


def tokenizer():
    """A word-level tokenizer holding Pixtral's three image tokens (as special tokens)."""
    return word_tokenizer(SPECIALS, WORDS)


def build_pixtral(family: str, seed: int = 0):
    """``(model, processor)``: a tiny random model of ``family`` ("llava" or "mistral3") and its PixtralProcessor."""
    patch, merge, edge = SETTINGS[family]
    tok = tokenizer()
    img = tok.convert_tokens_to_ids("[IMG]")
    text = tf.MistralConfig(**TEXT_SIZES, vocab_size=len(tok), head_dim=16, bos_token_id=None, eos_token_id=None)
    vision = tf.PixtralVisionConfig(patch_size=patch, image_size=edge, hidden_act="silu", **VISION)
    torch.manual_seed(seed)
    if family == "mistral3":
        config = tf.Mistral3Config(
            vision_config=vision,
            text_config=text,
            image_token_index=img,
            spatial_merge_size=merge,
            vision_feature_layer=-1,
        )
        model = tf.Mistral3ForConditionalGeneration(config)
    else:
        config = tf.LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=img,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            projector_hidden_act="gelu",
        )
        model = tf.LlavaForConditionalGeneration(config)
    ip = tf.PixtralImageProcessor(size={"longest_edge": edge}, patch_size={"height": patch, "width": patch})
    proc = tf.PixtralProcessor(image_processor=ip, tokenizer=tok, patch_size=patch, spatial_merge_size=merge)
    return model.eval(), proc
