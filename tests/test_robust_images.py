"""Images that used to be read wrong: 16-bit and float PIL modes, EXIF
orientation, float pixels outside [0, 1], channels-last tensors, resizing without a full-size float32
copy, and image files that cannot be decoded."""

from __future__ import annotations

import inspect
import io
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _messages import raises_naming, warns_naming
from PIL import Image

from hrperc import DualPerspectiveCrop
from hrperc.cli.args import load_image
from hrperc.ops import canvas as canvas_ops
from hrperc.ops.canvas import place_on_canvas, resize_image
from hrperc.ops.pixels import pil_to_pixels, to_pixels


def _rgb(h=6, w=8, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


# --- PIL modes and EXIF orientation ----------------------------------------------------------
def _gradient16(h=5, w=7) -> np.ndarray:
    return np.linspace(0, 65535, h * w).round().astype(np.uint16).reshape(h, w)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I"])
def test_16_bit_modes_are_scaled_by_65535(mode):
    arr = _gradient16()
    if mode == "I":
        im = Image.fromarray(arr.astype(np.int32))
    else:
        dt = ">u2" if mode == "I;16B" else "<u2"
        im = Image.frombytes(mode, (arr.shape[1], arr.shape[0]), arr.astype(dt).tobytes())
    assert im.mode == mode
    want = torch.from_numpy(arr.astype(np.float32) / np.float32(65535))
    for got in (pil_to_pixels(im), to_pixels(im)[0], to_pixels([im])[0]):
        assert got.shape == (3, *arr.shape) and got.dtype == torch.float32
        torch.testing.assert_close(got, want.expand(3, -1, -1), rtol=0, atol=1e-7)
    assert 0.3 < float(want.mean()) < 0.7  # not clipped to 1.0 (what convert("RGB") did)


def test_16_bit_png_file_and_float_tiff_file(tmp_path):
    arr = _gradient16(9, 11)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    Image.fromarray(np.full((4, 5), 0.5, np.float32)).save(tmp_path / "half.tiff")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")  # PIL's 16-bit mode ("I;16", or "I" in older Pillow)
        torch.testing.assert_close(to_pixels(im)[0, 0], torch.from_numpy(arr / 65535.0).float(), rtol=0, atol=1e-7)
    torch.testing.assert_close(load_image(tmp_path / "g16.png")[1], torch.from_numpy(arr / 65535.0).float())
    with Image.open(tmp_path / "half.tiff") as im:
        assert im.mode == "F" and torch.equal(to_pixels(im), torch.full((1, 3, 4, 5), 0.5))
    assert torch.equal(load_image(tmp_path / "half.tiff"), torch.full((3, 4, 5), 0.5))


@pytest.mark.parametrize("values", [255.0, -0.5, float("nan")])
def test_float_mode_outside_unit_range_is_refused(values, tmp_path):
    data = np.linspace(0, 1, 20, dtype=np.float32).reshape(4, 5)
    data[0, 0] = values
    im = Image.fromarray(data)
    with raises_naming(ValueError, "mode 'F'", "[0, 1]", "check_range=False"):
        to_pixels(im)
    got = to_pixels(im, check_range=False)[0, 0]  # used as it is
    assert torch.equal(got, torch.from_numpy(data)) or bool(torch.isnan(got[0, 0]))
    path = tmp_path / "f.tiff"
    im.save(path)
    with raises_naming(ValueError, str(path), "[0, 1]"):
        load_image(path)


@pytest.mark.parametrize("value", [70000, -1])
def test_int32_mode_outside_16_bit_range_is_refused(value):
    arr = np.zeros((3, 4), np.int32)
    arr[1, 2] = value
    with raises_naming(ValueError, "mode 'I'", str(value), "[0, 65535]", "Convert"):
        to_pixels(Image.fromarray(arr))


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "1", "LA", "CMYK"])
def test_8_bit_modes_are_unchanged(mode):
    im = Image.fromarray(_rgb()).convert(mode)
    want = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
    assert torch.equal(pil_to_pixels(im), want)
    assert torch.equal(pil_to_pixels(im, keep_uint8=True), (want * 255).round().to(torch.uint8))


