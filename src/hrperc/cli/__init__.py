"""Command line: ``hrperc demo`` (the README's main job) and friends.

``hrperc demo [IMAGE] [--out DIR] [--grid auto|GHxGW] [--tile-size 336] [--max-tiles 12]`` crops an image
(by default a generated 1344 x 1008 sample with fine text) both ways, writes ``crops.png`` and prints the
geometry and the token accounting, then runs the whole encoder on it (see :mod:`hrperc.cli.encode`).
When the encoder runs, tile and patch size are the built backbone's own (``--tile-size`` only sets the
size a timm ViT is built at), so the crop half and the encoder half describe the same geometry.
``python -m hrperc`` is the same program. Pictures need matplotlib (``pip install 'hrperc[plot]'``);
without it they are skipped with one line and everything else runs.

This package (the command line, the pictures, the generated sample image) is never imported by the
rest of hrperc.

Errors from the library (bad options, missing files or packages) end the program with a one-line
message and exit code 2; ``hrperc --traceback ...`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys

from .args import parse_grid

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    from .demo import run_demo
    from .encode import add_demo_encoder_arguments, add_encode_parser

    parser = argparse.ArgumentParser(prog="hrperc", description="High-resolution perception for MLLMs.")
    parser.add_argument("--traceback", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="crop a high-resolution image both ways and draw the result")
    demo.add_argument("image", nargs="?", help="image file (default: a generated 1344x1008 sample)")
    demo.add_argument("--out", default="outputs", help="folder for the pictures (default: outputs)")
    demo.add_argument("--grid", type=parse_grid, default="auto", help="auto, floor or ROWSxCOLS (default auto)")
    demo.add_argument(
        "--tile-size", type=int, default=None,
        help="sub-image side in pixels (default 336; with the encoder: the size a timm ViT is built at, "
        "other backbones use their native size)",
    )  # fmt: skip
    demo.add_argument("--max-tiles", type=int, default=12, help="tile budget for --grid auto (default 12)")
    demo.add_argument(
        "--patch-size", type=int, default=None,
        help="ViT patch size for the token accounting with --no-encode (default 14; otherwise the backbone's)",
    )  # fmt: skip
    add_demo_encoder_arguments(demo)
    demo.set_defaults(func=run_demo)
    add_encode_parser(sub)
    return parser


# What the library raises for bad input (options, files, missing packages): one line, not a traceback.
_USER_ERRORS = (ValueError, TypeError, OSError, ImportError)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _USER_ERRORS as e:
        if args.traceback:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"hrperc {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
