"""Configurations of the INF-LLaVA example: ``tiny`` (random weights, CPU, seconds) and ``llama3-8b``.

Example::

    >>> from inf_llava.configs import get_config, build_tokenizer
    >>> cfg = get_config("tiny")
    >>> tok = build_tokenizer(cfg)                       # built offline, nothing downloaded
    >>> tok.convert_tokens_to_ids(cfg.image_token) == cfg.image_token_id(tok)
    True

``llama3-8b`` follows the released model (``docs/released.md``): CLIP ViT-L/14-336 (second-to-last
layer, CLS dropped, 576 tokens per sub-image), grid 3 x 3 over a 1008 x 1008 canvas, released DEM
(8 heads, D = 1024), ``mlp2x_gelu`` projector 1024 -> 4096, LLaMA-3-8B (hidden 4096, 32 layers,
32 heads, 8 KV heads, vocab 128256, rope theta 5e5), assembled as a transformers
``LlavaForConditionalGeneration``; ``<image>`` in the text stands for the image, with the id of LLaMA-3's
``<|reserved_special_token_0|>`` (:data:`LLAMA3_IMAGE_TOKEN`). It needs local directories, given as
arguments or environment variables:

* ``INF_LLAVA_LLM_DIR``: a transformers ``LlamaForCausalLM`` checkpoint directory (with its tokenizer);
* ``INF_LLAVA_CLIP_DIR``: a transformers CLIP ViT-L/14-336 directory;
* ``INF_LLAVA_WEIGHTS`` (optional): the released INF-LLaVA weights (a ``.safetensors``/``.bin`` file or
  a directory) holding ``spatial_embed.*`` (DEM) and ``mm_projector.*`` (projector).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

__all__ = ["InfLlavaConfig", "CONFIGS", "get_config", "build_tokenizer", "LLAMA3_IMAGE_TOKEN", "TINY_WORDS"]

# The image placeholder of tokenizers without an ``<image>`` token (LLaMA-3): one of LLaMA-3's reserved
# special tokens. transformers' Llava embeds every input id, so the placeholder must be a real vocabulary
# id (LLaVA's -200 cannot be used); a reserved token keeps the vocabulary, the embedding and the lm_head
# at LLaMA-3-8B's 128256 rows, so released and trained LLM weights load unchanged.
LLAMA3_IMAGE_TOKEN = "<|reserved_special_token_0|>"

# Vocabulary of the synthetic task (data.py) plus the prompt template's words.
TINY_WORDS = (
    "USER ASSISTANT : ? . , what is in the image where describe a an at of colour shape "
    "red green blue yellow white magenta square cross ring bar "
    "top middle bottom left center right"
).split()


@dataclass(frozen=True)
class InfLlavaConfig:
    """Everything needed to build one INF-LLaVA model, its tokenizer and its inputs.

    ``image_size`` is the canvas ``(H, W)`` fed to the encoder, ``grid`` the DCM grid ``(gh, gw)``;
    each sub-image is ``(H // gh, W // gw)`` pixels, the ViT's input size.
    """

    name: str
    image_size: tuple[int, int]
    grid: tuple[int, int]
    # Vision tower: {"kind": "random", **CLIPVisionConfig kwargs} or {"kind": "pretrained", "path": <CLIP dir>}.
    vision: dict = field(default_factory=dict)
    # DEM kwargs (DualPerspectiveEnhancement) for random init; ignored when released weights are loaded.
    dem: dict = field(default_factory=dict)
    # LLM: {"kind": "random", **LlamaConfig kwargs} or {"kind": "pretrained", "path": <dir>}.
    llm: dict = field(default_factory=dict)
    tokenizer: str = "offline"  # "offline" (built from TINY_WORDS) or a local directory
    inf_llava_weights: str | None = None  # released DEM + projector weights
    # One user turn; the first question of a sample carries the image token ("<image>\n" + question, as LLaVA).
    prompt_template: str = "USER : {question} ASSISTANT :"
    answer_suffix: str = ""  # appended to every answer; empty: the tokenizer's EOS token is appended instead
    image_token: str = "<image>"
    seed: int = 0  # random weights are drawn from this seed, so frozen parts rebuild identically

    @property
    def sub_image_size(self) -> tuple[int, int]:
        return self.image_size[0] // self.grid[0], self.image_size[1] // self.grid[1]

    def image_token_id(self, tokenizer) -> int:
        """The vocabulary id that stands for image tokens (``LlavaConfig.image_token_id``): the tokenizer's
        ``image_token`` when it has one, else :data:`LLAMA3_IMAGE_TOKEN` (LLaMA-3's first reserved token).

        ``image_token`` in the text is always the marker; only its id differs."""
        for name in (self.image_token, LLAMA3_IMAGE_TOKEN):
            tid = tokenizer.convert_tokens_to_ids(name)  # unknown: None or the unk id
            if tid is not None and tid != tokenizer.unk_token_id:
                return int(tid)
        raise ValueError(
            f"InfLlavaConfig.image_token_id: the tokenizer has neither {self.image_token!r} nor "
            f"{LLAMA3_IMAGE_TOKEN!r}; transformers' Llava needs the image placeholder to be a real vocabulary id. "
            f"Add one, e.g. tokenizer.add_tokens([{self.image_token!r}], special_tokens=True), and give the LLM "
            "that many embedding rows (model.resize_token_embeddings(len(tokenizer)))."
        )

    def replace(self, **changes) -> InfLlavaConfig:
        return dataclasses.replace(self, **changes)


TINY = InfLlavaConfig(
    name="tiny",
    image_size=(96, 96),
    grid=(3, 3),
    vision={  # a random CLIP vision tower: 32 px sub-images, 4 x 4 tokens each
        "kind": "random",
        "image_size": 32,
        "patch_size": 8,
        "hidden_size": 32,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
    },
    dem={"heads": 2},
    llm={
        "kind": "random",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
    },
)

LLAMA3_8B = InfLlavaConfig(
    name="llama3-8b",
    image_size=(1008, 1008),
    grid=(3, 3),
    vision={"kind": "pretrained", "path": None},  # INF_LLAVA_CLIP_DIR
    dem={"heads": 8},
    llm={"kind": "pretrained", "path": None},  # INF_LLAVA_LLM_DIR
    tokenizer="",  # the LLM directory
    # LLaMA-3 chat format; the tokenizer adds <|begin_of_text|> once at the start of a sample.
    prompt_template=(
        "<|start_header_id|>user<|end_header_id|>\n\n{question}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    answer_suffix="<|eot_id|>",
)

# LLaMA-3-8B's shape, checked against the loaded checkpoint (docs/released.md, fact 14).
LLAMA3_8B_SHAPE = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "rope_theta": 500000.0,
}

CONFIGS = {"tiny": TINY, "llama3-8b": LLAMA3_8B}


def get_config(name: str, *, llm_dir=None, clip_dir=None, weights=None) -> InfLlavaConfig:
    """Return the named configuration; for ``llama3-8b``, fill the local paths from the arguments or env."""
    if name not in CONFIGS:
        raise ValueError(f"get_config: unknown config {name!r}; choose one of {sorted(CONFIGS)}.")
    cfg = CONFIGS[name]
    if name == "llama3-8b":
        llm_dir = llm_dir or os.environ.get("INF_LLAVA_LLM_DIR")
        clip_dir = clip_dir or os.environ.get("INF_LLAVA_CLIP_DIR")
        weights = weights or os.environ.get("INF_LLAVA_WEIGHTS")
        if not llm_dir or not clip_dir:
            raise ValueError(
                "get_config('llama3-8b'): needs a local LLaMA-3-8B transformers directory and a local CLIP "
                f"ViT-L/14-336 directory; got llm_dir={llm_dir!r}, clip_dir={clip_dir!r}. Pass --llm-dir/"
                "--clip-dir or set INF_LLAVA_LLM_DIR/INF_LLAVA_CLIP_DIR (nothing is downloaded)."
            )
        cfg = cfg.replace(
            vision={**cfg.vision, "path": clip_dir},
            llm={**cfg.llm, "path": llm_dir},
            tokenizer=llm_dir,
            inf_llava_weights=weights,
        )
    return cfg


def build_tokenizer(cfg: InfLlavaConfig):
    """The tokenizer of ``cfg``: offline WordLevel for ``tiny``, a local directory otherwise.

    The offline tokenizer splits on whitespace and punctuation, knows :data:`TINY_WORDS`, and has the
    special tokens ``<pad> <unk> <s> </s>`` and the image token; it prepends ``<s>`` like LLaMA's.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if cfg.tokenizer != "offline":
        tok = AutoTokenizer.from_pretrained(cfg.tokenizer, local_files_only=True)
        if tok.pad_token is None:  # LLaMA-3 has none; padded positions are masked anyway
            tok.pad_token = tok.eos_token
        return tok

    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    specials = ["<pad>", "<unk>", "<s>", "</s>", cfg.image_token]
    vocab = {t: i for i, t in enumerate(specials + list(dict.fromkeys(TINY_WORDS)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=[cfg.image_token],
    )