def _with_orientation(im: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif.tobytes(), quality=95, subsampling=0)
    return buf.getvalue()


def _blocks(h=16, w=40) -> np.ndarray:
    """A landscape picture of flat 8 x 8 blocks (JPEG keeps them nearly exact), no two blocks alike."""
    levels = np.arange((h // 8) * (w // 8)).reshape(h // 8, w // 8) * 25 + 10
    gray = np.kron(levels, np.ones((8, 8))).astype(np.uint8)
    return np.stack([gray, 255 - gray, gray // 2], -1)


@pytest.mark.parametrize("orientation", [3, 6, 8, 5])
def test_exif_orientation_is_applied(orientation, tmp_path):
    upright = _blocks()
    want = torch.from_numpy(upright).permute(2, 0, 1) / 255
    # a camera stores the pixels turned and records how to turn them back
    turn = {
        3: Image.Transpose.ROTATE_180,
        6: Image.Transpose.ROTATE_90,
        8: Image.Transpose.ROTATE_270,
        5: Image.Transpose.TRANSPOSE,
    }[orientation]
    path = tmp_path / "photo.jpg"
    path.write_bytes(_with_orientation(Image.fromarray(upright).transpose(turn), orientation))
    with Image.open(path) as im:
        got = to_pixels(im)[0]
    for img in (got, load_image(path)):
        assert img.shape == (3, 16, 40)
        assert (img - want).abs().max() < 0.05  # JPEG-close, and upright


def test_no_or_identity_orientation_keeps_the_pixels():
    im = Image.open(io.BytesIO(_with_orientation(Image.fromarray(_blocks()), 1)))
    want = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).float() / 255
    assert torch.equal(pil_to_pixels(im), want)


# --- float range, channels-last tensors --------------------------------------------------------
_BAD_FLOATS = {
    "forgot /255": (lambda x: x * 255, "/ 255"),
    "normalized": (lambda x: (x - 0.48) / 0.27, "normalized"),
    "overshoot": (lambda x: x * 1.02, "clamp(0, 1)"),
    "nan": (lambda x: x.index_fill(-1, torch.tensor([0]), float("nan")), "NaN"),
    "inf": (lambda x: x.index_fill(-1, torch.tensor([0]), float("inf")), "inf"),
}


@pytest.mark.parametrize("case", list(_BAD_FLOATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_float_pixels_outside_unit_range_are_refused(case, dtype):
    make, hint = _BAD_FLOATS[case]
    good = torch.rand(3, 6, 7, generator=torch.Generator().manual_seed(0))
    bad = make(good).to(dtype)
    for images, name in (
        (bad, "images"),
        (bad[None], "images[0]"),
        ([good, bad], "images[1]"),
        (torch.stack([good.to(dtype), bad]), "images[1]"),
    ):
        with raises_naming(ValueError, name, "outside [0, 1]", hint, "check_range=False"):
            to_pixels(images)
        out = to_pixels(images, check_range=False)  # the values are used as they are
        got = out[-1] if isinstance(out, list) else out[-1]
        assert torch.equal(got.nan_to_num(), bad.nan_to_num())


def test_unit_range_floats_pass_unchanged():
    x = torch.rand(2, 3, 5, 6)
    x[0, 0, 0, 0], x[1, 2, 4, 5] = 0.0, 1.0
    assert to_pixels(x) is x and to_pixels(x[0])[0].data_ptr() == x[0].data_ptr()


@pytest.mark.parametrize("shape", [(6, 7, 3), (10, 12, 4), (5, 8, 1)])
def test_channels_last_tensor_says_permute(shape):
    with raises_naming(ValueError, str(shape), "permute(2, 0, 1)"):
        to_pixels(torch.rand(shape))
    with raises_naming(ValueError, str((2, *shape)), "permute(0, 3, 1, 2)"):
        to_pixels(torch.rand(2, *shape))
    with raises_naming(ValueError, "images[1]", "permute(2, 0, 1)"):
        to_pixels([torch.rand(3, 5, 5), torch.rand(shape)])


def test_rgba_chw_still_says_drop_alpha():
    with raises_naming(ValueError, "4 channels", "img[:3]"):
        to_pixels(torch.rand(4, 6, 7))


@pytest.mark.parametrize("shape", [(3, 9, 3), (1, 9, 3), (3, 3, 3)])
def test_ambiguous_shape_is_read_channels_first_with_a_warning(shape):
    x = torch.rand(shape)
    with warns_naming(UserWarning, str(shape), "channels first", "permute(2, 0, 1)"):
        out = to_pixels(x)
    assert out.shape == (1, 3, *shape[1:])
    with warns_naming(UserWarning, str((1, *shape)), "permute(0, 3, 1, 2)"):
        to_pixels(x[None])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        to_pixels(torch.rand(3, 9, 5))  # unambiguous: no warning
        to_pixels(torch.rand(3, 4, 4))


# --- resizing without a full-size float32 copy, bit-identical ------------------------------
def _old_resize(img, size, mode, antialias):
    """resize_image as it was: the whole image converted to float32 at once (the reference for chunking)."""
    kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    aa = antialias and mode in ("bilinear", "bicubic")
    return F.interpolate(img.float(), size=tuple(size), mode=mode, antialias=aa, **kw).to(img.dtype)


@pytest.mark.parametrize("chunk", [1, 700, 3 * 700 * 4])  # bytes: one channel, a few, whole images
@pytest.mark.parametrize("mode", canvas_ops.RESIZE_MODES)
def test_chunked_resize_is_bit_identical(chunk, mode, monkeypatch):
    monkeypatch.setattr(canvas_ops, "_RESIZE_CHUNK_BYTES", chunk)
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        img = torch.rand(3, 3, 20, 35, generator=g).to(dtype)
        for size, aa in (((9, 13), True), ((31, 40), False), ((9, 13), False)):
            assert torch.equal(resize_image(img, size, mode, aa), _old_resize(img, size, mode, aa))
    u8 = (torch.rand(2, 3, 20, 35, generator=g) * 255).to(torch.uint8)
    for size, aa in (((9, 13), True), ((31, 40), False)):
        got = resize_image(u8, size, mode, aa, scale_uint8=True)
        assert got.dtype == torch.float32 and torch.equal(got, _old_resize(u8.float() / 255, size, mode, aa))
        assert torch.equal(resize_image(u8, size, mode, aa), _old_resize(u8, size, mode, aa))  # uint8 out as before


@pytest.mark.parametrize("fit", ["resize", "pad", "resize_pad"])
def test_place_on_canvas_scale_uint8_is_bit_identical(fit, monkeypatch):
    monkeypatch.setattr(canvas_ops, "_RESIZE_CHUNK_BYTES", 1)
    u8 = torch.from_numpy(_rgb(30, 50)).permute(2, 0, 1)[None]
    geo = DualPerspectiveCrop(grid="auto", tile_size=16, max_tiles=12, fit=fit).plan((30, 50))
    got = place_on_canvas(u8, geo, "bicubic", False, 0.5, scale_uint8=True)
    want = place_on_canvas(u8.float() / 255, geo, "bicubic", False, 0.5)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    same = DualPerspectiveCrop(grid=(1, 1), tile_size=(30, 50)).plan((30, 50))  # no resize needed
    assert torch.equal(place_on_canvas(u8, same, scale_uint8=True), u8.float() / 255)


def test_scale_uint8_needs_uint8():
    geo = DualPerspectiveCrop(grid=(1, 1), tile_size=8, fit="pad").plan((5, 5))
    with raises_naming(TypeError, "scale_uint8=True", "torch.float32", "scale_uint8=False"):
        resize_image(torch.rand(1, 3, 5, 5), (3, 3), scale_uint8=True)
    with raises_naming(TypeError, "scale_uint8=True", "torch.float32"):
        place_on_canvas(torch.rand(1, 3, 5, 5), geo, scale_uint8=True)


def test_keep_uint8_returns_uint8_until_resized():
    u8 = torch.from_numpy(_rgb()).permute(2, 0, 1)
    assert to_pixels(u8, keep_uint8=True).dtype == torch.uint8
    assert torch.equal(to_pixels(Image.fromarray(_rgb()), keep_uint8=True)[0], u8)
    assert to_pixels(u8[None, :1], keep_uint8=True).shape == (1, 3, 6, 8)
    both = to_pixels([u8, torch.rand(3, 4, 4)], keep_uint8=True)  # a mixed list is all float32
    assert [p.dtype for p in both] == [torch.float32, torch.float32] and torch.equal(both[0], u8.float() / 255)


def test_crop_reads_uint8_exactly_as_float_divided_by_255(monkeypatch):
    """DualPerspectiveCrop with scale_uint8: crops and thumbnail equal those of img.float() / 255, bit for bit."""
    if "scale_uint8" not in inspect.signature(DualPerspectiveCrop.forward).parameters:
        pytest.skip("DualPerspectiveCrop.forward has no scale_uint8 yet (the lead wires it)")
    monkeypatch.setattr(canvas_ops, "_RESIZE_CHUNK_BYTES", 1)
    u8 = torch.from_numpy(_rgb(30, 50)).permute(2, 0, 1)
    for fit in ("resize", "pad", "resize_pad"):
        dcm = DualPerspectiveCrop(grid="auto", tile_size=16, max_tiles=12, fit=fit, fill=0.5)
        got, want = dcm(u8, scale_uint8=True), dcm(u8.float() / 255)
        for a, b in ((got.local, want.local), (got.strided, want.strided), (got.thumbnail, want.thumbnail)):
            assert a.dtype == torch.float32 and torch.equal(a, b)


def test_crop_check_image_accepts_uint8_only_when_scaled():
    dcm = DualPerspectiveCrop(grid=(2, 2), tile_size=8)
    u8 = torch.zeros(1, 3, 10, 10, dtype=torch.uint8)
    dcm._check_image(u8, "images", 4, scale_uint8=True)
    u8 = torch.from_numpy(_rgb(10, 10)).permute(2, 0, 1)[None]
    assert torch.equal(dcm._resize(u8, (8, 8), scale_uint8=True), dcm._resize(u8.float() / 255, (8, 8)))
    with raises_naming(TypeError, "torch.uint8", "img.float() / 255"):
        dcm._check_image(u8, "images", 4)


# --- image files that cannot be decoded name the file ------------------------------------------
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("keep", [0.5, 100, 20, 8])
def test_truncated_image_file_names_the_file(fmt, keep, tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, fmt)
    data = buf.getvalue()
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    with raises_naming(OSError, str(path), "Check the file"):
        load_image(path)


def test_not_an_image_and_missing_file(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    with raises_naming(OSError, str(path), "Check the file"):
        load_image(path)
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png")


def test_encoder_refuses_unscaled_float_pixels():
    from timm.models.vision_transformer import VisionTransformer

    from hrperc import HighResEncoder, wrap_backbone

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=14, patch_size=7, embed_dim=16, depth=2, num_heads=2, num_classes=0)
    enc = HighResEncoder(wrap_backbone(vit), DualPerspectiveCrop(grid=(1, 1), tile_size=14), dem=None, combine="none")
    with raises_naming(ValueError, "images", "[0, 255]", "check_range=False"):
        enc(torch.rand(3, 20, 20) * 255)
    with raises_naming(ValueError, "permute(2, 0, 1)"):
        enc(torch.rand(20, 20, 3))


def test_encoder_check_range_false_passes_self_normalized_pixels():
    from timm.models.vision_transformer import VisionTransformer

    from hrperc import HighResEncoder, wrap_backbone

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=14, patch_size=7, embed_dim=16, depth=2, num_heads=2, num_classes=0)
    crop = DualPerspectiveCrop(grid=(1, 1), tile_size=14)
    enc = HighResEncoder(wrap_backbone(vit), crop, dem=None, combine="none", check_range=False)
    x = torch.rand(3, 20, 20) * 2 - 1  # the caller's own [-1, 1] convention
    out = enc(x)
    assert out.tokens.shape == (1, enc.num_tokens((20, 20)), 16) and torch.isfinite(out.tokens).all()
