"""``hrperc demo``: crop an image both ways, print the geometry and token accounting, run the encoder."""

from __future__ import annotations

import time
from pathlib import Path

from .args import read_image
from .inputs import check_image_file, check_out_dir
from .limits import MAX_DRAWN_TILES, check_canvas, check_fixed_grid, check_query
from .plots import PLOT_EXTRA, has_matplotlib

__all__ = ["run_demo"]


def run_demo(args) -> int:
    from ..modules.dual_crop import DualPerspectiveCrop
    from ..ops.pixels import pil_to_pixels
    from .sample import make_sample_image

    # Inputs first (the image, --out, the weight files), then the grid flags, then the model: a bad path fails
    # in a second, before a backbone is built.
    check_out_dir(args.out)
    check_fixed_grid(args)
    if args.image:
        check_image_file(args.image, args.max_image_pixels)  # header: missing, foreign or a bomb
        image = read_image(args.image, args.max_image_pixels)  # decoded: a truncated file fails here
        source, name = args.image, f"image file {args.image!r}"
    else:
        pil = make_sample_image()
        image = pil_to_pixels(pil)
        source, name = f"generated sample ({Path(args.out) / 'sample.png'})", "the generated sample image"
    size = (image.shape[1], image.shape[2])
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
        check_canvas(dcm, size, name, args, tile_flag=True)
    else:
        # Build the encoder first: the crops and the token accounting then use the backbone's own tile and
        # patch size and the encoder's own crop module, so both halves of the demo describe the same thing.
        from .encode import build_encoder, check_encoder_inputs

        check_encoder_inputs(args)
        timm = args.backbone.startswith("timm:")
        if timm:  # the tile is known before the ViT is built at that size: bound the canvas first
            pre = DualPerspectiveCrop(grid=args.grid, tile_size=args.tile_size or 336, max_tiles=args.max_tiles)
            check_canvas(pre, size, name, args, tile_flag=True)
        enc = build_encoder(args, args.grid, args.max_tiles, tile_size=args.tile_size or 336)
        dcm = enc.crop
        check_canvas(dcm, size, name, args, tile_flag=timm)
        (th_px, tw_px), (ph, pw) = enc.backbone.image_size, enc.backbone.patch_size
        check_query(args.query, dcm.plan(size).grid, (th_px // ph, tw_px // pw))
        if args.tile_size is not None and (th_px, tw_px) != (args.tile_size, args.tile_size):
            notes.append(f"--tile-size {args.tile_size} ignored: {args.backbone} has {tw_px}x{th_px} tiles")
        if args.patch_size is not None and (ph, pw) != (args.patch_size, args.patch_size):
            notes.append(f"--patch-size {args.patch_size} ignored: {args.backbone} has {pw}x{ph} patches")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.image:
        pil.save(out / "sample.png")
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
    print(
        f"sub-images   {n} local + {n} strided + 1 thumbnail = {2 * n + 1} ViT inputs "
        f"({tuple(crops.local.shape)} each stack), cropped in {t_crop * 1e3:.1f} ms"
    )
    print(
        f"tokens       patch {patch}: {per_view} per sub-image; local map {gh * th}x{gw * tw} = {n * per_view}, "
        f"global map {n * per_view}, thumbnail {per_view}"
    )
    if enc is None:
        print(
            f"             after DEM + reduction to {th}x{tw}: {per_view}; mean with thumbnail: {per_view} "
            f"tokens to the LLM (concat: {2 * per_view})"
        )
    else:
        layout = ", ".join(f"{seg.source} {seg.length}" for seg in enc.plan(geo.input_size).layout)
        print(f"             to the LLM: {enc.num_tokens(geo.input_size)} tokens ({layout}; combine={enc.combine!r})")
    if not has_matplotlib():
        print(f"pictures     skipped: they need matplotlib, {PLOT_EXTRA}")
    elif n > MAX_DRAWN_TILES:  # one small picture per tile: thousands would take minutes and gigabytes
        print(
            f"pictures     crops.png skipped: {n} tiles per view, over the {MAX_DRAWN_TILES} it draws; use a "
            f"--grid of at most {MAX_DRAWN_TILES} tiles to get it"
        )
    else:
        from .plots import plot_crops

        fig_path = out / "crops.png"
        plot_crops(image, crops, path=fig_path)
        print(f"wrote        {fig_path}")
    if enc is not None:
        from .encode import demo_encoder

        dem = "DEM" if enc.dem is not None else "no DEM"
        print(f"encoder      the whole front end: crops -> ViT (one batched pass) -> {dem} -> combine={enc.combine!r}")
        demo_encoder(args, image, out, enc=enc)
    return 0
