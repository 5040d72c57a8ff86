"""Answer a question about an image with INF-LLaVA (KV-cached decoding: the Llava model's own ``generate``).

Examples (from the repository root)::

    python examples/inf_llava/generate.py --config tiny --image outputs/sample.png --prompt "what is in the image ?"
    python examples/inf_llava/generate.py --config tiny --checkpoint runs/tiny-s2/checkpoint-300 \\
        --sample-image glyph.png --prompt "describe the image ."
    python examples/inf_llava/generate.py --config tiny --checkpoint runs/tiny-s2/checkpoint-300 \\
        --image glyph.png --prompt "where is the red cross ?"
    python examples/inf_llava/generate.py --config llama3-8b --llm-dir /models/inf-llava-llama3-8b \\
        --clip-dir /models/clip-vit-large-patch14-336 --weights /models/inf-llava-llama3-8b \\
        --image photo.jpg --prompt "What is written on the sign?"

With ``tiny`` and no checkpoint the weights are random and the text is meaningless: the run only
shows that the pipeline (crops, CLIP, DEM, projector, transformers' Llava merge and cached decoding) works
end to end.
After training on the glyph task it answers in that task's words (colour, shape, region).
Images of any size are fitted by the encoder (``HighResEncoder``: bicubic resize to the 3 x 3 canvas).

``--sample-image PATH`` writes a held-out glyph-task image (:data:`SAMPLE_INDEX`, never seen in training)
to ``PATH``, prints the answer it should get, and asks about it; a file already at ``PATH`` is kept when it
holds that image and refused otherwise (nothing else is overwritten). Every path is checked before the
model is built; a bad argument or path ends the script with one line on stderr and exit code 2.
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
from inf_llava.data import COLUMNS, ROWS, encode_prompts
from inf_llava.model import build_inf_llava, model_num_tokens
from inf_llava.script import (
    Parser,
    check_checkpoint,
    check_image_file,
    check_model_paths,
    check_out_dir,
    nonnegative_int,
    positive_int,
    run_script,
)

__all__ = [
    "load_image",
    "generate_ids",
    "answer",
    "eos_token_ids",
    "evaluate_glyphs",
    "write_sample_image",
    "parse_args",
    "main",
    "SAMPLE_INDEX",
]

#: The glyph-task sample ``--sample-image`` writes: the first held-out index of :func:`evaluate_glyphs`.
SAMPLE_INDEX = 10_000_000
#: The question whose answer names everything in a glyph image (colour, shape, region).
DESCRIBE = "describe the image ."

# End-of-turn tokens that end an answer besides the tokenizer's EOS (LLaMA-3: <|end_of_text|> is the EOS,
# but a chat turn, and our training answers, end with <|eot_id|>).
END_OF_TURN_TOKENS = ("<|eot_id|>",)


def load_image(path) -> torch.Tensor:
    """Read ``path`` as RGB: ``(3, H, W)`` float32 in ``[0, 1]`` at its own size (the encoder fits it).

    A file PIL cannot decode (truncated, corrupt, not an image) raises an ``OSError`` naming it."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as im:
            x = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except (OSError, SyntaxError, EOFError) as exc:
        raise OSError(
            f"image {str(path)!r} cannot be decoded ({type(exc).__name__}: {exc}): it is truncated, corrupt or not an "
            "image. Check the file, or pass another image."
        ) from exc
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


