"""Hostile and broken weight files: a clear error naming the file, or the right load.

Backbone checkpoints load strictly; weight files are routed by their first bytes; a released file's
shapes are checked against limits and each other before a module is built; wrapped checkpoints unwrap.
"""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from _messages import FIX, raises_naming, warns_naming
from safetensors.torch import save_file

import hrperc
import hrperc.pretrained.inf_llava as inf_llava
from hrperc._weights import read_weights
from hrperc.backbones import create_backbone
from hrperc.pretrained._io import load_state_dict
from hrperc.pretrained.inf_llava import load_dem, load_projector, released_state_dict


def _dem_sd(dim=32, heads=2, seed=0):
    torch.manual_seed(seed)
    dem = hrperc.DualPerspectiveEnhancement(dim, heads)
    for p in dem.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return dem, {k: v.detach().clone().contiguous() for k, v in released_state_dict(dem).items()}


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- routed by content, never by name; errors name the file ---------------------------------------------
def test_files_are_routed_by_content_not_by_extension(tmp_path):
    dem, sd = _dem_sd()
    full = {"model.spatial_embed." + k: v for k, v in sd.items()}
    st_as_bin = tmp_path / "weights.bin"
    save_file(full, str(st_as_bin))
    torch_as_st = tmp_path / "weights.safetensors"
    torch.save(full, torch_as_st)
    no_suffix = tmp_path / "weights"
    save_file(full, str(no_suffix))
    for path in (st_as_bin, torch_as_st, no_suffix, str(st_as_bin)):
        assert _same(load_dem(path, heads=2), dem), path
    assert set(read_weights(st_as_bin)) == set(full)


class _Evil:
    """Unpickling it would create a file: proof that nothing was executed."""

    target = ""

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.mark.parametrize("how", ["torch.save", "legacy torch.save", "raw pickle"])
@pytest.mark.parametrize("name", ["evil.pt", "evil.safetensors", "evil.bin"])
def test_pickles_are_refused_without_advice_to_unpickle(tmp_path, how, name):
    witness = tmp_path / "executed"
    evil = _Evil()
    evil.target = str(witness)
    path = tmp_path / name
    obj = {"spatial_embed.attention.linears.0.weight": torch.zeros(2, 2), "x": evil}
    if how == "torch.save":
        torch.save(obj, path)
    elif how == "legacy torch.save":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))
    calls = (lambda: load_dem(path, heads=2), lambda: create_backbone("timm:vit_tiny_patch16_224", pretrained=path))
    for call in calls:
        with raises_naming(ValueError, str(path), "pickle", "safetensors", "trusted environment") as info:
            call()
        assert "allow_pickle" not in str(info.value) and "add_safe_globals" not in str(info.value)
    assert not witness.exists()


