"""Tiny random Qwen2-VL / Qwen2.5-VL / Qwen3-VL models and their image processors, built offline."""

from __future__ import annotations

import torch
import transformers as tf
from _hf_tiny import TEXT_SIZES

IDS = dict(image_token_id=4, video_token_id=5, vision_start_token_id=2, vision_end_token_id=3)
TEXT = dict(TEXT_SIZES, vocab_size=16, bos_token_id=None, eos_token_id=None)
#: the towers' common sizes (Qwen2-VL names the width embed_dim and its MLP by mlp_ratio; the others as here)
VISION = dict(hidden_size=32, num_heads=2)


def build_qwen(family: str):
    """``(model, image_processor)``: a tiny random model of ``family`` and its image processor."""
    torch.manual_seed(0)
    rope = {"rope_type": "default", "mrope_section": [2, 3, 3]}
    # 14-px patches merged 2 x 2, 56 x 56 to 64 merged tokens (Qwen2-VL's and Qwen2.5-VL's processor)
    qwen2_ip = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    if family == "qwen2_vl":
        vision = dict(VISION, depth=2, embed_dim=32, mlp_ratio=2, patch_size=14)
        model = tf.Qwen2VLForConditionalGeneration(
            tf.Qwen2VLConfig(vision_config=vision, text_config={**TEXT, "rope_parameters": rope}, **IDS)
        )
        ip = tf.Qwen2VLImageProcessor(**qwen2_ip)
    elif family == "qwen2_5_vl":
        # window_size 56 px = 2x2 merged tokens: windows really split these images (and pad the last row)
        vision = dict(
            VISION,
            depth=4,
            intermediate_size=64,
            out_hidden_size=32,
            patch_size=14,
            window_size=56,
            fullatt_block_indexes=[1, 3],
        )
        model = tf.Qwen2_5_VLForConditionalGeneration(
            tf.Qwen2_5_VLConfig(vision_config=vision, text_config={**TEXT, "rope_parameters": rope}, **IDS)
        )
        ip = tf.Qwen2VLImageProcessor(**qwen2_ip)
    else:
        vision = dict(
            VISION,
            depth=3,
            intermediate_size=64,
            out_hidden_size=32,
            patch_size=16,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0, 1],
        )
        rope3 = {"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True}
        text = {**TEXT, "head_dim": 16, "rope_parameters": rope3}
        model = tf.Qwen3VLForConditionalGeneration(tf.Qwen3VLConfig(vision_config=vision, text_config=text, **IDS))
        ip = tf.Qwen2VLImageProcessor(
            patch_size=16,
            merge_size=2,
            image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
            size={"shortest_edge": 64 * 64, "longest_edge": 32 * 32 * 64},
        )
    return model.eval(), ip