def _device(text: str) -> str:
    """``--device``: a torch device that is there (``cpu``, ``cuda``, ``cuda:N``)."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"--device {text!r} is not a torch device; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"--device {text!r}: torch finds no CUDA GPU; use --device cpu")
    return text


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(prog="generate.py", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    p.add_argument("--llm-dir")
    p.add_argument("--clip-dir")
    p.add_argument("--weights")
    p.add_argument("--checkpoint", action="append", default=[], help="trained weights; repeat: later ones win")
    p.add_argument("--image", action="append", default=[], help="image path; repeat for a batch")
    p.add_argument(
        "--sample-image",
        metavar="PATH",
        help="write a held-out glyph-task image to PATH (PNG; kept when PATH already holds it), print its answer, "
        "and ask about it too",
    )
    p.add_argument(
        "--prompt",
        action="append",
        default=[],
        help=f"question; one per image (each --image, then --sample-image) or one for all (default with only "
        f"--sample-image: {DESCRIBE!r})",
    )
    p.add_argument(
        "--eval-glyphs",
        type=nonnegative_int("--eval-glyphs", "300"),
        default=0,
        help="also score N held-out glyph-task samples",
    )
    p.add_argument("--seed", type=int, default=0, help="glyph task seed for --eval-glyphs (as train.py's)")
    p.add_argument(
        "--glyph-size",
        type=positive_int("--glyph-size", "12"),
        default=None,
        help="glyph side for --eval-glyphs and --sample-image (as train.py's)",
    )
    p.add_argument("--max-new-tokens", type=positive_int("--max-new-tokens", "32"), default=32)
    p.add_argument("--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--traceback", action="store_true", help="show the traceback of an error (default: one line)")
    args = p.parse_args(argv)
    n_images = len(args.image) + bool(args.sample_image)
    if not n_images and not args.eval_glyphs:
        p.error("pass --image (or --sample-image PATH) and --prompt, or --eval-glyphs N")
    if not args.prompt and args.sample_image and not args.image:
        args.prompt = [DESCRIBE]
    if len(args.prompt) == 1:
        args.prompt = args.prompt * n_images
    if len(args.prompt) != n_images:
        p.error(
            f"--prompt is given {len(args.prompt)} time(s) for {n_images} image(s); pass one --prompt per image "
            "(each --image in order, then --sample-image), or one --prompt for all"
        )
    return args


def write_sample_image(path, cfg, *, seed: int = 0, glyph_size: int | None = None, index: int = SAMPLE_INDEX):
    """Write held-out glyph-task sample ``index`` (never seen in training) to ``path`` as an 8-bit PNG.

    Returns ``(sample, wrote)``. A file already at ``path`` is kept when it holds exactly this sample
    (``wrote=False``: the doc's commands can be run again) and refused otherwise (``FileExistsError``), so no
    other file is ever overwritten.
    """
    import numpy as np
    from PIL import Image

    from inf_llava.data import GlyphTask

    sample = GlyphTask(cfg.image_size, glyph_size=glyph_size, seed=seed).sample(index)
    pixels = (sample.image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"--sample-image {str(path)!r} is a directory. Pass a file name, e.g. glyph.png.")
    if p.exists():
        try:
            with Image.open(p) as im:
                same = im.size == (pixels.shape[1], pixels.shape[0]) and np.array_equal(
                    np.asarray(im.convert("RGB")), pixels
                )
        except (OSError, SyntaxError, ValueError):
            same = False
        if not same:
            raise FileExistsError(
                f"--sample-image {str(path)!r} exists and is not glyph sample {index} (seed {seed}, config "
                f"{cfg.name!r}); it is left as it is. Pass --image {str(path)!r} to ask about that file, or another "
                "--sample-image path."
            )
        return sample, False
    check_out_dir(p.parent, "--sample-image")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(p, format="PNG")
    except OSError as exc:
        raise OSError(f"--sample-image {str(path)!r} cannot be written ({exc}). Pass another path.") from exc
    return sample, True


def _run(argv) -> list[str]:
    args = parse_args(argv)
    cfg = get_config(args.config, llm_dir=args.llm_dir, clip_dir=args.clip_dir, weights=args.weights)
    # Every path before the model is built: the config's directories, the checkpoints, the images.
    check_model_paths(cfg)
    for ckpt in args.checkpoint:
        check_checkpoint(ckpt, "--checkpoint")
    for path in args.image:
        check_image_file(path, "--image")
    if args.glyph_size and 3 * args.glyph_size > min(cfg.image_size):
        raise ValueError(
            f"--glyph-size {args.glyph_size}: three glyphs must fit across the {cfg.image_size[1]}x{cfg.image_size[0]} "
            f"canvas of config {cfg.name!r}; use at most --glyph-size {min(cfg.image_size) // 3}."
        )
    paths = list(args.image)
    if args.sample_image:
        sample, wrote = write_sample_image(args.sample_image, cfg, seed=args.seed, glyph_size=args.glyph_size)
        truth = f"a {sample.colour} {sample.shape} at the {ROWS[sample.row]} {COLUMNS[sample.column]}"
        print(
            f"{'wrote' if wrote else 'kept'} {args.sample_image}: held-out glyph-task sample {SAMPLE_INDEX} (seed "
            f"{args.seed}); the answer to {DESCRIBE!r} is {truth!r}"
        )
        paths.append(args.sample_image)
    tokenizer = build_tokenizer(cfg)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else None
    model = build_inf_llava(cfg, tokenizer, llm_dtype=dtype)
    for ckpt in args.checkpoint:
        load_trained_weights(ckpt, model)
    model.to(args.device).eval()
    images = [load_image(path) for path in paths]
    with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=dtype is not None):
        texts = answer(model, tokenizer, cfg, images, args.prompt, max_new_tokens=args.max_new_tokens) if images else []
        if args.eval_glyphs:
            acc = evaluate_glyphs(model, tokenizer, cfg, args.eval_glyphs, seed=args.seed, glyph_size=args.glyph_size)
            print("glyph task, exact-match accuracy: " + ", ".join(f"{k} {v:.1%}" for k, v in acc.items()))
    if cfg.name == "tiny" and not args.checkpoint:
        print("# tiny config with random weights: the text below is meaningless by construction.")
    for path, q, t in zip(paths, args.prompt, texts):
        print(f"{path} | {q} -> {t}")
    return texts


def main(argv=None) -> list[str]:
    """The script: answers (one per image) printed and returned; a bad argument or path ends it with one line
    on stderr and exit code 2 (``--traceback`` shows the traceback)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_script(_run, argv, "generate.py", traceback="--traceback" in argv)


if __name__ == "__main__":
    main()
