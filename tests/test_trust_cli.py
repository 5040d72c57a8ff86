"""The command line bounds its work before allocating, checks its inputs before building a model, and says
which weights it loaded.

* Work: a canvas over what the image needs (a grid upsampling it far beyond its pixels, a huge grid, a
  large tile), a tile size over the cap, grids and batch sizes that are not positive, a fixed grid over
  ``--max-tiles``, a ``--query`` off the token map: each refused in one line with exit code 2, naming the
  flag, the value, the limit and the fix, before any pixel is cropped (``DualPerspectiveCrop.forward``
  is made to fail if called).
* Inputs: a missing, folder, unreadable, foreign, broken or bomb image, missing or foreign weight files, an
  ``hf:`` folder that is not one, an ``--out`` that is a file: refused before any backbone is built
  (``create_backbone`` is made to fail if called).
* Weights: the output says ``RANDOM`` or where the backbone's and the DEM's weights were loaded from.
"""

from __future__ import annotations

import argparse
import struct

import numpy as np
import pytest
from _files import png_declaring
from _messages import FIX, assert_names
from PIL import Image

import hrperc
import hrperc.backbones
from hrperc.cli import build_parser, main
from hrperc.cli.limits import CANVAS_FLOOR, MAX_CANVAS_PIXELS, MAX_TILE_SIZE, UPSAMPLE_AREA, canvas_limit

TINY = ["--backbone", "timm:vit_tiny_patch16_224"]
SAMPLE = (1008, 1344)  # (H, W) of the generated sample image


@pytest.fixture
def image_file(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, size=(60, 90, 3), dtype=np.uint8)
    path = tmp_path / "img.png"
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture
def no_crop(monkeypatch):
    """Cropping fails the test: a refusal must come before any pixel is cut."""

    def fail(self, *a, **k):
        raise AssertionError("DualPerspectiveCrop.forward ran: the work was not bounded first")

    monkeypatch.setattr(hrperc.DualPerspectiveCrop, "forward", fail)


@pytest.fixture
def no_build(monkeypatch):
    """Building a backbone fails the test: a bad input must be refused before any model is built."""

    def fail(*a, **k):
        raise AssertionError("create_backbone ran: the inputs were not checked first")

    monkeypatch.setattr(hrperc.backbones, "create_backbone", fail)


