"""Command line: ``hrperc demo`` (the README's main job) and friends.

``hrperc demo [IMAGE] [--out DIR] [--grid auto|GHxGW] [--tile-size 336] [--max-tiles 12]`` crops an image
(by default a generated 1344 x 1008 sample with fine text) both ways, writes ``crops.png`` and prints the
geometry and the token accounting. ``python -m hrperc`` is the same program.
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
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="crop a high-resolution image both ways and draw the result")
    demo.add_argument("image", nargs="?", help="image file (default: a generated 1344x1008 sample)")
    demo.add_argument("--out", default="outputs", help="folder for the pictures (default: outputs)")
    demo.add_argument("--grid", type=_parse_grid, default="auto", help="auto, floor or ROWSxCOLS (default auto)")
    demo.add_argument("--tile-size", type=int, default=336, help="sub-image side in pixels (default 336)")
    demo.add_argument("--max-tiles", type=int, default=12, help="tile budget for --grid auto (default 12)")
    demo.add_argument("--patch-size", type=int, default=14, help="ViT patch size for token accounting")
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
    dcm = DualPerspectiveCrop(grid=args.grid, tile_size=args.tile_size, max_tiles=args.max_tiles)
    t0 = time.perf_counter()
    crops = dcm(image)
    t_crop = time.perf_counter() - t0
    geo = crops.geometries[0]
    gh, gw = geo.grid
    n = gh * gw
    h, w = geo.tile_size
    p = args.patch_size
    per_view = (h // p) * (w // p)
    print(f"image        {source}: {image.shape[2]}x{image.shape[1]} (W x H)")
    print(f"policy       grid={args.grid!r} max_tiles={args.max_tiles} fit={dcm.fit} -> grid {gh}x{gw} (N={n})")
    print(f"canvas       {geo.canvas_size[1]}x{geo.canvas_size[0]}, tiles {w}x{h}, valid box {geo.valid_box}")
    print(f"sub-images   {n} local + {n} strided + 1 thumbnail = {2 * n + 1} ViT inputs "
          f"({tuple(crops.local.shape)} each stack), cropped in {t_crop * 1e3:.1f} ms")
    print(f"tokens       patch {p}: {per_view} per sub-image; local map {gh * h // p}x{gw * w // p} = {n * per_view}, "
          f"global map {n * per_view}, thumbnail {per_view}")
    print(f"             after DEM + reduction to {h // p}x{w // p}: {per_view}; mean with thumbnail: {per_view} "
          f"tokens to the LLM (concat: {2 * per_view})")
    fig_path = out / "crops.png"
    plot_crops(image, crops, path=fig_path)
    print(f"wrote        {fig_path}")
    if not args.no_encode:
        from .encode_cli import demo_encoder

        print("encoder      the whole front end: crops -> ViT (one batched pass) -> DEM -> mean with thumbnail")
        demo_encoder(args, image, out)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
