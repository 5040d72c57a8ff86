"""``hrperc demo``: crop an image both ways, print the geometry and token accounting, run the encoder."""

from __future__ import annotations

import time
from pathlib import Path

from .args import read_image
from .plots import PLOT_EXTRA, has_matplotlib

__all__ = ["run_demo"]


def run_demo(args) -> int:
    from ..modules.dual_crop import DualPerspectiveCrop
    from ..ops.pixels import pil_to_pixels
    from .sample import make_sample_image

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.image:
        image = read_image(args.image, args.max_image_pixels)
        source = args.image
    else:
        pil = make_sample_image()
        pil.save(out / "sample.png")
        image = pil_to_pixels(pil)
        source = f"generated sample ({out / 'sample.png'})"
    enc, notes = None, []
    if args.no_encode:
        tile = args.tile_size or 336
        ph = pw = args.patch_size or 14
        if ph > tile:  # no whole patch fits: 0 tokens (a remainder is unread, as a ViT's patch convolution does)
            raise ValueError(
                f"--patch-size {ph} is larger than --tile-size {tile}: a tile would hold no whole patch, so no "
                f"tokens. Pass a --patch-size of at most {tile} (e.g. 14), or a larger --tile-size."
            )
        dcm = DualPerspectiveCrop(grid=args.grid, tile_size=tile, max_tiles=args.max_tiles)
    else:
        # Build the encoder first: the crops and the token accounting then use the backbone's own tile and
        # patch size and the encoder's own crop module, so both halves of the demo describe the same thing.
        from .encode import build_encoder

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
    if has_matplotlib():
        from .plots import plot_crops

        fig_path = out / "crops.png"
        plot_crops(image, crops, path=fig_path)
        print(f"wrote        {fig_path}")
    else:
        print(f"pictures     skipped: they need matplotlib, {PLOT_EXTRA}")
    if enc is not None:
        from .encode import demo_encoder

        dem = "DEM" if enc.dem is not None else "no DEM"
        print(f"encoder      the whole front end: crops -> ViT (one batched pass) -> {dem} -> combine={enc.combine!r}")
        demo_encoder(args, image, out, enc=enc)
    return 0