def _error_line(capsys, argv, *names):
    """``main(argv)`` returns 2 with exactly one line on stderr that names every fragment and says a fix."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, (argv, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"hrperc {argv[0]}: error:"), lines[0]
    assert_names(lines[0], *names)
    assert FIX.search(lines[0]), lines[0]
    return lines[0]


# ---- the canvas limit ---------------------------------------------------------------------------------------


def test_canvas_limit_follows_the_image():
    assert canvas_limit(SAMPLE) == UPSAMPLE_AREA * 1008 * 1344  # 4x a side
    assert canvas_limit((60, 90)) == canvas_limit((1, 1)) == CANVAS_FLOOR  # any image gets the floor
    assert canvas_limit((9000, 9000)) == canvas_limit((3000, 4000)) == MAX_CANVAS_PIXELS  # and no more than the cap
    assert canvas_limit((60, 90), max_canvas_pixels=1000) == 1000
    assert canvas_limit((9000, 9000), max_canvas_pixels=0) is None


@pytest.mark.parametrize(
    "argv, canvas, limit",
    [
        (["--grid", "40x40", "--max-tiles", "1600"], "13440x13440", canvas_limit(SAMPLE)),  # the 14 GB example
        (["--grid", "20x20", "--max-tiles", "400"], "6720x6720", canvas_limit(SAMPLE)),
        (["--grid", "1x200", "--max-tiles", "200"], "67200x336", canvas_limit(SAMPLE)),
        (["--grid", "3x3", "--tile-size", "2048"], "6144x6144", canvas_limit(SAMPLE)),
        (["--grid", "3x4", "--tile-size", "1500"], "6000x4500", canvas_limit(SAMPLE)),
        (["--grid", "3x4", "--max-canvas-pixels", "1000000"], "1344x1008", 1_000_000),
    ],
)
def test_a_canvas_over_what_the_sample_needs_is_refused_before_cropping(tmp_path, capsys, no_crop, argv, canvas, limit):
    line = _error_line(
        capsys,
        ["demo", "--no-encode", "--out", tmp_path, *argv],
        f"{canvas} canvas",
        f"{limit:,}",
        "--max-canvas-pixels",
        "1344x1008",
    )
    grid = argv[argv.index("--grid") + 1]
    assert_names(line, f"--grid {grid}", "smaller --grid", "--grid auto", "--tile-size")
    assert not (tmp_path / "crops.png").exists()


@pytest.mark.parametrize("grid, tile", [("8x8", 336), ("4x4", 1024), ("60x60", 64)])
def test_a_grid_that_upsamples_a_small_image_far_beyond_its_pixels_is_refused(
    tmp_path, capsys, image_file, no_crop, grid, tile
):
    gh, gw = (int(v) for v in grid.split("x"))
    _error_line(
        capsys,
        [
            "demo",
            "--no-encode",
            "--out",
            tmp_path,
            image_file,
            "--grid",
            grid,
            "--max-tiles",
            gh * gw,
            "--tile-size",
            tile,
        ],
        repr(str(image_file)),
        "90x60",
        f"{gw * tile}x{gh * tile} canvas",
        f"{CANVAS_FLOOR:,}",
        "4x upsampling",
        f"--max-canvas-pixels {gh * tile * gw * tile}",
    )


def test_the_image_decides_under_a_huge_tile_budget(tmp_path, capsys):
    # --grid auto with --max-tiles 10**24: the grid the image needs (3x4 of 336 tiles), not a huge canvas.
    assert main(["demo", "--no-encode", "--out", str(tmp_path), "--max-tiles", str(10**24)]) == 0
    out = capsys.readouterr().out
    assert "-> grid 3x4 (N=12)" in out and "canvas       1344x1008" in out


def test_max_canvas_pixels_raises_or_lifts_the_limit(tmp_path, capsys, image_file):
    argv = [
        "demo",
        "--no-encode",
        "--out",
        str(tmp_path),
        str(image_file),
        "--grid",
        "2x3",
        "--max-tiles",
        "6",
        "--tile-size",
        "32",
        "--patch-size",
        "16",
    ]
    _error_line(capsys, [*argv, "--max-canvas-pixels", "6143"], "96x64 canvas of 6,144", "--max-canvas-pixels 6143")
    for limit in ("6144", "0"):
        assert main([*argv, "--max-canvas-pixels", limit]) == 0
        assert "canvas       96x64" in capsys.readouterr().out
    _error_line(capsys, [*argv, "--max-canvas-pixels", "-5"], "--max-canvas-pixels '-5'", "0 for no limit")


def test_many_tiles_skip_the_picture_not_the_run(tmp_path, capsys):
    # 16x21 tiles of 64 pixels on the sample: well inside the canvas limit, too many little pictures to draw.
    assert main(["demo", "--no-encode", "--out", str(tmp_path), "--max-tiles", "1000", "--tile-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "-> grid 16x21 (N=336)" in out and "crops.png skipped: 336 tiles per view" in out
    assert not (tmp_path / "crops.png").exists()


def test_encode_bounds_every_image_before_encoding_any(tmp_path, capsys, image_file, monkeypatch):
    def fail(self, *a, **k):
        raise AssertionError("encoded before every canvas was checked")

    monkeypatch.setattr(hrperc.HighResEncoder, "forward", fail)
    big = png_declaring(tmp_path / "big.png", 6000, 6000)  # only its header is read
    # fit pad keeps native pixels: 27x27 tiles of 224 for a 6000x6000 image, over the cap
    _error_line(
        capsys,
        ["encode", image_file, big, *TINY, "--grid", "auto", "--fit", "pad", "--max-tiles", "1000"],
        repr(str(big)),
        "6048x6048 canvas",
        f"{MAX_CANVAS_PIXELS:,}",
        "--fit resize",
    )
    _error_line(
        capsys,
        ["encode", image_file, *TINY, "--grid", "30x30", "--max-tiles", "900"],
        repr(str(image_file)),
        "--grid 30x30",
        "6720x6720 canvas",
        "smaller --grid",
    )
    line = _error_line(
        capsys,
        ["encode", image_file, *TINY, "--grid", "auto", "--max-tiles", "9", "--max-canvas-pixels", "50000"],
        "224x224 canvas",
        "smaller --max-tiles",
    )
    assert "--tile-size" not in line  # encode has no such flag: the backbone's tile is the tile


def test_demo_with_a_timm_vit_bounds_the_canvas_before_building_it(tmp_path, capsys, no_build):
    _error_line(
        capsys,
        ["demo", "--out", tmp_path, *TINY, "--grid", "30x30", "--max-tiles", "900", "--tile-size", "224"],
        "6720x6720 canvas",
        "--tile-size",
    )


@pytest.mark.parametrize("value", ["2049", "100000", str(10**12)])
def test_tile_size_over_the_cap_is_a_usage_error(tmp_path, capsys, value):
    _error_line(
        capsys,
        ["demo", "--no-encode", "--out", tmp_path, "--tile-size", value],
        f"--tile-size '{value}'",
        str(MAX_TILE_SIZE),
        "--tile-size 336",
    )
    assert build_parser().parse_args(["demo", "--tile-size", str(MAX_TILE_SIZE)]).tile_size == MAX_TILE_SIZE


@pytest.mark.parametrize("command", ["demo", "encode"])
@pytest.mark.parametrize(
    "flag, value",
    [
        ("--grid", "0x3"),
        ("--grid", "3x0"),
        ("--grid", "-1x2"),
        ("--max-batch", "0"),
        ("--max-batch", "-4"),
        ("--max-batch", "x"),
    ],
)
def test_sizes_that_are_not_positive_are_usage_errors(capsys, image_file, command, flag, value):
    argv = ["demo", "--no-encode"] if command == "demo" else ["encode", image_file]
    _error_line(
        capsys,
        [*argv, f"{flag}={value}"],
        f"{flag} '{value}'",
        "at least 1" if flag == "--grid" else "positive integer",
    )


@pytest.mark.parametrize("grid, tiles", [("4x4", 16), ("1x13", 13), ("40x40", 1600)])
def test_fixed_grid_over_max_tiles_names_both_flags(tmp_path, capsys, image_file, no_build, grid, tiles):
    _error_line(
        capsys,
        ["demo", "--no-encode", "--out", tmp_path, "--grid", grid],
        f"--grid {grid}",
        "--max-tiles 12",
        f"--max-tiles {tiles}",
    )
    _error_line(
        capsys, ["encode", image_file, *TINY, "--grid", grid], f"--grid {grid}", "--max-tiles 9", f"--max-tiles {tiles}"
    )


@pytest.mark.parametrize("query", ["12,0", "0,16", "100,100", "-1,3"])
def test_query_off_the_token_map_is_refused_before_encoding(tmp_path, capsys, monkeypatch, query):
    def fail(self, *a, **k):
        raise AssertionError("encoded before --query was checked")

    monkeypatch.setattr(hrperc.HighResEncoder, "forward", fail)
    # 3x4 grid of 64-pixel tiles, patch 16: a 12x16 token map
    _error_line(
        capsys,
        ["demo", "--out", tmp_path, *TINY, "--tile-size", "64", f"--query={query}"],
        f"--query {query}",
        "12x16 token map",
        "--query 6,8",
    )


# ---- inputs before the model ------------------------------------------------------------------------------


def _bad_images(tmp_path):
    ok = tmp_path / "ok.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(ok)
    data = ok.read_bytes()
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "page.png").write_text("<html>404 not found</html>")
    (tmp_path / "cut.png").write_bytes(data[: len(data) - 20])  # the last chunks are missing
    bad_crc = bytearray(data)
    bad_crc[30] ^= 0xFF  # a byte inside IHDR: its checksum no longer matches
    (tmp_path / "crc.png").write_bytes(bytes(bad_crc))
    (tmp_path / "empty.jpg").write_bytes(b"")
    png_declaring(tmp_path / "bomb.png", 20000, 20000)
    return {
        "missing.png": ["does not exist"],
        "folder.png": ["is a directory"],
        "page.png": ["cannot be read as an image"],
        "cut.png": ["cannot be read as an image"],
        "crc.png": ["cannot be read as an image"],
        "empty.jpg": ["cannot be read as an image"],
        "bomb.png": ["decompression bomb", "--max-image-pixels 400000000"],
    }


def test_a_bad_image_is_refused_before_any_model_is_built(tmp_path, capsys, image_file, no_build):
    for name, names in _bad_images(tmp_path).items():
        bad = tmp_path / name
        _error_line(capsys, ["demo", "--out", tmp_path / "out", *TINY, bad], repr(str(bad)), *names)
        _error_line(capsys, ["encode", image_file, bad, *TINY], repr(str(bad)), *names)  # the second of two
    assert not (tmp_path / "out").exists()  # nothing written either


def test_an_unreadable_image_is_refused_by_name(capsys, image_file, monkeypatch, no_build):
    import hrperc.cli.inputs as inputs

    real = inputs.os.access
    monkeypatch.setattr(inputs.os, "access", lambda p, mode: False if str(p) == str(image_file) else real(p, mode))
    _error_line(capsys, ["encode", image_file, *TINY], repr(str(image_file)), "not readable", "permissions")


def _weight_files(tmp_path):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "page.safetensors").write_text("<!DOCTYPE html><html>rate limited</html>")
    (tmp_path / "header.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}")
    (tmp_path / "zero.bin").write_bytes(b"")
    # the weight reader's own messages (header sniffing) for the files: named by flag and path here
    return {
        "missing.safetensors": ["does not exist", "random weights"],
        "empty_dir": ["folder without", "Pass"],
        "page.safetensors": [],
        "header.safetensors": [],
        "zero.bin": [],
    }


@pytest.mark.parametrize("flag", ["--weights", "--dem-weights"])
def test_bad_weight_files_are_refused_before_any_model_is_built(tmp_path, capsys, image_file, no_build, flag):
    for name, names in _weight_files(tmp_path).items():
        bad = tmp_path / name
        _error_line(capsys, ["encode", image_file, *TINY, flag, bad], flag, str(bad), *names)
        _error_line(capsys, ["demo", "--out", tmp_path / "out", *TINY, flag, bad], flag, str(bad), *names)


def test_bad_hf_folders_and_out_paths_are_refused_before_any_model_is_built(tmp_path, capsys, image_file, no_build):
    (tmp_path / "no_config").mkdir()
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only" / "config.json").write_text("{}")
    cases = [
        (["--backbone", f"hf:{tmp_path / 'nope'}"], ["does not exist", "config.json"]),
        (["--backbone", f"hf:{image_file}"], ["is a file", "save_pretrained folder"]),
        (["--backbone", f"hf:{tmp_path / 'no_config'}"], ["no config.json"]),
        (["--backbone", f"hf:{tmp_path / 'config_only'}", "--weights", image_file], ["--weights", "is a file"]),
    ]
    for argv, names in cases:
        _error_line(capsys, ["encode", image_file, *argv], *names)
    _error_line(capsys, ["demo", "--out", image_file, *TINY], f"--out {str(image_file)!r}", "is a file")
    _error_line(capsys, ["demo", "--out", image_file / "sub", *TINY], f"--out {str(image_file / 'sub')!r}", "is a file")


def _tiny_clip_folder(folder, capsys):
    """A 2-layer CLIP vision tower (the CLI takes layer -2) saved in ``folder``; its ``model.safetensors``."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14
    )
    transformers.CLIPVisionModel(cfg).save_pretrained(folder)
    capsys.readouterr()  # transformers' progress bar
    return folder / "model.safetensors"


