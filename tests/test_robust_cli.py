"""The command line's error path: every refusal is one line on stderr with exit code 2, never a traceback.

Usage errors (``--tile-size 0``, ``--device meta``), hostile files (a decompression bomb, truncated
weights, another model's checkpoint) and unavailable devices or backends, each with the kind of input,
not only one example.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from _files import png_declaring
from _messages import assert_names
from PIL import Image

import hrperc
from hrperc.cli import main, one_line

TINY = ["--backbone", "timm:vit_tiny_patch16_224"]
DEMO_TINY = ["demo", *TINY, "--tile-size", "64", "--max-tiles", "4"]


@pytest.fixture
def image_file(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, size=(60, 90, 3), dtype=np.uint8)
    path = tmp_path / "img.png"
    Image.fromarray(arr).save(path)
    return path


def _one_line_error(capsys, argv, *names, prefix=None):
    """``main(argv)`` returns 2 and prints exactly one line on stderr, naming every fragment, no traceback."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, (argv, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(prefix or f"hrperc {argv[0]}: error:"), lines[0]
    assert_names(lines[0], *names)
    return lines[0]


# ---- options the demo used to replace or ignore ------------------------------------------------------


@pytest.mark.parametrize("flag", ["--tile-size", "--patch-size", "--max-tiles"])
@pytest.mark.parametrize("value", ["0", "-3", "abc", "1.5"])
def test_sizes_must_be_positive_integers(tmp_path, capsys, flag, value):
    _one_line_error(
        capsys,
        ["demo", "--no-encode", "--out", tmp_path, flag, value],
        f"{flag} '{value}'",
        "positive integer",
        "--help",
    )


def test_encode_max_tiles_must_be_positive(image_file, capsys):
    _one_line_error(capsys, ["encode", image_file, *TINY, "--max-tiles", "0"], "--max-tiles '0'", "positive integer")


@pytest.mark.parametrize("patch, tile", [(500, None), (337, None), (64 + 1, 64)])
def test_no_encode_patch_larger_than_the_tile_is_refused(tmp_path, capsys, patch, tile):
    argv = ["demo", "--no-encode", "--out", tmp_path, "--patch-size", patch] + (["--tile-size", tile] if tile else [])
    _one_line_error(capsys, argv, f"--patch-size {patch}", f"--tile-size {tile or 336}", "at most")


def test_no_encode_patch_that_does_not_divide_counts_whole_patches(tmp_path, capsys):
    # As a ViT's patch convolution: 64 // 15 = 4 whole patches a side, the last 4 pixels unread.
    rc = main(
        ["demo", "--no-encode", "--out", str(tmp_path), "--patch-size", "15", "--tile-size", "64", "--max-tiles", "4"]
    )
    assert rc == 0 and "tokens       patch 15: 16 per sub-image" in capsys.readouterr().out


def test_no_encode_patch_size_that_divides_still_runs(tmp_path, capsys):
    rc = main(
        ["demo", "--no-encode", "--out", str(tmp_path), "--patch-size", "16", "--tile-size", "64", "--max-tiles", "4"]
    )
    assert rc == 0 and "tokens       patch 16: 16 per sub-image" in capsys.readouterr().out


@pytest.mark.parametrize(
    "device, names",
    [
        ("meta", ["--device 'meta'", "holds no data", "use cpu"]),
        ("bogus", ["--device 'bogus'", "not a torch device", "use cpu"]),
        ("cuda:x", ["--device 'cuda:x'", "not a torch device"]),
    ],
)
def test_devices_that_hold_no_data_or_do_not_parse(tmp_path, capsys, device, names):
    _one_line_error(capsys, ["demo", "--no-encode", "--out", tmp_path, "--device", device], *names)


