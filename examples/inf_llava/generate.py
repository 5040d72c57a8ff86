"""Answer a question about an image with INF-LLaVA (KV-cached decoding: the Llava model's own ``generate``).

Examples (from the repository root)::

    python examples/inf_llava/generate.py --config tiny --image outputs/sample.png --prompt "what is in the image ?"
    python examples/inf_llava/generate.py --config tiny --checkpoint runs/tiny-s2/checkpoint-300 \\
        --image glyph.png --prompt "describe the image ."
    python examples/inf_llava/generate.py --config llama3-8b --llm-dir /models/inf-llava-llama3-8b \\
        --clip-dir /models/clip-vit-large-patch14-336 --weights /models/inf-llava-llama3-8b \\
        --image photo.jpg --prompt "What is written on the sign?"

With ``tiny`` and no checkpoint the weights are random and the text is meaningless: the run only
shows that the pipeline (crops, CLIP, DEM, projector, transformers' Llava merge and cached decoding) works
end to end.
After training on the glyph task it answers in that task's words (colour, shape, region).
Images of any size are fitted by the encoder (``HighResEncoder``: bicubic resize to the 3 x 3 canvas).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `inf_llava` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from inf_llava.checkpoint import load_trained_weights
from inf_llava.configs import CONFIGS, build_tokenizer, get_config
from inf_llava.data import encode_prompts
from inf_llava.model import build_inf_llava, model_num_tokens

__all__ = ["load_image", "generate_ids", "answer", "eos_token_ids", "evaluate_glyphs", "main"]

# End-of-turn tokens that end an answer besides the tokenizer's EOS (LLaMA-3: <|end_of_text|> is the EOS,
# but a chat turn, and our training answers, end with <|eot_id|>).
END_OF_TURN_TOKENS = ("<|eot_id|>",)


def load_image(path) -> torch.Tensor:
    """Read ``path`` as RGB: ``(3, H, W)`` float32 in ``[0, 1]`` at its own size (the encoder fits it)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        x = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(x).permute(2, 0, 1).contiguous()


def eos_token_ids(tokenizer, cfg=None) -> list[int]:
    """Token ids that end an answer: the tokenizer's EOS, then every end-of-turn token it knows.

    End-of-turn tokens are :data:`END_OF_TURN_TOKENS` and ``cfg.answer_suffix`` (what training appends
    to each answer) when it is one token. For LLaMA-3 this gives ``[<|end_of_text|>, <|eot_id|>]``, so
    a base LLaMA-3 tokenizer (whose EOS is ``<|end_of_text|>``) still stops at the end of the answer;
    for ``tiny`` it is ``[</s>]``.
    """
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    names = list(END_OF_TURN_TOKENS)
    if cfg is not None and cfg.answer_suffix.strip():
        names.append(cfg.answer_suffix.strip())
    for name in names:
        tid = tokenizer.convert_tokens_to_ids(name)  # unknown: None or the unk id
        if tid is not None and tid != tokenizer.unk_token_id and tid not in ids:
            ids.append(int(tid))
    return ids


@torch.no_grad()
def generate_ids(model, tokenizer, cfg, images, questions: list[str], **generate_kwargs) -> torch.Tensor:
    """The new token ids ``(B, n_new)`` of ``model.generate`` (transformers' decoding with the KV cache)
    for one ``(image, question)`` per row; the prompt, which ``generate`` returns first, is cut off.

    ``images``: ``(B, 3, H, W)`` in ``[0, 1]`` or a list of ``(3, H_b, W_b)`` of any sizes. Defaults: greedy,
    32 new tokens, stop at any of :func:`eos_token_ids`; ``generate_kwargs`` override them.
    """
    if len(images) != len(questions):
        raise ValueError(
            f"answer: got {len(images)} image(s) for {len(questions)} question(s); pass one image per question."
        )
    inputs = encode_prompts(tokenizer, cfg, questions, images, model_num_tokens(model))
    generate_kwargs.setdefault("max_new_tokens", 32)
    generate_kwargs.setdefault("do_sample", False)
    generate_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    generate_kwargs.setdefault("eos_token_id", eos_token_ids(tokenizer, cfg))
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    out = model.generate(**inputs, **generate_kwargs)
    return out[:, inputs["input_ids"].shape[1] :]


