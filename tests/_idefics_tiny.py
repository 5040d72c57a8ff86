"""Tiny random Idefics3 and SmolVLM models with their real processors, built offline.

``build_idefics("idefics3")``: 56 px tiles of 14 px patches, ``scale_factor=2`` (4 tokens per view), longest
edge 4 tiles (224), as Idefics3's 364 / 14 / 2 / 1456 at a small size; ``build_idefics("smolvlm")``: 64 px
tiles of 8 px patches, ``scale_factor=4`` (4 tokens per view), longest edge 256, as SmolVLM-256M's 512 / 16 /
4 / 2048 at a small size. A word-level tokenizer that keeps ``"\\n"`` as a token (so the processors' row
breaks show in ``input_ids``) and holds the markers ``<fake_token_around_image>``, ``<global-img>`` and
``<row_r_col_c>``.
"""

from __future__ import annotations

import torch
import transformers as tf
from _hf_tiny import TEXT_SIZES, VISION_SIZES
from _models import random_images as images  # noqa: F401  (the name the tests import from here)
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

MARKERS = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"]
ROWS_COLS = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", *MARKERS, *ROWS_COLS]
WORDS = ["\n", *"what is in the image describe it User Assistant :".split()]
#: (tile, patch, scale_factor, longest_edge) of each tiny family
SETTINGS = {"idefics3": (56, 14, 2, 224), "smolvlm": (64, 8, 4, 256)}
TEXT = "User : <image> describe it"


def tokenizer():
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex("\n"), behavior="isolated"), pre_tokenizers.Split(Regex(" +"), behavior="removed")]
    )
    tok = tf.PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=SPECIALS[4:],
    )
    tok.image_token, tok.fake_image_token, tok.global_image_token = "<image>", MARKERS[0], "<global-img>"
    tok.end_of_utterance_token, tok.video_token = "<end_of_utterance>", "<unk>"
    return tok


def processor(family: str, **image_processor):
    """The real ``family`` processor of :func:`build_idefics` alone (``image_processor``: options of its image
    processor over the tiny defaults): the tests that only read a processor need no model."""
    tile, patch, scale, edge = SETTINGS[family]
    kw = {"size": {"longest_edge": edge}, "max_image_size": {"longest_edge": tile}, **image_processor}
    seq = (tile // patch // scale) ** 2
    if family == "idefics3":
        return tf.Idefics3Processor(tf.Idefics3ImageProcessor(**kw), tokenizer(), image_seq_len=seq)
    return tf.SmolVLMProcessor(
        tf.SmolVLMImageProcessor(**kw), tokenizer(), tf.SmolVLMVideoProcessor(), image_seq_len=seq
    )


def build_idefics(family: str, seed: int = 0, **image_processor):
    """``(model, processor)``: a tiny random ``family`` ("idefics3" / "smolvlm") model and its real processor
    (``image_processor``: options of its image processor over the tiny defaults)."""
    tile, patch, scale, _ = SETTINGS[family]
    proc = processor(family, **image_processor)
    tok = proc.tokenizer
    text = tf.LlamaConfig(**TEXT_SIZES, vocab_size=len(tok), pad_token_id=0)
    image_id = tok.convert_tokens_to_ids("<image>")
    torch.manual_seed(seed)
    if family == "idefics3":
        vision = tf.Idefics3VisionConfig(image_size=tile, patch_size=patch, **VISION_SIZES)
        config = tf.Idefics3Config(vision_config=vision, text_config=text, scale_factor=scale, image_token_id=image_id)
        model = tf.Idefics3ForConditionalGeneration(config)
    else:
        vision = tf.SmolVLMVisionConfig(image_size=tile, patch_size=patch, **VISION_SIZES)
        config = tf.SmolVLMConfig(vision_config=vision, text_config=text, scale_factor=scale, image_token_id=image_id)
        model = tf.SmolVLMForConditionalGeneration(config)
    with torch.no_grad():  # random position embeddings: a position bucket off by one would show
        model.model.vision_model.embeddings.position_embedding.weight.normal_()
    return model.eval(), proc
