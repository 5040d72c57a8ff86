"""``hrperc encode`` and the encoder half of ``hrperc demo``.

``hrperc encode IMAGE [IMAGE ...] [--backbone NAME] [--weights PATH] [--grid 3x3|auto|floor] ...``
runs a :class:`~hrperc.HighResEncoder` (by default the ``inf_llava`` recipe's settings on
``open_clip:ViT-L-14-336-quickgelu``, the config OpenAI's CLIP weights need) over the images with a
progress bar and prints, per image, the geometry, the ViT passes (encoded / skipped), the token count,
per-stage timings, and at the end the peak memory. It first says which weights were loaded and from
where: the backbone's (random without ``--weights``; an ``hf:<dir>`` backbone's come from its folder)
and the DEM's (random without ``--dem-weights``). ``--combine`` defaults to ``mean`` with the DEM and
``concat`` with ``--no-dem``. Every image header and weight file is checked before the backbone is built,
and every image's canvas before the first is encoded (see :mod:`hrperc.cli.inputs`, :mod:`hrperc.cli.limits`).
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .args import (
    parse_device,
    parse_grid,
    parse_max_batch,
    parse_max_canvas_pixels,
    parse_max_image_pixels,
    parse_query,
    positive_int,
    read_image,
)
from .inputs import check_backbone, check_image_file, check_weights
from .limits import check_canvas, check_fixed_grid

if TYPE_CHECKING:
    from ..modules.dual_crop import Fit

__all__ = [
    "add_encode_parser",
    "add_demo_encoder_arguments",
    "run_encode",
    "build_encoder",
    "check_encoder_inputs",
    "demo_encoder",
    "weights_lines",
]

# INF-LLaVA's tower is OpenAI's CLIP ViT-L/14-336, trained with QuickGELU: open_clip's "-quickgelu" config.
DEFAULT_BACKBONE = "open_clip:ViT-L-14-336-quickgelu"
DEMO_BACKBONE = "timm:vit_small_patch14_reg4_dinov2"


def _add_encoder_arguments(p: argparse.ArgumentParser, backbone_default: str) -> None:
    p.add_argument("--backbone", default=backbone_default, help=f"timm:/open_clip:/hf: name ({backbone_default})")
    p.add_argument("--weights", default=None, help="local checkpoint of the backbone (default: random weights)")
    p.add_argument("--dem-weights", default=None, help="released INF-LLaVA checkpoint for the DEM (default: random)")
    p.add_argument("--layer", type=int, default=-2, help="backbone layer (default -2)")
    p.add_argument(
        "--combine",
        choices=("mean", "concat", "none"),
        default=None,
        help="thumbnail + DEM tokens (default: mean; concat with --no-dem, where there is nothing to average)",
    )
    p.add_argument("--no-dem", action="store_true", help="no enhancement: return the sub-image tokens")
    p.add_argument("--max-batch", type=parse_max_batch, default="auto", help="sub-images per ViT call (default auto)")
    p.add_argument("--encode-all", action="store_true", help="also encode sub-images the DEM never reads")
    p.add_argument(
        "--device",
        type=parse_device,
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu, cuda, cuda:N, mps, ... (default: cuda when there is a GPU, else cpu)",
    )
    p.add_argument(
        "--max-image-pixels",
        type=parse_max_image_pixels,
        default=None,
        help="PIL.Image.MAX_IMAGE_PIXELS for this run: PIL refuses images over twice it as possible decompression "
        "bombs (default: PIL's own; 0: no limit, for trusted files only)",
    )
    p.add_argument(
        "--max-canvas-pixels",
        type=parse_max_canvas_pixels,
        default=None,
        help="most canvas pixels (grid x tile) an image may get (default: 16x the image's pixels, at least "
        "4194304 and at most 33554432; 0: no limit)",
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")


def add_encode_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("encode", help="encode images with a high-resolution ViT front end; print tokens and timings")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--grid", type=parse_grid, default=(3, 3), help="3x3 (released, default), auto, floor or ROWSxCOLS")
    p.add_argument(
        "--max-tiles", type=positive_int("--max-tiles"), default=9, help="tile budget for --grid auto (default 9)"
    )
    p.add_argument("--fit", choices=("resize", "pad", "resize_pad"), default="resize")
    _add_encoder_arguments(p, DEFAULT_BACKBONE)
    p.set_defaults(func=run_encode)
    return p


def add_demo_encoder_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of the encoder half of ``hrperc demo``."""
    _add_encoder_arguments(p, DEMO_BACKBONE)
    p.add_argument(
        "--query", type=parse_query, default=None, help="ROW,COL of the DEM query token to draw (default: centre)"
    )
    p.add_argument(
        "--no-encode", action="store_true", help="only crop; skip the ViT, the DEM and the attention picture"
    )


