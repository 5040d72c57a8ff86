"""Tiny random MiniCPM-V 4.6 / 4.7 models and their real processors, built offline.

SigLIP-like towers of 14-px patches (width 32, 2 layers, the window merger after layer 0), a 1-layer LLM
(Llama for 4.6; Qwen3.5's text model, full attention, for 4.7 whose canvas M-RoPE needs it) and the real
``MiniCPMV4_6Processor`` / ``MiniCPMV4_7Processor`` around an offline word-level tokenizer holding the
processor's markers as special tokens (``"\\n"`` too, so that the rows between slices survive).
"""

from __future__ import annotations

import torch
import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers

MARKERS = {
    "image_token": "<unk>",
    "video_token": "<video>",
    "image_start_token": "<image>",
    "image_end_token": "</image>",
    "slice_start_token": "<slice>",
    "slice_end_token": "</slice>",
    "image_id_start_token": "<image_id>",
    "image_id_end_token": "</image_id>",
}
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "\n", *[m for k, m in MARKERS.items() if k != "image_token"]]
WORDS = "what is in the image describe it a red".split() + [str(d) for d in range(10)]
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=14)


def tokenizer():
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(True)])
    tok = tf.PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", additional_special_tokens=SPECIALS[2:]
    )
    for name, token in MARKERS.items():
        setattr(tok, name, token)
    tok.image_token_id = tok.convert_tokens_to_ids(MARKERS["image_token"])
    tok.video_token_id = tok.convert_tokens_to_ids(MARKERS["video_token"])
    return tok


def processor(version: str = "4_6", **image_options):
    """The real MiniCPM-V ``version`` processor around :func:`tokenizer` (no model: the text tests need none)."""
    proc_cls = tf.MiniCPMV4_6Processor if version == "4_6" else tf.MiniCPMV4_7Processor
    ip = tf.MiniCPMV4_6ImageProcessor(**image_options)
    return proc_cls(image_processor=ip, video_processor=tf.MiniCPMV4_6VideoProcessor(), tokenizer=tokenizer())


def build_minicpm(version: str = "4_6", seed: int = 0, **image_options):
    """``(model, processor)``: a tiny random MiniCPM-V ``version`` ("4_6" or "4_7") and its processor."""
    tok = tokenizer()
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in MARKERS.items()}
    vision = dict(VISION, image_size=70, insert_layer_id=0)
    if version == "4_6":
        text = tf.LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
        cfg_cls, model_cls = tf.MiniCPMV4_6Config, tf.MiniCPMV4_6ForConditionalGeneration
        extra = {}
    else:
        text = tf.Qwen3_5TextConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            layer_types=["full_attention"],
        )
        cfg_cls, model_cls = tf.MiniCPMV4_7Config, tf.MiniCPMV4_7ForConditionalGeneration
        extra = dict(
            image_start_id=ids["image_start_token"],
            image_end_id=ids["image_end_token"],
            slice_start_id=ids["slice_start_token"],
            slice_end_id=ids["slice_end_token"],
            newline_id=tok.convert_tokens_to_ids("\n"),
        )
    config = cfg_cls(
        vision_config=vision,
        text_config=text,
        insert_layer_id=0,
        image_token_id=ids["image_token"],
        video_token_id=ids["video_token"],
        **extra,
    )
    torch.manual_seed(seed)
    model = model_cls(config)
    return model.eval(), processor(version, **image_options)
