"""Command line: ``hrperc demo`` (the README's main job), ``hrperc encode``, ``hrperc recipes``.

``hrperc encode IMAGE... [--recipe NAME] [--option KEY=VALUE ...] [--save FILE.safetensors]`` runs any tiling
recipe around a ``--backbone`` (default ``inf_llava``, the released INF-LLaVA front end) and prints each
image's plan and tokens (:mod:`hrperc.cli.encode`, :mod:`hrperc.cli.save`); ``hrperc recipes [NAME ...]``
lists the recipes with their options, types and defaults, read from each recipe's own declaration
(:mod:`hrperc.cli.recipes`); ``hrperc --version`` prints the version.

``hrperc demo [IMAGE] [--out DIR] [--grid auto|GHxGW] [--tile-size 336] [--max-tiles 12]`` crops an image
(by default a generated 1344 x 1008 sample with fine text) both ways, writes ``crops.png`` and prints the
geometry and the token accounting, then runs the whole encoder on it (see :mod:`hrperc.cli.encode`).
When the encoder runs, tile and patch size are the built backbone's own (``--tile-size`` only sets the
size a timm ViT is built at), so the crop half and the encoder half describe the same geometry.
``python -m hrperc`` is the same program. Pictures need matplotlib (``pip install 'hrperc[plot]'``);
without it they are skipped with one line and everything else runs.

This package (the command line, the pictures, the generated sample image) is never imported by the
rest of hrperc.

Every input file (images, ``--weights``, ``--dem-weights``, an ``hf:<dir>`` backbone, ``--out``) is checked
before any model is built (:mod:`hrperc.cli.inputs`), and the work is bounded before anything is allocated:
the canvas an image gets is at most what it needs (:mod:`hrperc.cli.limits`; ``--max-canvas-pixels``
changes the limit), ``--tile-size`` is at most 2048. The output says which weights were loaded, and from
where (backbone: random or the file; DEM: random or the file).

Errors from the library (bad options, missing, truncated or foreign files, decompression bombs, missing
packages, an unavailable device or attention backend), the limits and usage errors end the program with a
one-line message and exit code 2; ``hrperc --traceback ...`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys

from .args import parse_grid, positive_int
from .limits import MAX_TILE_SIZE

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    from .._version import __version__
    from ..recipes import list_recipes
    from .demo import run_demo
    from .encode import add_demo_encoder_arguments, add_encode_parser
    from .recipes import run_recipes

    parser = _Parser(prog="hrperc", description="High-resolution perception for MLLMs.")
    parser.add_argument("--version", action="version", version=f"hrperc {__version__}")
    parser.add_argument("--traceback", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="crop a high-resolution image both ways and draw the result",
        description="Crop an image (default: a generated sample) with INF-LLaVA's dual-perspective crops, write "
        "crops.png, print the geometry and token accounting, then run the whole encoder and draw the DEM's "
        "attention.",
    )
    demo.add_argument("image", nargs="?", help="image file (default: a generated 1344x1008 sample)")
    demo.add_argument("--out", default="outputs", help="folder for the pictures (default: outputs)")
    demo.add_argument("--grid", type=parse_grid, default="auto", help="auto, floor or ROWSxCOLS (default auto)")
    demo.add_argument(
        "--tile-size",
        type=positive_int("--tile-size", MAX_TILE_SIZE, "real ViT tiles are 224 to 1024 pixels"),
        default=None,
        help=f"sub-image side in pixels, at most {MAX_TILE_SIZE} (default 336; with the encoder: the size a timm ViT "
        "is built at, other backbones use their native size)",
    )
    demo.add_argument(
        "--max-tiles", type=positive_int("--max-tiles"), default=12, help="tile budget for --grid auto (default 12)"
    )
    demo.add_argument(
        "--patch-size",
        type=positive_int("--patch-size"),
        default=None,
        help="ViT patch size for the token accounting with --no-encode (default 14; otherwise the backbone's)",
    )
    add_demo_encoder_arguments(demo)
    demo.set_defaults(func=run_demo)
    add_encode_parser(sub)
    recipes = sub.add_parser(
        "recipes",
        help="list the recipes with their options and defaults",
        description="List the recipes (hrperc encode --recipe NAME) with their options, types and defaults, as "
        "each recipe declares them.",
    )
    recipes.add_argument(
        "names", nargs="*", metavar="NAME", help=f"only these recipes, of {', '.join(list_recipes())} (default: all)"
    )
    recipes.set_defaults(func=run_recipes)
    return parser


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (``hrperc demo: error: ...``), exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


# What the library raises for bad input (options, files, missing packages): one line, not a traceback.
_USER_ERRORS = (ValueError, TypeError, OSError, ImportError)

# A one-line message longer than this keeps its start (the file, the counts) and its end (the fix).
_MAX_MESSAGE = 600


def _user_errors() -> tuple[type[BaseException], ...]:
    """:data:`_USER_ERRORS` plus the errors of the file readers and the backend dispatcher for bad input.

    Truncated or foreign files: safetensors' ``SafetensorError`` (raised from inside other libraries' loaders,
    e.g. transformers' ``from_pretrained`` of an ``hf:`` folder), torch's ``EOFError`` and
    ``pickle.UnpicklingError``; PIL's ``DecompressionBombError``; a forced attention backend that cannot run
    (:class:`hrperc.attention.dispatch.BackendUnavailableError`). Each only when its package is importable.
    """
    import pickle

    from ..attention.dispatch import BackendUnavailableError

    errors: list[type[BaseException]] = [*_USER_ERRORS, EOFError, pickle.UnpicklingError, BackendUnavailableError]
    safetensors_error = _safetensors_error()
    if safetensors_error is not None:
        errors.append(safetensors_error)
    try:
        from PIL.Image import DecompressionBombError

        errors.append(DecompressionBombError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def _safetensors_error() -> type[BaseException] | None:
    """``safetensors.SafetensorError`` (what safetensors raises for a malformed file), or None without it."""
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - safetensors is a dependency
        return None
    return SafetensorError


def _explain(exc: BaseException) -> str:
    """The message of ``exc``, with what it means and the fix where the raising library gives neither."""
    error = _safetensors_error()
    if error is not None and isinstance(exc, error):
        # safetensors names neither the file nor a fix ("Error while deserializing header: ...")
        return (
            f"a safetensors weight file could not be read (safetensors: {exc}): it is truncated, corrupt or not a "
            "safetensors file. Check the weight files the backbone loads (an hf: folder's *.safetensors, --weights): "
            "fetch them again."
        )
    return str(exc)


def one_line(exc: BaseException, limit: int = _MAX_MESSAGE) -> str:
    """``exc``'s message (with the fix, where the raising library gives none) on one line; past ``limit``
    characters, its start and end around ``...``."""
    message = " ".join(_explain(exc).split()) or type(exc).__name__
    if len(message) > limit:
        head, tail = message[: limit * 2 // 3], message[-(limit // 3) :]
        cut = len(message) - len(head) - len(tail)
        message = f"{head} ... [{cut} characters cut; hrperc --traceback shows all] ... {tail}"
    return message


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # usage errors (one line, exit 2) and --help (exit 0)
        return 0 if e.code is None else e.code if isinstance(e.code, int) else 2
    try:
        return args.func(args)
    except _user_errors() as e:
        if args.traceback:
            raise
        print(f"hrperc {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