def resolve_combine(args) -> str:
    """``--combine``, or its default: ``"mean"`` with a DEM, ``"concat"`` with ``--no-dem``."""
    if args.combine is not None:
        return args.combine
    return "concat" if args.no_dem else "mean"


def check_encoder_inputs(args) -> None:
    """The encoder's flags that contradict each other, and every file it reads (an ``hf:<dir>`` backbone,
    ``--weights``, ``--dem-weights``: see :mod:`hrperc.cli.inputs`), checked before anything is built."""
    if args.no_dem and args.dem_weights:
        raise ValueError("--no-dem and --dem-weights contradict each other; pass one of them.")
    if args.no_dem and args.combine == "mean":
        raise ValueError(
            "--combine mean averages the DEM's tokens with the thumbnail's, but --no-dem turns the DEM off; "
            "use --combine concat (the default with --no-dem) or none."
        )
    check_backbone(args.backbone, weights=not args.weights)  # --weights replaces the folder's
    if args.weights:
        hf = args.backbone.partition(":")[0] in ("hf", "transformers")
        check_weights(args.weights, "--weights", folder="hf" if hf else "checkpoint")
    if args.dem_weights:
        check_weights(args.dem_weights, "--dem-weights", folder="shards")


def build_encoder(args, grid, max_tiles: int, fit: Fit = "resize", tile_size: int | None = None):
    """A :class:`HighResEncoder` from CLI flags; released INF-LLaVA resampling (bicubic, no antialias).

    The inputs are checked first (:func:`check_encoder_inputs`)."""
    from ..backbones import create_backbone
    from ..encoder import HighResEncoder
    from ..modules.dual_crop import DualPerspectiveCrop
    from ..pretrained.inf_llava import load_dem

    check_encoder_inputs(args)
    kw: dict[str, Any] = {}
    if tile_size is not None and args.backbone.startswith("timm:"):
        kw["img_size"] = tile_size  # timm ViTs are built at the tile size the crops use
    backbone = create_backbone(args.backbone, pretrained=args.weights, layer=args.layer, **kw)
    dem = None
    if not args.no_dem:
        dem = load_dem(args.dem_weights) if args.dem_weights else "default"
    crop = DualPerspectiveCrop(
        grid=grid, tile_size=backbone.image_size, max_tiles=max_tiles, fit=fit, mode="bicubic", antialias=False
    )
    enc = HighResEncoder(
        backbone,
        crop,
        dem=dem,
        combine=resolve_combine(args),
        max_batch=args.max_batch,
        encode_all=args.encode_all,
    )
    dtype = getattr(torch, args.dtype)
    return enc.to(device=args.device, dtype=dtype)


