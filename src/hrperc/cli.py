"""Command line: ``hrperc demo`` (the README's main job) and friends.

``hrperc demo [IMAGE] [--out DIR] [--grid auto|GHxGW] [--tile-size 336] [--max-tiles 12]`` crops an image
(by default a generated 1344 x 1008 sample with fine text) both ways, writes ``crops.png`` and prints the
geometry and the token accounting, then runs the whole encoder on it (see :mod:`hrperc.encode_cli`).
When the encoder runs, tile and patch size are the built backbone's own (``--tile-size`` only sets the
size a timm ViT is built at), so the crop half and the encoder half describe the same geometry.
``python -m hrperc`` is the same program.

Errors from the library (bad options, missing files or packages) end the program with a one-line
message and exit code 2; ``hrperc --traceback ...`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

__all__ = ["main", "build_parser", "load_image"]


def load_image(path) -> torch.Tensor:
    """Read an image file as a float ``(3, H, W)`` tensor in [0, 1]."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)


def _parse_grid(text: str):
    if text in ("auto", "floor"):
        return text
    try:
        gh, gw = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--grid {text!r}: use 'auto', 'floor' or ROWSxCOLS, e.g. 3x3") from None
    return (gh, gw)


def build_parser() -> argparse.ArgumentParser:
    from .encode_cli import add_demo_encoder_arguments, add_encode_parser

    parser = argparse.ArgumentParser(prog="hrperc", description="High-resolution perception for MLLMs.")
    parser.add_argument("--traceback", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="crop a high-resolution image both ways and draw the result")
    demo.add_argument("image", nargs="?", help="image file (default: a generated 1344x1008 sample)")
    demo.add_argument("--out", default="outputs", help="folder for the pictures (default: outputs)")
    demo.add_argument("--grid", type=_parse_grid, default="auto", help="auto, floor or ROWSxCOLS (default auto)")
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


def run_demo(args) -> int:
    from .dual_crop import DualPerspectiveCrop
    from .sample import make_sample_image
    from .viz import plot_crops

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.image:
        image = load_image(args.image)
        source = args.image
    else:
        pil = make_sample_image()
        pil.save(out / "sample.png")
        image = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float().div_(255.0)
        source = f"generated sample ({out / 'sample.png'})"
    enc, notes = None, []
    if args.no_encode:
        tile = args.tile_size or 336
        ph = pw = args.patch_size or 14
        dcm = DualPerspectiveCrop(grid=args.grid, tile_size=tile, max_tiles=args.max_tiles)
    else:
        # Build the encoder first: the crops and the token accounting then use the backbone's own tile and
        # patch size and the encoder's own crop module, so both halves of the demo describe the same thing.
        from .encode_cli import build_encoder

        enc = build_encoder(args, args.grid, args.max_tiles, tile_size=args.tile_size or 336)
        dcm = enc.crop
        (th_px, tw_px), (ph, pw) = enc.backbone.image_size, enc.backbone.patch_size
        if args.tile_size is not None and (th_px, tw_px) != (args.tile_size, args.tile_size):
            notes.append(f"--tile-size {args.tile_size} ignored: {args.backbone} has {tw_px}x{th_px} tiles")
        if args.patch_size is not None and (ph, pw) != (args.patch_size, args.patch_size):
            notes.append(f"--patch-size {args.patch_size} ignored: {args.backbone} has {pw}x{ph} patches")
    t0 = time.perf_counter()
    crops = dcm(image)
    t_crop = time.perf_counter() - t0
    geo = crops.geometries[0]
    gh, gw = geo.grid
    n = gh * gw
    h, w = geo.tile_size
    th, tw = h // ph, w // pw
    per_view = th * tw
    patch = f"{ph}" if ph == pw else f"{ph}x{pw}"
    print(f"image        {source}: {image.shape[2]}x{image.shape[1]} (W x H)")
    for note in notes:
        print(f"note         {note}")
    print(f"policy       grid={args.grid!r} max_tiles={args.max_tiles} fit={dcm.fit} -> grid {gh}x{gw} (N={n})")
    print(f"canvas       {geo.canvas_size[1]}x{geo.canvas_size[0]}, tiles {w}x{h}, valid box {geo.valid_box}")
    print(f"sub-images   {n} local + {n} strided + 1 thumbnail = {2 * n + 1} ViT inputs "
          f"({tuple(crops.local.shape)} each stack), cropped in {t_crop * 1e3:.1f} ms")
    print(f"tokens       patch {patch}: {per_view} per sub-image; local map {gh * th}x{gw * tw} = {n * per_view}, "
          f"global map {n * per_view}, thumbnail {per_view}")
    if enc is None:
        print(f"             after DEM + reduction to {th}x{tw}: {per_view}; mean with thumbnail: {per_view} "
              f"tokens to the LLM (concat: {2 * per_view})")
    else:
        layout = ", ".join(f"{seg.source} {seg.length}" for seg in enc._layout(geo.grid))
        print(f"             to the LLM: {enc.num_tokens(geo.input_size)} tokens ({layout}; combine={enc.combine!r})")
    fig_path = out / "crops.png"
    plot_crops(image, crops, path=fig_path)
    print(f"wrote        {fig_path}")
    if enc is not None:
        from .encode_cli import demo_encoder

        dem = "DEM" if enc.dem is not None else "no DEM"
        print(f"encoder      the whole front end: crops -> ViT (one batched pass) -> {dem} -> combine={enc.combine!r}")
        demo_encoder(args, image, out, enc=enc)
    return 0


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
