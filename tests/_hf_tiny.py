"""Tiny random transformers LLaVA-family models with their real processors, offline (shared by the tests of
``hrperc.integrations.transformers``).

Full image and tile sizes (336 / 384 / 448), widths 32, 1-2 layers; an offline word-level tokenizer.
"""

from __future__ import annotations

import torch
import transformers as tf

WORDS = "what is in the image describe it a red blue square circle yes no".split()
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "<img>", "</img>", "<IMG_CONTEXT>"]
TEXTS = ["<image> what is in the image", "describe it <image>"]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    tok = tf.PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=SPECIALS[4:],
    )
    tok.image_token = "<image>"
    tok.start_image_token, tok.end_image_token, tok.context_image_token = "<img>", "</img>", "<IMG_CONTEXT>"
    ids = [tok.convert_tokens_to_ids(t) for t in ("<img>", "</img>", "<IMG_CONTEXT>")]
    tok.start_image_token_id, tok.end_image_token_id, tok.context_image_token_id = ids
    tok.video_token = "<unk>"
    return tok


def _text_config(tok):
    return tf.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=len(tok),
    )


_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=14)


def build(family: str, seed: int = 0):
    """``(model, processor, texts)`` of a tiny random model of ``family`` with its real processor."""
    tok = _tokenizer()
    image_id = tok.convert_tokens_to_ids("<image>")
    torch.manual_seed(seed)
    if family == "llava":
        cfg = tf.LlavaConfig(
            vision_config=tf.CLIPVisionConfig(image_size=336, **_VISION),
            text_config=_text_config(tok),
            image_token_id=image_id,
        )
        model = tf.LlavaForConditionalGeneration(cfg)
        crop = {"height": 336, "width": 336}
        ip = tf.LlavaImageProcessor(size={"shortest_edge": 336}, crop_size=crop, do_pad=True)
        proc = tf.LlavaProcessor(
            image_processor=ip,
            tokenizer=tok,
            patch_size=14,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
        )
    elif family == "llava_next":
        cfg = tf.LlavaNextConfig(
            vision_config=tf.CLIPVisionConfig(image_size=336, **_VISION),
            text_config=_text_config(tok),
            image_token_id=image_id,
        )
        model = tf.LlavaNextForConditionalGeneration(cfg)
        ip = tf.LlavaNextImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
        proc = tf.LlavaNextProcessor(
            image_processor=ip,
            tokenizer=tok,
            patch_size=14,
            num_additional_image_tokens=1,
            vision_feature_select_strategy="default",
        )
    elif family == "llava_onevision":
        cfg = tf.LlavaOnevisionConfig(
            vision_config=tf.SiglipVisionConfig(image_size=384, **_VISION),
            text_config=_text_config(tok),
            image_token_id=image_id,
            video_token_id=tok.convert_tokens_to_ids("<unk>"),
        )
        model = tf.LlavaOnevisionForConditionalGeneration(cfg)
        ip = tf.LlavaOnevisionImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3)
        video = tf.LlavaOnevisionVideoProcessor()
        proc = tf.LlavaOnevisionProcessor(
            image_processor=ip,
            tokenizer=tok,
            video_processor=video,
            num_image_tokens=729,
            vision_feature_select_strategy="full",
            video_token="<unk>",
        )
    else:
        vcfg = tf.InternVLVisionConfig(image_size=448, **_VISION)
        cfg = tf.InternVLConfig(
            vision_config=vcfg, text_config=_text_config(tok), image_token_id=tok.context_image_token_id
        )
        model = tf.InternVLForConditionalGeneration(cfg)
        with torch.no_grad():  # transformers initializes these to zero, which would hide a wrong CLS / position
            emb = model.model.vision_tower.embeddings
            emb.cls_token.normal_()
            emb.position_embeddings.normal_(std=0.1)
        ip = tf.GotOcr2ImageProcessor(
            crop_to_patches=True,
            size={"height": 448, "width": 448},
            max_patches=12,
            image_mean=[0.485, 0.456, 0.406],
            image_std=[0.229, 0.224, 0.225],
        )
        proc = tf.InternVLProcessor(
            image_processor=ip, tokenizer=tok, video_processor=tf.InternVLVideoProcessor(), image_seq_length=256
        )
    if family != "internvl":
        with torch.no_grad():  # a visible newline: slots that stayed zero would show
            getattr(model.model, "image_newline", torch.zeros(1)).normal_()
    texts = [t.replace("<image>", proc.image_token) for t in TEXTS]
    return model.eval(), proc, texts


def _images(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]


FAMILIES = ("llava", "llava_next", "llava_onevision", "internvl")


def _clip_processor(tok, **kw):
    """LLaVA-1.5 as some checkpoints ship it: a LlavaProcessor around a ``CLIPImageProcessor`` (no pad to square)."""
    ip = tf.CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, **kw)
    return tf.LlavaProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