def _peak_memory(device: str) -> str:
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB (CUDA, torch.cuda.max_memory_allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (process peak RSS)"


def weights_lines(args, enc) -> list[str]:
    """What was loaded, and from where: the backbone's weights (random, or the file or folder they came from,
    ``backbone.source``) and the DEM's (none, random, or the ``--dem-weights`` file)."""
    source = enc.backbone.source
    lines = [
        f"backbone     {args.backbone}: pretrained weights loaded from {source}"
        if source is not None
        else f"backbone     {args.backbone}: RANDOM weights (pass --weights PATH for meaningful features)"
    ]
    if enc.dem is None:
        lines.append("DEM          none (--no-dem)")
    elif args.dem_weights:
        n = sum(p.numel() for p in enc.dem.parameters())
        lines.append(f"DEM          weights loaded from {args.dem_weights} ({n:,} parameters, width {enc.dem.dim})")
    else:
        lines.append("DEM          RANDOM weights (pass --dem-weights PATH for the released INF-LLaVA DEM)")
    return lines


def _describe(enc, out, b: int) -> list[str]:
    geo = out.geometries[b]
    gh, gw = geo.grid
    n = gh * gw
    lines = [
        f"  geometry   {geo.input_size[1]}x{geo.input_size[0]} (W x H) -> grid {gh}x{gw} (N={n}), canvas "
        f"{geo.canvas_size[1]}x{geo.canvas_size[0]}, tiles {geo.tile_size[1]}x{geo.tile_size[0]}, "
        f"valid box {geo.valid_box}",
        f"  ViT passes {enc.num_backbone_passes(geo.input_size)} of {2 * n + int(enc.thumbnail)} "
        f"({n} local + {n} strided + {int(enc.thumbnail)} thumbnail; the rest never reach the tokens)",
        f"  tokens     {out.num_tokens[b]} x {out.tokens.shape[-1]}: "
        + ", ".join(
            f"{s.source} {s.length}" + (f" ({s.shape[0]}x{s.shape[1]})" if s.shape else "") for s in out.layout[b]
        ),
    ]
    return lines


def run_encode(args) -> int:
    from tqdm import tqdm

    # Every input before the backbone is built (which can take a while): the images' headers, the weight files.
    sizes = [check_image_file(path, args.max_image_pixels) for path in args.images]
    check_fixed_grid(args)
    check_encoder_inputs(args)
    enc = build_encoder(args, args.grid, args.max_tiles, args.fit)
    for path, size in zip(args.images, sizes):  # the canvas of every image, before any is encoded
        check_canvas(enc.crop, size, f"image file {path!r}", args, tile_flag=False)
    for line in weights_lines(args, enc):
        print(line)
    print(f"encoder      {enc.extra_repr()}; dem={'none' if enc.dem is None else 'released configuration'}")
    totals: dict[str, float] = {}
    # The bar only on a terminal (disable=None), and closed on an error, so the error is one line of its own.
    with torch.inference_mode(), tqdm(args.images, desc="encode", unit="image", disable=None) as bar:
        for path in bar:
            image = read_image(path, args.max_image_pixels).to(args.device)
            t0 = time.perf_counter()
            out = enc(image, timings=True)
            wall = time.perf_counter() - t0
            tqdm.write(f"{path}")
            for line in _describe(enc, out, 0):
                tqdm.write(line)
            stages = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in out.timings.items())
            tqdm.write(f"  time (ms)  {stages}; total {wall * 1e3:.1f}")
            for k, v in out.timings.items():
                totals[k] = totals.get(k, 0.0) + v
    total = sum(totals.values()) or 1.0
    shares = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in totals.items())
    print(f"share        {shares}")
    print(f"peak memory  {_peak_memory(args.device)}")
    return 0


def demo_encoder(args, image: torch.Tensor, out_dir: Path, enc=None) -> None:
    """The encoder half of ``hrperc demo``: run the whole front end, print it, draw the DEM attention.

    ``enc``: the encoder built from ``args`` (built here when not given)."""
    from ..ops.crop import local_merge
    from .attention_plot import dem_attention, plot_dem_attention
    from .plots import has_matplotlib

    if enc is None:
        enc = build_encoder(args, args.grid, args.max_tiles, tile_size=args.tile_size)
    backbone_line, *dem_lines = weights_lines(args, enc)
    bb = enc.backbone
    print(backbone_line)
    print(
        f"             patch {bb.patch_size[0]}, width {bb.hidden_size}, {bb.num_layers} layers, "
        f"{bb.num_prefix_tokens} prefix tokens (read off the model), layer {enc.layer}"
    )
    for line in dem_lines:
        print(line)
    with torch.inference_mode():
        out = enc(image.to(args.device), timings=True)
        for line in _describe(enc, out, 0):
            print(line)
        stages = ", ".join(f"{k} {v * 1e3:.0f}" for k, v in out.timings.items())
        print(f"  time (ms)  {stages}")
        directions = [d for d in ("global", "local") if getattr(enc.dem, "directions", "both") in ("both", d)]
        if enc.dem is None or not directions:
            return
        # The picture needs every sub-image's tokens (skipped ones are zeros in the fast path).
        sub = enc.subimage_features(image.to(args.device), encode_all=True)
    geo = sub.crops.geometries[0]
    gh, gw = geo.grid
    n = gh * gw
    th, tw = bb.grid_size
    query = args.query or (gh * th // 2, gw * tw // 2)
    atts = [
        dem_attention(enc.dem, sub.local[:n].cpu(), sub.strided[:n].cpu(), geo.grid, (th, tw), query, d)
        for d in directions
    ]
    if not has_matplotlib():  # run_demo has said so, with the extra to install
        return
    canvas = local_merge(sub.crops.local[:n].float().cpu(), geo.grid)[0]
    path = out_dir / "attention.png"
    plot_dem_attention(canvas, atts, bb.patch_size, path=path)
    print(f"wrote        {path} (DEM attention of token {query}; random weights give diffuse maps)")
