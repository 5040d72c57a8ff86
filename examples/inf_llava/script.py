"""What ``train.py`` and ``generate.py`` share as command lines: one-line errors, argument types, path checks.

A bad argument or path ends a script with one line on stderr, ``<script>: error: <what, the value, the fix>``,
and exit code 2 (argparse's convention), never a traceback; ``--traceback`` shows the traceback instead.
Paths are checked before any model is built: images by their header (``PIL.Image.open(...).verify()``),
checkpoints and weight files by their safetensors header, directories by the files they must hold.

Example::

    >>> from inf_llava.script import positive_int
    >>> positive_int("--steps")("300")
    300
    >>> positive_int("--steps")("0")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: --steps '0': use a positive integer, e.g. --steps 300
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

__all__ = [
    "Parser",
    "run_script",
    "positive_int",
    "nonnegative_int",
    "positive_float",
    "nonnegative_float",
    "fraction",
    "check_image_file",
    "check_weights_file",
    "check_checkpoint",
    "check_out_dir",
    "check_model_paths",
]

# What a bad argument, path or file raises in the example and the libraries under it (not a bug of the script).
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, OSError, ImportError, EOFError)
try:
    from safetensors import SafetensorError

    USER_ERRORS += (SafetensorError,)
except ImportError:  # pragma: no cover - safetensors is a dependency
    pass


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (``train.py: error: ...``), exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def run_script(fn, argv, prog: str, traceback: bool = False):
    """``fn(argv)``; a :data:`USER_ERRORS` exception becomes one line on stderr and ``SystemExit(2)``
    (with ``traceback`` it is raised as it is)."""
    try:
        return fn(argv)
    except USER_ERRORS as exc:
        if traceback:
            raise
        from hrperc.cli import one_line

        message = one_line(exc)
        message = message[len(prog) + 2 :] if message.startswith(f"{prog}: ") else message  # said once
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _number(flag: str, cast, ok, rule: str, example: str):
    def parse(text: str):
        try:
            value = cast(text)
        except (TypeError, ValueError):
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: use {rule}, e.g. {flag} {example}")
        return value

    parse.__name__ = flag.lstrip("-").replace("-", "_")  # argparse names the type in some messages
    return parse


def positive_int(flag: str, example: str = "300"):
    """argparse ``type``: an integer >= 1, else a one-line error naming ``flag`` and the value."""
    return _number(flag, int, lambda v: v >= 1, "a positive integer", example)


def nonnegative_int(flag: str, example: str = "0"):
    """argparse ``type``: an integer >= 0."""
    return _number(flag, int, lambda v: v >= 0, "an integer >= 0", example)


def positive_float(flag: str, example: str = "1e-3"):
    """argparse ``type``: a finite number > 0."""
    return _number(flag, float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0", example)


def nonnegative_float(flag: str, example: str = "0.0"):
    """argparse ``type``: a finite number >= 0."""
    return _number(flag, float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0", example)


def fraction(flag: str, example: str = "0.03"):
    """argparse ``type``: a number in ``[0, 1]``."""
    return _number(flag, float, lambda v: 0 <= v <= 1, "a number from 0 to 1", example)


def _exists(path: Path, flag: str, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{flag} {str(path)!r}: there is no {what} there. Check the path.")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"{flag} {str(path)!r} is not readable (permission denied). Check its permissions.")


def check_image_file(path, flag: str = "--image") -> None:
    """An image file PIL recognises, whose structure ``verify()`` accepts (nothing is decoded)."""
    from PIL import Image

    p = Path(path)
    _exists(p, flag, "image file")
    if p.is_dir():
        raise IsADirectoryError(f"{flag} {str(p)!r} is a directory, not an image file. Pass the image inside it.")
    try:
        with Image.open(p) as im:
            im.verify()
    except Image.DecompressionBombError as exc:
        raise ValueError(
            f"{flag} {str(p)!r}: PIL refused it as a possible decompression bomb ({exc}). Pass a smaller image, or "
            "raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file."
        ) from exc
    except (OSError, SyntaxError, EOFError, ValueError) as exc:
        raise OSError(
            f"{flag} {str(p)!r} cannot be read as an image ({type(exc).__name__}: {exc}). Check the file, or pass "
            "another image."
        ) from exc


def check_weights_file(path, flag: str) -> None:
    """A safetensors file whose header reads (cheap: the tensors are not loaded)."""
    from safetensors import safe_open

    p = Path(path)
    _exists(p, flag, "file")
    if p.is_dir():
        raise IsADirectoryError(f"{flag} {str(p)!r} is a directory; pass the .safetensors file inside it.")
    try:
        with safe_open(str(p), framework="pt") as f:
            f.keys()
    except Exception as exc:  # SafetensorError, OSError: a foreign, truncated or empty file
        raise ValueError(
            f"{flag} {str(p)!r} is not a readable safetensors file ({type(exc).__name__}: {exc}). Check that it is "
            "what train.py wrote (checkpoint-<step>/model.safetensors), or pass another file."
        ) from exc


def check_checkpoint(path, flag: str, *, resume: bool = False) -> None:
    """A ``checkpoint-<step>`` directory of ``train.py`` (or, unless ``resume``, its ``model.safetensors``)."""
    p = Path(path)
    _exists(p, flag, "checkpoint")
    if not p.is_dir():
        if resume:
            raise NotADirectoryError(
                f"{flag} {str(p)!r} is a file; resume from a checkpoint directory (checkpoint-<step>/, with the "
                "optimizer state), or pass --resume auto."
            )
        check_weights_file(p, flag)
        return
    needed = ["model.safetensors"] + (["optimizer.safetensors", "trainer_state.json"] if resume else [])
    missing = [n for n in needed if not (p / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{flag} {str(p)!r} lacks {', '.join(missing)}: it is not a checkpoint directory written by train.py. "
            f"Pass a checkpoint-<step> directory (e.g. {str(p / 'checkpoint-300')!r})."
        )
    check_weights_file(p / "model.safetensors", flag)


def check_out_dir(path, flag: str) -> None:
    """A directory, or a path where one can be created (no file in the way)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise NotADirectoryError(f"{flag} {str(p)!r} is a file, not a directory. Pass a directory.")
    existing = p
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"{flag} {str(p)!r}: {str(existing)!r} is a file. Pass another {flag}.")
    if not os.access(existing, os.W_OK):
        raise PermissionError(f"{flag} {str(p)!r}: {str(existing)!r} is not writable. Pass another {flag}.")


def check_model_paths(cfg) -> None:
    """The local directories and weights of a config (``llama3-8b``: ``--llm-dir``, ``--clip-dir``, ``--weights``
    or their environment variables), before anything is loaded."""
    where = {
        "--llm-dir / INF_LLAVA_LLM_DIR": cfg.llm.get("path") if cfg.llm.get("kind") == "pretrained" else None,
        "--clip-dir / INF_LLAVA_CLIP_DIR": cfg.vision.get("path") if cfg.vision.get("kind") == "pretrained" else None,
    }
    for flag, path in where.items():
        if path is None:
            continue
        p = Path(path)
        _exists(p, flag, "directory")
        if not (p / "config.json").is_file():
            raise FileNotFoundError(
                f"{flag} {str(p)!r} has no config.json: it is not a transformers model directory. Pass the folder "
                "save_pretrained (or huggingface-cli download --local-dir) wrote."
            )
    if cfg.inf_llava_weights:
        p = Path(cfg.inf_llava_weights)
        _exists(p, "--weights / INF_LLAVA_WEIGHTS", "file or directory")
        if p.is_file() and p.suffix == ".safetensors":
            check_weights_file(p, "--weights / INF_LLAVA_WEIGHTS")
