"""``hrperc encode`` and the encoder half of ``hrperc demo``, with a small timm ViT."""

from __future__ import annotations

import numpy as np
import pytest
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
    rc = main(["encode", str(image_file), str(image_file), "--backbone", "timm:vit_tiny_patch16_224",
               "--grid", "2x2", "--max-tiles", "4"])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0
    assert "RANDOM weights" in text
    assert text.count("grid 2x2 (N=4)") == 2
    assert "ViT passes 9 of 9" in text  # 2x2 bilinear by 2 reads every sub-image
    assert "tokens     196 x 192: mean(thumbnail, dem) 196 (14x14)" in text
    assert "backbone" in text and "peak memory" in text and "time (ms)" in text
    with pytest.raises(FileNotFoundError, match="never downloads"):
        main(["encode", str(image_file), "--backbone", "timm:vit_tiny_patch16_224", "--weights", "/nope.bin"])


def test_demo_runs_front_end_and_draws_attention(tmp_path, capsys):
    rc = main(["demo", "--out", str(tmp_path), "--backbone", "timm:vit_tiny_patch16_224", "--tile-size", "64",
               "--patch-size", "16", "--max-tiles", "6"])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0
    assert (tmp_path / "crops.png").stat().st_size > 1000
    assert (tmp_path / "attention.png").stat().st_size > 1000
    assert "RANDOM weights" in text and "1 prefix tokens" in text
    assert "tokens     16 x 192: mean(thumbnail, dem) 16 (4x4)" in text