def answer(model, tokenizer, cfg, images, questions: list[str], **generate_kwargs) -> list[str]:
    """One answer per ``(image, question)`` (see :func:`generate_ids` for the arguments)."""
    new = generate_ids(model, tokenizer, cfg, images, questions, **generate_kwargs)
    return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]


def evaluate_glyphs(
    model,
    tokenizer,
    cfg,
    n: int = 200,
    first_index: int = 10_000_000,
    batch_size: int = 50,
    *,
    seed: int = 0,
    glyph_size: int | None = None,
) -> dict:
    """Exact-match accuracy of greedy answers on ``n`` held-out glyph samples (indices from ``first_index``,
    never seen in training), overall and per question kind. Blind guessing scores 1/24, 1/9 and 1/216.

    ``seed`` and ``glyph_size`` select the task variant, as ``train.py --seed / --glyph-size`` do."""
    from inf_llava.data import GlyphTask

    task = GlyphTask(cfg.image_size, glyph_size=glyph_size, seed=seed)
    hits: dict[str, list[bool]] = {"what": [], "where": [], "describe": []}
    for start in range(first_index, first_index + n, batch_size):
        samples = task.batch(range(start, min(start + batch_size, first_index + n)))
        images = torch.stack([s.image for s in samples])
        texts = answer(model, tokenizer, cfg, images, [s.question for s in samples], max_new_tokens=12)
        for s, t in zip(samples, texts):
            hits[s.question.split()[0]].append(t == s.answer)
    every = [h for v in hits.values() for h in v]
    return {"all": sum(every) / len(every), **{k: sum(v) / max(1, len(v)) for k, v in hits.items()}}


def main(argv=None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    p.add_argument("--llm-dir")
    p.add_argument("--clip-dir")
    p.add_argument("--weights")
    p.add_argument(
        "--checkpoint", action="append", default=[], help="trained weights; repeat: later ones win"
    )
    p.add_argument("--image", action="append", default=[], help="image path; repeat for a batch")
    p.add_argument("--prompt", action="append", default=[], help="question; one per --image (or all)")
    p.add_argument("--eval-glyphs", type=int, default=0, help="also score N held-out glyph-task samples")
    p.add_argument("--seed", type=int, default=0, help="glyph task seed for --eval-glyphs (as train.py's)")
    p.add_argument("--glyph-size", type=int, default=None, help="glyph side for --eval-glyphs (as train.py's)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if not args.image and not args.eval_glyphs:
        p.error("give --image and --prompt, or --eval-glyphs N")
    if len(args.prompt) == 1:
        args.prompt = args.prompt * len(args.image)
    cfg = get_config(args.config, llm_dir=args.llm_dir, clip_dir=args.clip_dir, weights=args.weights)
    tokenizer = build_tokenizer(cfg)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else None
    model = build_inf_llava(cfg, tokenizer, llm_dtype=dtype)
    for ckpt in args.checkpoint:
        load_trained_weights(ckpt, model)
    model.to(args.device).eval()
    images = [load_image(path) for path in args.image]
    with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=dtype is not None):
        texts = (
            answer(model, tokenizer, cfg, images, args.prompt, max_new_tokens=args.max_new_tokens)
            if images
            else []
        )
        if args.eval_glyphs:
            acc = evaluate_glyphs(
                model, tokenizer, cfg, args.eval_glyphs, seed=args.seed, glyph_size=args.glyph_size
            )
            print("glyph task, exact-match accuracy: " + ", ".join(f"{k} {v:.1%}" for k, v in acc.items()))
    if cfg.name == "tiny" and not args.checkpoint:
        print("# tiny config with random weights: the text below is meaningless by construction.")
    for path, q, t in zip(args.image, args.prompt, texts):
        print(f"{path} | {q} -> {t}")
    return texts


if __name__ == "__main__":
    main()