def _truncations(tmp_path):
    _, sd = _dem_sd()
    good = tmp_path / "good.safetensors"
    save_file(sd, str(good))
    data = good.read_bytes()
    n = int.from_bytes(data[:8], "little")
    cases = {
        "empty": (b"", ["empty", "0 bytes"]),
        "eight bytes": (data[:8], ["8-byte", "truncated"]),
        "half header": (data[: 8 + n // 2], ["header", "truncated"]),
        "half data": (data[: len(data) // 2], ["truncated"]),
        "header length 2**62": ((2**62).to_bytes(8, "little") + data[8:], [str(2**62), "truncated"]),
        "not json": (data[:8] + b"{" + b"\xff" * (n - 1) + data[8 + n :], ["header"]),
        "html page": (b"<!DOCTYPE html><html>404</html>", ["neither a safetensors", "torch"]),
    }
    return cases


@pytest.mark.parametrize(
    "case", ["empty", "eight bytes", "half header", "half data", "header length 2**62", "not json", "html page"]
)
@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_broken_safetensors_errors_name_the_file(tmp_path, case, suffix):
    data, fragments = _truncations(tmp_path)[case]
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(data)
    with raises_naming(ValueError, str(path), *fragments, FIX):
        load_dem(path, heads=2)
    with raises_naming(ValueError, str(path), *fragments):
        create_backbone("timm:vit_tiny_patch16_224", pretrained=path)


def test_broken_torch_zips_and_other_zips_name_the_file(tmp_path):
    _, sd = _dem_sd()
    good = tmp_path / "good.pt"
    torch.save(sd, good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with raises_naming(ValueError, str(cut), "truncated", "fetch the file again", FIX):
        load_dem(cut, heads=2)
    legacy = tmp_path / "legacy.pt"
    torch.save(sd, legacy, _use_new_zipfile_serialization=False)
    assert set(load_state_dict(legacy)) == set(sd)  # a legacy torch file of tensors loads
    legacy.write_bytes(legacy.read_bytes()[:-5])
    with raises_naming(ValueError, str(legacy), "truncated or corrupt", FIX):
        load_state_dict(legacy)
    import numpy as np

    npz = tmp_path / "weights.npz"
    np.savez(npz, w=np.zeros(3))
    with raises_naming(ValueError, str(npz), "not a torch checkpoint", "safetensors"):
        load_state_dict(npz)


def test_a_directory_as_a_weight_file_says_so(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    with raises_naming(IsADirectoryError, str(folder), "directory", "Pass"):
        read_weights(folder)
    with raises_naming(FileNotFoundError, str(folder), "holds no checkpoint"):
        load_dem(folder, heads=2)
    with raises_naming(FileNotFoundError, str(folder), "folder without a checkpoint"):
        create_backbone("timm:vit_tiny_patch16_224", pretrained=folder)


# --- wrapped checkpoints ---------------------------------------------------------------------------------
@pytest.mark.parametrize("wrapper", ["state_dict", "model", "module", "model_state_dict"])
def test_wrapped_checkpoints_are_unwrapped(tmp_path, wrapper):
    dem, sd = _dem_sd()
    ckpt = {
        wrapper: {"model.spatial_embed." + k: v for k, v in sd.items()},
        "epoch": 3,
        "global_step": 10,
        "optimizer_states": [{"lr": 0.1}],
        "hyper_parameters": {"lr": 0.1},
        "pytorch-lightning_version": "2.0",
    }
    torch.save(ckpt, tmp_path / "last.ckpt")
    assert _same(load_dem(tmp_path / "last.ckpt", heads=2), dem)
    assert _same(load_dem(ckpt, heads=2), dem)


def test_unknown_wrappers_name_the_key_to_use(tmp_path):
    _, sd = _dem_sd()
    ckpt = {"weights": sd, "epoch": 3}
    torch.save(ckpt, tmp_path / "c.pt")
    with raises_naming(TypeError, "'weights'", "ckpt['weights']", str(tmp_path / "c.pt")):
        load_dem(tmp_path / "c.pt", heads=2)
    dem = load_dem(ckpt["weights"], heads=2)
    assert dem.dim == 32


def test_backbone_checkpoints_unwrap_and_drop_the_ddp_prefix(tmp_path):
    import timm

    arch = dict(img_size=32, patch_size=16, depth=2, embed_dim=32, num_heads=2)
    src = timm.create_model("vit_tiny_patch16_224", **arch).eval()
    sd = src.state_dict()
    torch.save({"state_dict": sd, "epoch": 1}, tmp_path / "lightning.ckpt")
    torch.save({"module." + k: v for k, v in sd.items()}, tmp_path / "ddp.pt")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = create_backbone("timm:vit_tiny_patch16_224", pretrained=_save(tmp_path, sd), **arch).features(x)
        for name in ("lightning.ckpt", "ddp.pt"):
            bb = create_backbone("timm:vit_tiny_patch16_224", pretrained=tmp_path / name, **arch)
            assert torch.equal(bb.features(x), ref) and bb.source == str(tmp_path / name)


def _save(tmp_path, sd, name="w.safetensors"):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


# --- two copies, integer / bool weights, NaN / Inf --------------------------------------------------------
def test_two_copies_of_the_dem_are_refused_unless_prefix_picks_one(tmp_path):
    dem_a, sd_a = _dem_sd(seed=1)
    dem_b, sd_b = _dem_sd(seed=2)
    both = {"model.spatial_embed." + k: v for k, v in sd_a.items()}
    both |= {"ema.spatial_embed." + k: v for k, v in sd_b.items()}
    path = _save(tmp_path, both)
    for src in (both, path):
        with raises_naming(ValueError, "'ema.spatial_embed.'", "'model.spatial_embed.'", "prefix="):
            load_dem(src, heads=2)
        assert _same(load_dem(src, heads=2, prefix="ema.spatial_embed."), dem_b)
        assert _same(load_dem(src, heads=2, prefix="model."), dem_a)
        with raises_naming(ValueError, "prefix='student.'", "'ema.spatial_embed.'"):
            load_dem(src, heads=2, prefix="student.")
    proj = hrperc.modules.build_projector("mlp2x_gelu", 8, 16)
    twice = {f"{p}.mm_projector.{k}": v for p in ("model", "ema") for k, v in proj.state_dict().items()}
    with raises_naming(ValueError, "'ema.mm_projector.'", "'model.mm_projector.'", "prefix="):
        load_projector(twice)
    assert _same(load_projector(twice, prefix="ema.mm_projector."), proj)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.uint8, torch.bool])
def test_integer_and_bool_weights_are_refused_not_cast(tmp_path, dtype):
    _, sd = _dem_sd()
    sd["ln_fuse.weight"] = torch.ones(sd["ln_fuse.weight"].shape, dtype=dtype)
    name = str(dtype).replace("torch.", "")
    with raises_naming(ValueError, "ln_fuse.weight", name, "floating point", ".float()"):
        load_dem(sd, heads=2)
    with raises_naming(ValueError, "ln_fuse.weight", name):
        load_dem(_save(tmp_path, sd), heads=2)
    proj = dict(hrperc.modules.build_projector("mlp2x_gelu", 8, 16).state_dict())
    proj["2.bias"] = proj["2.bias"].to(dtype)
    with raises_naming(ValueError, "2.bias", name):
        load_projector(proj)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf_weights_are_refused(tmp_path, bad):
    _, sd = _dem_sd()
    w = sd["attention.linears.2.weight"].clone()
    w[0, :3] = bad
    sd["attention.linears.2.weight"] = w
    with raises_naming(ValueError, "attention.linears.2.weight", f"3 of {w.numel()}", "NaN or Inf", "Use another"):
        load_dem(_save(tmp_path, sd), heads=2)
    proj = dict(hrperc.modules.build_projector("mlp2x_gelu", 8, 16).state_dict())
    proj["0.bias"] = torch.full((16,), bad)
    with raises_naming(ValueError, "0.bias", "16 of 16", "NaN or Inf"):
        load_projector(proj)


# --- shapes checked against limits and each other before a module is built -------------------------------
@pytest.fixture
def no_real_build(monkeypatch):
    """Fail if load_dem / load_projector build a module anywhere but on the meta device."""
    built = []
    dem_cls, build = inf_llava.DualPerspectiveEnhancement, inf_llava.build_projector

    def dem(*a, device=None, **kw):
        built.append(("dem", device))
        return dem_cls(*a, device=device, **kw)

    def proj(*a, device=None, **kw):
        built.append(("projector", device))
        return build(*a, device=device, **kw)

    monkeypatch.setattr(inf_llava, "DualPerspectiveEnhancement", dem)
    monkeypatch.setattr(inf_llava, "build_projector", proj)
    yield built
    assert all(d == "meta" for _, d in built), built


def test_a_small_file_declaring_a_huge_dem_is_refused_before_any_allocation(tmp_path, no_real_build):
    path = _save(tmp_path, {"model.spatial_embed.attention.linears.0.weight": torch.zeros(1, 65536)})
    assert path.stat().st_size < 300_000
    with raises_naming(ValueError, str((1, 65536)), "D=65536", str(inf_llava.MAX_DEM_DIM), "Check"):
        load_dem(path, heads=8)
    assert not no_real_build


def test_inconsistent_dem_shapes_are_refused_before_the_real_module(no_real_build):
    _, sd = _dem_sd(dim=32)
    sd["attention.linears.1.weight"] = torch.zeros(32, 4096)  # k projection of another width
    sd["ffn_crop.0.weight"] = torch.zeros(7, 32)
    with raises_naming(ValueError, "attention.linears.1.weight", "(32, 4096)", "ffn_crop.0.weight", "(7, 32)"):
        load_dem(sd, heads=2)
    big = {"attention.linears.0.weight": torch.zeros(8192, 8192)}  # within the limit, but alone
    with raises_naming(ValueError, "missing keys", "attention.linears.0.bias"):
        load_dem(big, heads=8)
    with raises_naming(ValueError, "D=12", "heads=8", "Pass the heads"):
        load_dem({"attention.linears.0.weight": torch.zeros(12, 12)}, heads=8)
    assert no_real_build == [("dem", "meta"), ("dem", "meta")]


@pytest.mark.parametrize("shape, fragment", [((1, 100000), "100000 ->"), ((40000, 1), "-> 40000")])
def test_a_small_file_declaring_a_huge_projector_is_refused(tmp_path, no_real_build, shape, fragment):
    path = _save(tmp_path, {"model.mm_projector.0.weight": torch.zeros(shape)})
    with raises_naming(ValueError, str(shape), fragment, str(inf_llava.MAX_PROJECTOR_IN), "Check"):
        load_projector(path)
    sd = {
        "0.weight": torch.zeros(16, 8),
        "0.bias": torch.zeros(16),
        "2.weight": torch.zeros(30000, 16),
        "2.bias": torch.zeros(16),
    }
    with raises_naming(ValueError, "2.weight", "(30000, 16)", "(16, 16)"):
        load_projector(sd)
    assert all(d == "meta" for _, d in no_real_build)


def test_dem_and_projector_that_fit_still_load_exactly(tmp_path):
    dem, sd = _dem_sd(dim=48, heads=4)
    assert _same(load_dem(_save(tmp_path, {"m.spatial_embed." + k: v for k, v in sd.items()}), heads=4), dem)
    proj = hrperc.modules.build_projector("mlp2x_gelu", 8, 16)
    x = torch.randn(1, 3, 8)
    assert torch.equal(load_projector({"model.mm_projector." + k: v for k, v in proj.state_dict().items()})(x), proj(x))


# --- strict backbone loading -------------------------------------------------------------------------------
_ARCH = dict(img_size=32, patch_size=16, depth=2, embed_dim=32, num_heads=2)


def _timm_sd(**kw):
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", **(_ARCH | {"num_classes": 0} | kw)).state_dict()


def test_timm_checkpoints_that_do_not_fit_are_refused(tmp_path):
    sd = _timm_sd()
    keys = sorted(sd)
    cases = {
        "wrong keys": ({"encoder." + k: v for k, v in sd.items()}, ["missing keys", "unexpected keys", "'encoder."]),
        "half the keys": ({k: sd[k] for k in keys[::2]}, ["missing keys", f"{len(keys) - len(keys[::2])} missing"]),
        "another model": (_timm_sd(embed_dim=64), ["shape mismatches", "(64,)", "(32,)"]),
        "integer weights": (
            {k: v.to(torch.int32) if k == "norm.weight" else v for k, v in sd.items()},
            ["integer", "norm.weight"],
        ),
        "nan weights": (
            {k: torch.full_like(v, float("nan")) if k == "pos_embed" else v for k, v in sd.items()},
            ["NaN or Inf", "'pos_embed'"],
        ),
    }
    for case, (bad, fragments) in cases.items():
        path = _save(tmp_path, bad, f"{case.replace(' ', '_')}.safetensors")
        with raises_naming(ValueError, str(path), "'vit_tiny_patch16_224'", "strict=False", *fragments):
            create_backbone("timm:vit_tiny_patch16_224", pretrained=path, **_ARCH)


def test_timm_non_strict_loads_what_fits_and_warns_what_stayed_random(tmp_path):
    sd = _timm_sd()
    half = {k: v for k, v in sd.items() if not k.startswith("blocks.1.")}
    path = _save(tmp_path, half | {"extra.weight": torch.zeros(3)})
    with warns_naming(UserWarning, str(path), "stayed random", "blocks.1.", "'extra.weight'"):
        bb = create_backbone("timm:vit_tiny_patch16_224", pretrained=path, strict=False, **_ARCH)
    assert bb.source == str(path)
    got = bb.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in half.items())
    assert not torch.equal(got["blocks.1.mlp.fc1.weight"], sd["blocks.1.mlp.fc1.weight"])
    nothing = _save(tmp_path, {"other." + k: v for k, v in sd.items()}, "nothing.safetensors")
    with warns_naming(UserWarning, "stayed random"):
        bb = create_backbone("timm:vit_tiny_patch16_224", pretrained=nothing, strict=False, **_ARCH)
    assert bb.source is None  # nothing loaded: no source recorded
    with raises_naming(TypeError, "strict='no'"):
        create_backbone("timm:vit_tiny_patch16_224", strict="no")


def test_timm_keeps_its_checkpoint_filters(tmp_path):
    """A checkpoint with the 1000-class head and a pos-embed of another size still loads (timm's own filter)."""
    import timm

    src = timm.create_model("vit_tiny_patch16_224", **(_ARCH | {"img_size": 48})).eval()
    bb = create_backbone("timm:vit_tiny_patch16_224", pretrained=_save(tmp_path, src.state_dict()), **_ARCH)
    assert bb.model.pos_embed.shape[1] == 1 + 4 and torch.equal(
        bb.model.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight
    )


_OC_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 28, "layers": 2, "width": 32, "patch_size": 14, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def oc_name(tmp_path_factory):
    import open_clip

    folder = tmp_path_factory.mktemp("oc_cfg_robust")
    (folder / "hrperc-robust-tiny.json").write_text(json.dumps(_OC_CFG))
    open_clip.add_model_config(folder)
    return "hrperc-robust-tiny"


def test_open_clip_checkpoints_load_strictly(oc_name, tmp_path):
    import open_clip

    sd = open_clip.create_model(oc_name).state_dict()
    half = {k: v for k, v in sd.items() if "resblocks.1." not in k}
    path = _save(tmp_path, half)
    with raises_naming(ValueError, str(path), f"'{oc_name}'", "missing keys", "resblocks.1.", "strict=False"):
        create_backbone(f"open_clip:{oc_name}", pretrained=path)
    with warns_naming(UserWarning, str(path), "stayed random", "resblocks.1."):
        bb = create_backbone(f"open_clip:{oc_name}", pretrained=path, strict=False)
    assert bb.source == str(path)
    folder = tmp_path / "dir"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": _OC_CFG}))
    _save(folder, half, "open_clip_model.safetensors")
    with raises_naming(ValueError, "open_clip_model.safetensors", "missing keys", "strict=False"):
        create_backbone(f"open_clip:local-dir:{folder}")
    with raises_naming(ValueError, str(path), "missing keys"):
        create_backbone(f"open_clip:local-dir:{folder}", pretrained=path)


def test_hf_checkpoints_with_missing_keys_are_refused(tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    cfg = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14
    )
    transformers.CLIPVisionModel(cfg).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    sd = load_file(weights)
    save_file({k: v for k, v in sd.items() if "layers.1." not in k}, str(weights))
    with raises_naming(ValueError, str(tmp_path), "missing keys", "layers.1.", "strict=False"):
        create_backbone(f"hf:{tmp_path}")
    with warns_naming(UserWarning, str(tmp_path), "layers.1.", "random"):
        create_backbone(f"hf:{tmp_path}", strict=False)
    # shape mismatches and unexpected keys (not the text tower of a full checkpoint) too
    key = next(k for k in sd if "layers.1.mlp.fc1.weight" in k)
    save_file(sd | {key: torch.zeros(65, 32), "vision_model.extra.weight": torch.zeros(2)}, str(weights))
    with raises_naming(
        ValueError,
        str(tmp_path),
        "shape mismatches",
        "(65, 32)",
        "(64, 32)",
        "unexpected keys",
        "extra.weight",
        "strict=False",
    ):
        create_backbone(f"hf:{tmp_path}")
    with warns_naming(UserWarning, "mlp.fc1.weight", "stayed random", "extra.weight"):
        create_backbone(f"hf:{tmp_path}", strict=False)


def test_a_checkpoint_without_the_dem_is_refused_before_reading_its_shards(tmp_path):
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"never read: the LLM's shard")
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"never read either")
    weight_map = {
        "model.layers.0.mlp.weight": "model-00001-of-00002.safetensors",
        "lm_head.weight": "model-00002-of-00002.safetensors",
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with raises_naming(ValueError, str(tmp_path), "'spatial_embed.'", "'lm_head.weight'", "Pass"):
        load_dem(tmp_path, heads=2)
    with raises_naming(ValueError, str(tmp_path), "'mm_projector.'", "Pass"):
        load_projector(tmp_path)
    llm = _save(tmp_path, {"lm_head.weight": torch.zeros(2, 2)}, "llm.safetensors")
    with raises_naming(ValueError, str(llm), "'spatial_embed.'", "'lm_head.weight'"):
        load_dem(llm, heads=2)
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with raises_naming(ValueError, "model.safetensors.index.json", "weight_map", "Check"):
        load_dem(tmp_path, heads=2)
