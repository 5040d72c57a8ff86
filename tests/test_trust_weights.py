"""Weight files are routed by a complete test of each format, never by one byte.

A safetensors file starts with its 8-byte little-endian header length; headers are 8-byte aligned, so
the first byte takes 32 values, one of which is 0x80, the pickle opcode. Every such file must load, at
every header length, through every entry point that reads weights; pickles, zips, broken safetensors
files and random bytes must still be routed (or refused) as before, naming the file.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from _messages import FIX, raises_naming
from safetensors.torch import save_file

import hrperc
from hrperc._weights import read_weights, safetensors_header, sniff
from hrperc.backbones import create_backbone
from hrperc.pretrained._io import list_keys, load_state_dict
from hrperc.pretrained.inf_llava import load_dem, load_projector, released_state_dict

LOW_BYTES = set(range(0, 256, 8))  # every first byte an 8-byte aligned header length can have
TIMM = "timm:vit_tiny_patch16_224"
TIMM_ARCH = dict(img_size=32, patch_size=16, depth=2, embed_dim=32, num_heads=2, num_classes=0)
# every public entry point that reads one weight file
READERS = {
    "load_dem": lambda path: load_dem(path, heads=2),
    "load_projector": load_projector,
    "load_state_dict": load_state_dict,
    "create_backbone": lambda path: create_backbone(TIMM, pretrained=path, **TIMM_ARCH),
}


def _header_len(data: bytes) -> int:
    return int.from_bytes(data[:8], "little")


def _with_header_length(data: bytes, length: int) -> bytes:
    """The same safetensors file with its JSON header padded with spaces (as the format allows) to ``length``."""
    n = _header_len(data)
    header = data[8 : 8 + n].rstrip(b" ")
    assert length >= len(header), (length, len(header))
    return length.to_bytes(8, "little") + header + b" " * (length - len(header)) + data[8 + n :]


def _lengths(data: bytes, count: int = 32, extra=(0xB80,)) -> list[int]:
    """``count`` consecutive 8-byte aligned header lengths from the shortest the file allows (with the default 32,
    every low byte 0x00..0xF8), plus ``extra`` ones that fit."""
    shortest = len(data[8 : 8 + _header_len(data)].rstrip(b" "))
    first = -(-shortest // 8) * 8
    out = [first + 8 * i for i in range(count)] + [n for n in extra if n >= shortest]
    return sorted(set(out))


def _dem_file_bytes(tmp_path, dim=32, heads=2):
    torch.manual_seed(0)
    dem = hrperc.DualPerspectiveEnhancement(dim, heads)
    for p in dem.parameters():
        torch.nn.init.normal_(p, std=0.1)
    sd = {"model.spatial_embed." + k: v.detach().clone().contiguous() for k, v in released_state_dict(dem).items()}
    path = tmp_path / "dem_src.safetensors"
    save_file(sd, str(path))
    return dem, sd, path.read_bytes()


def _projector_file_bytes(tmp_path, d_in=16, d_out=24):
    torch.manual_seed(1)
    sd = {
        "model.mm_projector.0.weight": torch.randn(d_out, d_in),
        "model.mm_projector.0.bias": torch.randn(d_out),
        "model.mm_projector.2.weight": torch.randn(d_out, d_out),
        "model.mm_projector.2.bias": torch.randn(d_out),
    }
    path = tmp_path / "proj_src.safetensors"
    save_file(sd, str(path))
    return sd, path.read_bytes()


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- valid safetensors files load at every header length --------------------------------------------------
def test_the_reader_routes_safetensors_at_every_aligned_header_length(tmp_path):
    path = tmp_path / "w.bin"
    w = torch.arange(6.0)[:, None]
    save_file({"w": w}, str(path))
    data = path.read_bytes()
    lengths = list(range(-(-_header_len(data) // 8) * 8, 0xC08, 8))  # 0x40 .. 0xC00: 0x80, 0x180, ..., 0xB80
    assert {0x80, 0x180, 0xB80} <= set(lengths) and {n % 256 for n in lengths} == LOW_BYTES
    wrong = []
    for n in lengths:
        path.write_bytes(_with_header_length(data, n))
        got = read_weights(path)
        if sniff(path) != "safetensors" or list(got) != ["w"] or not torch.equal(got["w"], w):
            wrong.append(hex(n))
        if safetensors_header(path) != {"w": ("F32", (6, 1))} or list_keys(path) != ["w"]:
            wrong.append(f"header {hex(n)}")
    assert not wrong, wrong


def test_safetensors_written_by_the_library_with_metadata_of_every_length_load(tmp_path):
    """``save_file`` aligns its header itself; metadata of growing length walks it through every low byte."""
    dem, sd, _ = _dem_file_bytes(tmp_path)
    seen, wrong = set(), []
    for k in range(0, 256, 3):
        path = tmp_path / f"meta{k}.safetensors"
        save_file(sd, str(path), metadata={"note": "x" * k})
        seen.add(_header_len(path.read_bytes()) % 256)
        if sniff(path) != "safetensors" or not _same(load_dem(path, heads=2), dem):
            wrong.append(k)
    assert not wrong and seen == LOW_BYTES, (wrong, sorted(LOW_BYTES - seen))


def test_load_dem_and_load_projector_read_every_header_length(tmp_path):
    dem, dem_sd, dem_data = _dem_file_bytes(tmp_path)
    proj_sd, proj_data = _projector_file_bytes(tmp_path)
    for data in (dem_data, proj_data):
        assert {n % 256 for n in _lengths(data)} == LOW_BYTES
    wrong = []
    for n in _lengths(dem_data):
        path = tmp_path / f"dem_{n}.bin"  # a safetensors file, named .bin: routed by content
        path.write_bytes(_with_header_length(dem_data, n))
        if not _same(load_dem(path, heads=2), dem) or set(load_state_dict(path)) != set(dem_sd):
            wrong.append(f"dem {hex(n)}")
    for n in _lengths(proj_data):
        path = tmp_path / f"proj_{n}.safetensors"
        path.write_bytes(_with_header_length(proj_data, n))
        got = load_projector(path).state_dict()
        if any(not torch.equal(got[k], proj_sd["model.mm_projector." + k]) for k in got):
            wrong.append(f"projector {hex(n)}")
    assert not wrong, wrong


def test_create_backbone_reads_every_header_length(tmp_path):
    import timm

    torch.manual_seed(0)
    src = timm.create_model("vit_tiny_patch16_224", **TIMM_ARCH).eval()
    path = tmp_path / "src.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    data = path.read_bytes()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = create_backbone(TIMM, pretrained=path, **TIMM_ARCH).features(x)
        wrong = []
        for n in _lengths(data, extra=(0xB80, 0x1080)):
            path = tmp_path / f"vit_{n}.safetensors"
            path.write_bytes(_with_header_length(data, n))
            bb = create_backbone(TIMM, pretrained=path, **TIMM_ARCH)
            if not torch.equal(bb.features(x), ref) or bb.source != str(path):
                wrong.append(hex(n))
    assert not wrong, wrong


def test_the_cli_reads_weights_whose_header_length_starts_with_0x80(tmp_path, capsys):
    import timm

    from hrperc.cli import main

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=0).state_dict()
    save_file({k: v.contiguous() for k, v in vit.items()}, str(tmp_path / "vit.safetensors"))
    _, _, dem_data = _dem_file_bytes(tmp_path, dim=192, heads=8)  # the CLI's DEM: the ViT's width, 8 heads
    files = {}
    for name, data in (("vit", (tmp_path / "vit.safetensors").read_bytes()), ("dem", dem_data)):
        n = next(n for n in _lengths(data, count=64) if n % 256 == 0x80)
        files[name] = tmp_path / f"{name}_0x80.bin"
        files[name].write_bytes(_with_header_length(data, n))
        assert files[name].read_bytes()[:1] == b"\x80"
    argv = [
        "demo",
        "--out",
        str(tmp_path / "out"),
        "--backbone",
        TIMM,
        "--tile-size",
        "64",
        "--patch-size",
        "16",
        "--max-tiles",
        "4",
        "--weights",
        str(files["vit"]),
        "--dem-weights",
        str(files["dem"]),
    ]
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "pickle" not in err and str(files["vit"]) in out
    # a truncated one still says truncated, naming the file, in one line
    files["dem"].write_bytes(files["dem"].read_bytes()[:200])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(files["dem"]) in err and "truncated" in err and "Traceback" not in err and "pickle" not in err


# --- other formats, and broken files, routed or refused naming the file -----------------------------------
class _Obj:
    """Not a tensor: ``torch.load(weights_only=True)`` refuses to build it."""

    def __init__(self):
        self.x = 1


def test_torch_files_are_still_routed_to_torch(tmp_path):
    dem, sd, _ = _dem_file_bytes(tmp_path)
    zipped, legacy = tmp_path / "w.pt", tmp_path / "legacy.pt"
    torch.save(sd, zipped)
    torch.save(sd, legacy, _use_new_zipfile_serialization=False)
    assert sniff(zipped) == "torch-zip" and sniff(legacy) == "torch-pickle"
    for path in (zipped, legacy):
        assert _same(load_dem(path, heads=2), dem)
    # a pickle holding other objects is refused unless allow_pickle (trusted files only)
    evil = tmp_path / "objects.safetensors"
    torch.save(dict(sd, extra=_Obj()), evil, _use_new_zipfile_serialization=False)
    assert sniff(evil) == "torch-pickle"
    for reader in READERS.values():
        with raises_naming(ValueError, str(evil), "pickle", "safetensors", FIX):
            reader(evil)
    assert _same(load_dem(evil, heads=2, allow_pickle=True), dem)


def _broken(data: bytes, n: int) -> dict[str, tuple[bytes, list[str]]]:
    """Broken versions of a safetensors file whose header is ``n`` bytes, with what their message must name."""
    padded = _with_header_length(data, n)
    body = padded[8 + n :]
    return {
        "truncated header": (padded[: 8 + n // 2], ["truncated"]),
        "truncated data": (padded[: 8 + n + len(body) // 2], ["truncated"]),
        "length beyond the file": ((len(padded) + 8).to_bytes(8, "little") + padded[8:], [str(len(padded) + 8)]),
        "length 2**40": ((2**40 + n).to_bytes(8, "little") + padded[8:], [str(2**40 + n), "truncated"]),
        "not json": (padded[:9] + b"\xff" * (n - 1) + body, ["header"]),
        "unclosed json": (padded[:9] + b" " * (n - 1) + body, ["header"]),
        "malformed entry": (padded[:8] + json.dumps({"w": "x"}).encode().ljust(n) + body, ["malformed", "'w'"]),
        "header length 0": (b"\0" * 8 + b"{}" + body, ["0-byte header"]),
        "header length 1": (b"\1" + b"\0" * 7 + b"{}" + body, ["1-byte header"]),
    }


@pytest.mark.parametrize("low", [0x00, 0x80, 0xB8])
def test_broken_safetensors_files_say_what_is_wrong_never_pickle(tmp_path, low):
    """At header lengths whose first byte is the pickle opcode (0x80) and others."""
    _, _, data = _dem_file_bytes(tmp_path)
    n = next(n for n in _lengths(data, count=64) if n % 256 == low)
    for case, (bad, fragments) in _broken(data, n).items():
        path = tmp_path / f"{case.replace(' ', '_')}.safetensors"
        path.write_bytes(bad)
        assert sniff(path) == "safetensors", case
        for reader in READERS.values():
            with raises_naming(ValueError, str(path), *fragments, FIX) as info:
                reader(path)
            assert "pickle" not in str(info.value), case


def test_a_header_that_is_json_but_not_an_object_is_refused(tmp_path):
    """'[' where the header's '{' belongs: not safetensors; a 0x80 <protocol> start makes it a (bad) pickle."""
    _, _, data = _dem_file_bytes(tmp_path)
    for n in (n for n in _lengths(data, count=64) if n % 256 in (0x00, 0x80)):
        padded = _with_header_length(data, n)
        path = tmp_path / f"list_{n}.safetensors"
        path.write_bytes(padded[:8] + b"[" + b" " * (n - 2) + b"]" + padded[8 + n :])
        for reader in READERS.values():
            with raises_naming(ValueError, str(path), FIX):
                reader(path)


@pytest.mark.parametrize("seed", range(6))
def test_random_bytes_are_refused_naming_the_file(tmp_path, seed):
    rng = random.Random(seed)
    prefix = [b"", b"\x80", b"\x80\x02", b"PK\x03\x04", b"\x80\x0b\0\0\0\0\0\0", b"\x10\0\0\0\0\0\0\0{"][seed]
    path = tmp_path / "random.bin"
    path.write_bytes(prefix + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 3000))))
    for reader in (lambda p: read_weights(p), *READERS.values()):
        with raises_naming(ValueError, str(path), FIX):
            reader(path)
