"""Tiny random transformers LLaVA-family models with their real processors, offline (shared by the tests of
``hrperc.integrations.transformers``).

Full image and tile sizes (336 / 384 / 448), widths 32, 1-2 layers; an offline word-level tokenizer.
"""

from __future__ import annotations

import torch
import transformers as tf
from _models import random_images
from _models import random_images as _images  # noqa: F401  (the name several tests import from here)

WORDS = "what is in the image describe it a red blue square circle yes no".split()
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "<img>", "</img>", "<IMG_CONTEXT>"]
TEXTS = ["<image> what is in the image", "describe it <image>"]


def word_tokenizer(specials, words=WORDS, post_processor=None, **kw):
    """An offline word-level fast tokenizer: ``specials`` (``<pad>``, ``<unk>`` first) then ``words``, the
    specials from the third on registered as special tokens; ``kw`` goes to ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate([*specials, *words])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    if post_processor is not None:
        core.post_processor = post_processor
    kw = {"unk_token": "<unk>", "pad_token": "<pad>", "additional_special_tokens": specials[2:], **kw}
    return tf.PreTrainedTokenizerFast(tokenizer_object=core, **kw)


def _tokenizer():
    from tokenizers import processors

    tok = word_tokenizer(
        SPECIALS,
        post_processor=processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)]),
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=SPECIALS[4:],
    )
    tok.image_token = "<image>"
    tok.start_image_token, tok.end_image_token, tok.context_image_token = "<img>", "</img>", "<IMG_CONTEXT>"
    ids = [tok.convert_tokens_to_ids(t) for t in ("<img>", "</img>", "<IMG_CONTEXT>")]
    tok.start_image_token_id, tok.end_image_token_id, tok.context_image_token_id = ids
    tok.video_token = "<unk>"
    return tok


#: the tiny language models' sizes (LLaMA, Mistral, Qwen text configs alike)
TEXT_SIZES = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1
)
#: the tiny vision towers' sizes (CLIP, SigLIP, InternViT, Pixtral)
VISION_SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def _text_config(tok):
    return tf.LlamaConfig(**TEXT_SIZES, vocab_size=len(tok))


_VISION = dict(VISION_SIZES, patch_size=14)


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


def reference_then_attach(model, proc, cases, options, features=None):
    """The unmodified model's outputs, then the same model attached to its own encoder.

    ``cases`` maps a name to ``(sizes, texts)`` and holds "one image" and "ragged batch"; ``options`` are
    processor call options (asked of "one image"); ``features(model, inputs)``, if given, adds the model's
    image features to each case's reference.

    Returns ``(model, attached_processor, encoder, ref, ref_gen)``: ``ref[case] = (inputs, logits[, features])``,
    ``ref["with options"] = (inputs, logits)``, ``ref_gen`` = 4 greedy tokens after "ragged batch".
    """
    from hrperc.integrations.transformers import attach, encoder_from_model

    ref = {}
    with torch.no_grad():
        for case, (sizes, texts) in cases.items():
            inputs = proc(images=random_images(sizes), text=texts, return_tensors="pt", padding=True)
            extra = () if features is None else (features(model, inputs),)
            ref[case] = (inputs, model(**inputs).logits, *extra)
        sizes, texts = cases["one image"]
        inputs = proc(images=random_images(sizes), text=texts, return_tensors="pt", **options)
        ref["with options"] = inputs, model(**inputs).logits
        sizes, texts = cases["ragged batch"]
        gen_in = proc(images=random_images(sizes), text=texts, return_tensors="pt", padding=True)
        ref_gen = model.generate(**gen_in, max_new_tokens=4, do_sample=False)
    encoder = encoder_from_model(model, proc)
    model, aproc = attach(model, proc, encoder)
    return model, aproc, encoder, ref, ref_gen


def assert_save_and_restore(model, proc, sizes, texts, path):
    """Attach ``model`` to its own encoder, save the model and its front end to ``path``, restore both into a
    fresh ``from_pretrained`` of the same class, and check the restored logits on ``random_images(sizes)`` /
    ``texts`` equal the attached model's. Returns ``(attached, restored)``."""
    from hrperc.integrations.transformers import attach, encoder_from_model, load_front_end, save_front_end

    model, aproc = attach(model, proc, encoder_from_model(model, proc))
    inputs = aproc(images=random_images(sizes), text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = model(**inputs).logits
    model.save_pretrained(path)
    save_front_end(model, path)
    restored = type(model).from_pretrained(path).eval()
    restored, rproc = load_front_end(restored, proc, path)
    with torch.no_grad():
        out = restored(**rproc(images=random_images(sizes), text=texts, return_tensors="pt", padding=True)).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    return model, restored