def test_cuda_without_a_gpu_is_refused_up_front(image_file, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    for device in ("cuda", "cuda:0", "cuda:1"):
        _one_line_error(
            capsys,
            ["encode", image_file, *TINY, "--device", device],
            f"--device '{device}'",
            "no CUDA GPU",
            "--device cpu",
        )
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU-only torch build
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    _one_line_error(capsys, ["encode", image_file, *TINY, "--device", "cuda"], "no CUDA support", "--device cpu")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    _one_line_error(
        capsys, ["encode", image_file, *TINY, "--device", "cuda:2"], "--device 'cuda:2'", "2 CUDA GPU", "cuda:0..cuda:1"
    )


def test_mps_without_mps_is_refused(image_file, capsys, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    _one_line_error(capsys, ["encode", image_file, *TINY, "--device", "mps"], "--device 'mps'", "no mps device")


def test_grid_usage_errors_are_one_line_too(image_file, capsys):
    _one_line_error(capsys, ["encode", image_file, "--grid", "3y3"], "--grid '3y3'", "ROWSxCOLS")
    _one_line_error(capsys, ["demo", "--no-encode", "--query", "1"], "--query '1'", "ROW,COL")
    _one_line_error(capsys, ["nope"], "invalid choice", prefix="hrperc: error:")  # the top-level parser
    assert main(["--help"]) == 0
    capsys.readouterr()


# ---- hostile files, missing devices and backends ------------------------------------------------------


@pytest.mark.parametrize("size", [(20000, 20000), (100000, 2000), (14000, 13000)])
def test_decompression_bomb_is_one_line_naming_the_file_and_limit(tmp_path, capsys, size):
    bomb = png_declaring(tmp_path / "bomb.png", *size)
    assert bomb.stat().st_size < 50_000
    limit = Image.MAX_IMAGE_PIXELS
    line = _one_line_error(
        capsys,
        ["demo", "--no-encode", "--out", tmp_path, bomb],
        repr(str(bomb)),
        "decompression bomb",
        str(limit),
        "PIL.Image.MAX_IMAGE_PIXELS",
        f"--max-image-pixels {size[0] * size[1]}",
    )
    assert "if you trust the file" in line
    assert Image.MAX_IMAGE_PIXELS == limit  # the process-wide limit is left as it was


def test_decompression_bomb_in_encode(tmp_path, capsys, image_file):
    bomb = png_declaring(tmp_path / "bomb.png", 20000, 20000)
    _one_line_error(capsys, ["encode", image_file, bomb, *TINY, "--grid", "1x1"], repr(str(bomb)), "--max-image-pixels")


def test_max_image_pixels_sets_the_limit_for_the_run(image_file, tmp_path, capsys):
    # 90 x 60 = 5400 pixels: refused over twice a limit of 1000, read with a limit of 5400 or none (0)
    _one_line_error(
        capsys,
        ["demo", "--no-encode", "--out", tmp_path, image_file, "--max-image-pixels", "1000"],
        repr(str(image_file)),
        "PIL.Image.MAX_IMAGE_PIXELS = 1000",
        "--max-image-pixels",
    )
    for limit in ("5400", "0"):
        assert (
            main(
                [
                    "demo",
                    "--no-encode",
                    "--out",
                    str(tmp_path),
                    str(image_file),
                    "--max-image-pixels",
                    limit,
                    "--tile-size",
                    "32",
                    "--patch-size",
                    "16",
                    "--max-tiles",
                    "2",
                ]
            )
            == 0
        )
        assert "90x60 (W x H)" in capsys.readouterr().out
    _one_line_error(capsys, ["demo", "--no-encode", image_file, "--max-image-pixels", "-1"], "--max-image-pixels '-1'")


def _dem_checkpoint(tmp_path):
    """A released-style DEM checkpoint for the tiny ViT (width 192), as safetensors and as a torch file."""
    from safetensors.torch import save_file

    from hrperc.pretrained.inf_llava import released_state_dict

    dem = hrperc.DualPerspectiveEnhancement(192, heads=4)
    sd = {k: v.contiguous() for k, v in released_state_dict(dem).items()}
    st, pt = tmp_path / "dem.safetensors", tmp_path / "dem.pt"
    save_file(sd, st)
    torch.save(sd, pt)
    return st, pt


@pytest.mark.parametrize("damage", ["truncated", "eight_bytes", "empty", "garbage", "huge_header"])
@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_bad_dem_weights_are_one_line(tmp_path, capsys, damage, fmt):
    st, pt = _dem_checkpoint(tmp_path)
    path = st if fmt == "safetensors" else pt
    data = path.read_bytes()
    bad = tmp_path / f"bad.{path.suffix.lstrip('.')}"
    bad.write_bytes(
        {
            "truncated": data[: len(data) // 2],
            "eight_bytes": data[:8],
            "empty": b"",
            "garbage": bytes(range(256)) * 8,
            "huge_header": struct.pack("<Q", 2**62) + b"{}",
        }[damage]
    )
    _one_line_error(capsys, [*DEMO_TINY, "--out", tmp_path / "out", "--dem-weights", bad], str(bad))


def test_a_directory_or_missing_dem_weights_is_one_line(tmp_path, capsys):
    _one_line_error(capsys, [*DEMO_TINY, "--out", tmp_path / "out", "--dem-weights", tmp_path], str(tmp_path))
    _one_line_error(
        capsys, [*DEMO_TINY, "--out", tmp_path / "out", "--dem-weights", tmp_path / "no.safetensors"], "no.safetensors"
    )


def test_backbone_checkpoint_of_another_vit_is_one_line(tmp_path, capsys, image_file):
    import timm
    from safetensors.torch import save_file

    other = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2)  # another ViT: 2 blocks, not 12
    path = tmp_path / "other_vit.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, path)
    line = _one_line_error(capsys, ["encode", image_file, *TINY, "--weights", path], "other_vit.safetensors")
    assert len(line) < 1000
    wrong = tmp_path / "wrong_keys.safetensors"
    save_file({"foo.weight": torch.zeros(3)}, wrong)
    _one_line_error(capsys, ["encode", image_file, *TINY, "--weights", wrong], "wrong_keys.safetensors")


def test_forced_backend_that_cannot_run_is_one_line(image_file, capsys, monkeypatch):
    from hrperc.attention.kernels import window_attention as wa

    monkeypatch.setattr(wa, "_INTERPRET", False)  # a CPU without the interpreter: the kernel cannot run
    monkeypatch.setenv("HRPERC_ATTN_BACKEND", "triton")
    _one_line_error(
        capsys,
        ["encode", image_file, *TINY, "--grid", "1x1"],
        "'triton'",
        "$HRPERC_ATTN_BACKEND",
        "CUDA",
        "unset $HRPERC_ATTN_BACKEND",
    )
    monkeypatch.setenv("HRPERC_ATTN_BACKEND", "nope")
    _one_line_error(capsys, ["encode", image_file, *TINY, "--grid", "1x1"], "$HRPERC_ATTN_BACKEND='nope'", "'sdpa'")


def test_long_messages_keep_their_start_and_end():
    start = "backbone checkpoint 'x.safetensors': 150 missing keys, 200 unexpected keys: "
    end = " Pass strict=False to load what fits."
    msg = one_line(ValueError(start + ", ".join(f"blocks.{i}.attn.qkv.weight" for i in range(300)) + end))
    assert msg.startswith(start.strip()) and msg.endswith(end.strip()) and "characters cut" in msg
    assert len(msg) < 700 and "\n" not in msg
    assert one_line(ValueError("short\n  message")) == "short message"


def test_traceback_flag_still_shows_the_exception(tmp_path):
    bomb = png_declaring(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(ValueError, match="decompression bomb"):
        main(["--traceback", "demo", "--no-encode", "--out", str(tmp_path), str(bomb)])