def _edit_safetensors_header(data: bytes, edit) -> bytes:
    """``data`` with ``edit(header)`` applied to its JSON header (padded to 8 bytes, as safetensors writes)."""
    import json

    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def _first_tensor(header):
    return header[next(k for k in header if k != "__metadata__")]


@pytest.mark.parametrize("how", ["truncated", "header only", "html page", "empty"])
def test_a_broken_safetensors_file_in_an_hf_folder_is_refused_before_any_model_is_built(
    tmp_path, capsys, image_file, no_build, how
):
    weights = _tiny_clip_folder(tmp_path / "clip", capsys)
    data = weights.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    weights.write_bytes(
        {
            "truncated": data[: len(data) * 2 // 3],
            "header only": data[: 8 + n],
            "html page": b"<html>rate limited</html>",
            "empty": b"",
        }[how]
    )
    backbone = f"hf:{tmp_path / 'clip'}"
    _error_line(capsys, ["encode", image_file, "--backbone", backbone], f"--backbone {backbone!r}", str(weights))
    # the same folder as --weights (the backbone's own folder is then not read)
    _error_line(
        capsys,
        ["encode", image_file, "--backbone", backbone, "--weights", tmp_path / "clip"],
        "--weights",
        str(weights),
    )


@pytest.mark.parametrize(
    "edit",
    [
        lambda h: _first_tensor(h).update(dtype="XX"),  # a dtype safetensors does not know
        lambda h: _first_tensor(h).update(shape=[3, 1000]),  # a shape its bytes do not hold
    ],
    ids=["unknown dtype", "shape over its bytes"],
)
@pytest.mark.parametrize("command", ["encode", "demo"])
def test_a_safetensors_file_only_safetensors_refuses_is_one_line(tmp_path, capsys, image_file, edit, command):
    # The header parses and fits the file, so the CLI's own check lets it through; safetensors itself refuses
    # it from inside transformers' loader: that SafetensorError is one line, exit code 2, with the fix.
    weights = _tiny_clip_folder(tmp_path / "clip", capsys)
    weights.write_bytes(_edit_safetensors_header(weights.read_bytes(), edit))
    argv = ["encode", image_file] if command == "encode" else ["demo", "--out", tmp_path / "out"]
    line = _error_line(
        capsys,
        [*argv, "--backbone", f"hf:{tmp_path / 'clip'}", "--grid", "1x1"],
        "safetensors",
        "truncated, corrupt or not a safetensors file",
        "hf: folder",
    )
    assert "Error while deserializing" in line  # safetensors' own reason is kept


def test_with_weights_the_hf_backbone_folder_s_own_weights_are_not_read(tmp_path, capsys, image_file):
    # --weights replaces the folder's weights: a broken file there is not loaded, so it is not refused either.
    broken = _tiny_clip_folder(tmp_path / "clip", capsys)
    broken.write_bytes(b"<html>rate limited</html>")
    _tiny_clip_folder(tmp_path / "good", capsys)
    argv = ["encode", image_file, "--backbone", f"hf:{tmp_path / 'clip'}", "--weights", tmp_path / "good"]
    assert main([str(a) for a in [*argv, "--grid", "1x1"]]) == 0, capsys.readouterr().err


# ---- what was loaded -----------------------------------------------------------------------------------------


def _lines(text, start):
    return [ln for ln in text.splitlines() if ln.startswith(start)]


def test_the_output_says_which_weights_were_loaded_and_from_where(tmp_path, capsys, image_file):
    import timm
    from safetensors.torch import save_file

    from hrperc.pretrained.inf_llava import released_state_dict

    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0)
    vit_file = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, vit_file)
    dem_file = tmp_path / "dem.safetensors"
    save_file(
        {k: v.contiguous() for k, v in released_state_dict(hrperc.DualPerspectiveEnhancement(192, 4)).items()}, dem_file
    )
    common = ["encode", str(image_file), *TINY, "--grid", "1x1"]
    cases = [
        ([], "RANDOM weights", "RANDOM weights (pass --dem-weights"),
        (
            ["--weights", str(vit_file), "--dem-weights", str(dem_file)],
            f"pretrained weights loaded from {vit_file}",
            f"weights loaded from {dem_file} (",
        ),
        (["--weights", str(vit_file), "--no-dem"], f"loaded from {vit_file}", "none (--no-dem)"),
    ]
    for extra, backbone, dem in cases:
        assert main([*common, *extra]) == 0, extra
        out = capsys.readouterr().out
        (bb_line,), (dem_line,) = _lines(out, "backbone     "), _lines(out, "DEM          ")
        assert backbone in bb_line and dem in dem_line, (extra, bb_line, dem_line)


def test_an_hf_folder_backbone_says_its_weights_were_loaded(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14
    )
    transformers.CLIPVisionModel(cfg).save_pretrained(tmp_path / "clip")
    for command in (["demo", "--out", str(tmp_path / "out")], ["encode", str(tmp_path / "out" / "sample.png")]):
        assert main([*command, "--backbone", f"hf:{tmp_path / 'clip'}", "--grid", "1x1"]) == 0
        out = capsys.readouterr().out
        (line,) = _lines(out, "backbone     ")
        assert f"pretrained weights loaded from {tmp_path / 'clip'}" in line and "RANDOM" not in line, line
        assert "RANDOM weights" in _lines(out, "DEM          ")[0]


def test_tile_size_type_names_the_flag_in_argparse():
    from hrperc.cli.args import positive_int

    parse = positive_int("--tile-size", 10, "why")
    assert parse("10") == 10
    with pytest.raises(argparse.ArgumentTypeError, match=r"--tile-size '11' is over the limit of 10 \(why\)"):
        parse("11")
