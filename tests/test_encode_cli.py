"""``hrperc encode`` and the encoder half of ``hrperc demo``, with a small timm ViT."""

from __future__ import annotations

import numpy as np
import pytest
from _messages import assert_names, raises_naming
from PIL import Image

from hrperc.cli import main


@pytest.fixture
def image_file(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, size=(90, 130, 3), dtype=np.uint8)
    path = tmp_path / "img.png"
    Image.fromarray(arr).save(path)
    return path


def test_encode_prints_geometry_tokens_timings_memory(image_file, capsys):
    # the CLI builds the named model at its default size (224); a 2x2 grid keeps this quick
    rc = main(
        [
            "encode",
            str(image_file),
            str(image_file),
            "--backbone",
            "timm:vit_tiny_patch16_224",
            "--grid",
            "2x2",
            "--max-tiles",
            "4",
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0
    assert "RANDOM weights" in text
    assert text.count("grid 2x2 (N=4)") == 2
    assert "ViT passes 9 of 9" in text  # 2x2 bilinear by 2 reads every sub-image
    assert "tokens     196 x 192: mean(thumbnail, dem) 196 (14x14)" in text
    assert "backbone" in text and "peak memory" in text and "time (ms)" in text
    # library errors end the program with one line on stderr and exit code 2, not a traceback
    rc = main(["encode", str(image_file), "--backbone", "timm:vit_tiny_patch16_224", "--weights", "/nope.bin"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "hrperc encode: error:" in err and "--weights '/nope.bin'" in err and "does not exist" in err
    assert "drop --weights" in err and "Traceback" not in err  # the fix: random weights


def test_demo_runs_front_end_and_draws_attention(tmp_path, capsys):
    rc = main(
        [
            "demo",
            "--out",
            str(tmp_path),
            "--backbone",
            "timm:vit_tiny_patch16_224",
            "--tile-size",
            "64",
            "--patch-size",
            "16",
            "--max-tiles",
            "6",
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0
    assert (tmp_path / "crops.png").stat().st_size > 1000
    assert (tmp_path / "attention.png").stat().st_size > 1000
    assert "RANDOM weights" in text and "1 prefix tokens" in text
    assert "tokens     16 x 192: mean(thumbnail, dem) 16 (4x4)" in text


def test_cli_errors_are_one_line_with_exit_code_2(image_file, capsys):
    cases = [
        (["encode", str(image_file), "--backbone", "vit_tiny"], ["name='vit_tiny'", "'timm:<model>'"]),
        (
            ["encode", str(image_file), "--backbone", "timm:vit_tiny_patch16_224", "--no-dem", "--combine", "mean"],
            ["--combine mean", "--no-dem", "--combine concat"],
        ),
        (["encode", "/nope.png", "--backbone", "timm:vit_tiny_patch16_224"], ["'/nope.png'"]),
        (
            ["encode", str(image_file), "--backbone", "timm:vit_tiny_patch16_224", "--layer", "40"],
            ["layer=40", "1..12", "-12..-1"],
        ),
    ]
    for argv, names in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert_names(err, *names)
    with raises_naming(ValueError, "name='vit_tiny'", "'timm:<model>'"):  # --traceback: the exception itself
        main(["--traceback", "encode", str(image_file), "--backbone", "vit_tiny"])


def test_encode_no_dem_defaults_to_concat(image_file, capsys):
    rc = main(
        [
            "encode",
            str(image_file),
            "--backbone",
            "timm:vit_tiny_patch16_224",
            "--grid",
            "2x2",
            "--max-tiles",
            "4",
            "--no-dem",
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0
    assert "combine='concat'" in text and "dem=none" in text
    assert "tokens     1764 x 192: thumbnail 196 (14x14), local 784 (28x28), global 784 (28x28)" in text
    rc = main(
        [
            "encode",
            str(image_file),
            "--backbone",
            "timm:vit_tiny_patch16_224",
            "--grid",
            "2x2",
            "--max-tiles",
            "4",
            "--no-dem",
            "--combine",
            "none",
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0 and "tokens     1568 x 192: local 784 (28x28), global 784 (28x28)" in text
    assert "ViT passes 8 of 9" in text  # the thumbnail never reaches the tokens with combine none


def test_demo_no_dem(tmp_path, capsys):
    rc = main(
        [
            "demo",
            "--out",
            str(tmp_path),
            "--backbone",
            "timm:vit_tiny_patch16_224",
            "--tile-size",
            "64",
            "--max-tiles",
            "6",
            "--no-dem",
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0
    assert (tmp_path / "crops.png").is_file() and not (tmp_path / "attention.png").exists()
    assert "-> no DEM -> combine='concat'" in text
    assert "to the LLM: 208 tokens (thumbnail 16, local 96, global 96; combine='concat')" in text
    assert "tokens     208 x 192: thumbnail 16 (4x4), local 96 (8x12), global 96 (8x12)" in text


def test_demo_geometry_comes_from_the_backbone(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14
    )
    transformers.CLIPVisionModel(cfg).save_pretrained(tmp_path / "clip")
    rc = main(
        [
            "demo",
            "--out",
            str(tmp_path / "out"),
            "--backbone",
            f"hf:{tmp_path / 'clip'}",
            "--tile-size",
            "64",
            "--patch-size",
            "16",
            "--max-tiles",
            "4",
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0
    assert "--tile-size 64 ignored" in text and "has 28x28 tiles" in text
    assert "--patch-size 16 ignored" in text and "has 14x14 patches" in text
    # the crop half and the encoder half agree: 28 px tiles, 2x2 tokens per tile
    assert "tiles 28x28" in text and "tokens       patch 14: 4 per sub-image" in text
    assert "to the LLM: 4 tokens" in text and "tokens     4 x 32: mean(thumbnail, dem) 4 (2x2)" in text


def test_demo_without_matplotlib_runs_end_to_end_and_names_the_extra(tmp_path, capsys, monkeypatch):
    # A plain `pip install hrperc` has no matplotlib: the demo still crops and encodes, and skips the pictures.
    import hrperc.cli.demo
    import hrperc.cli.plots

    monkeypatch.setattr(hrperc.cli.demo, "has_matplotlib", lambda: False)
    monkeypatch.setattr(hrperc.cli.plots, "has_matplotlib", lambda: False)
    rc = main(
        [
            "demo",
            "--out",
            str(tmp_path),
            "--backbone",
            "timm:vit_tiny_patch16_224",
            "--tile-size",
            "64",
            "--max-tiles",
            "4",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "to the LLM" in out and "time (ms)" in out  # the encoder ran
    assert out.count("hrperc[plot]") == 1  # one line names the extra
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample.png"]  # no pictures drawn
