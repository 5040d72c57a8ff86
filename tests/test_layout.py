"""The house: public surface, layering and import graph, recipes, released-checkpoint converters."""

from __future__ import annotations

import ast
import importlib
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _messages import assert_names
from _models import vit as tiny_vit
from safetensors.torch import save_file

import hrperc
from hrperc.pretrained.inf_llava import load_dem, load_projector, released_state_dict

SRC = Path(hrperc.__file__).parent
# Which top-level folder may import which (the layers, bottom up). "_" = the private helpers at the root.
MAY_IMPORT = {
    "_": set(),
    "ops": {"_"},
    "attention": {"_", "ops"},
    "modules": {"_", "ops", "attention"},
    "backbones": {"_"},
    "encoder": {"_", "ops", "modules", "backbones"},
    "pretrained": {"_", "ops", "modules"},
    "recipes": {"_", "ops", "modules", "backbones", "encoder", "pretrained"},
    "integrations": {"_", "ops", "modules", "attention", "backbones", "encoder", "pretrained", "recipes"},
    "cli": {"_", "ops", "modules", "attention", "backbones", "encoder", "pretrained", "recipes"},
}


def _layer(module: str) -> str:
    if module == "hrperc.__main__":  # `python -m hrperc` is the command line
        return "cli"
    part = module.split(".")[1] if "." in module else ""
    return "_" if part.startswith("_") or part == "" else part


def _imports() -> dict[str, set[str]]:
    """module -> the hrperc modules it imports (at any depth of its code), from the source."""
    graph = {}
    for info in pkgutil.walk_packages(hrperc.__path__, "hrperc."):
        path = Path(importlib.util.find_spec(info.name).origin)
        tree = ast.parse(path.read_text())
        package = info.name if path.name == "__init__.py" else info.name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.startswith("hrperc"):
                    found.add(target)
                    found.update(f"{target}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("hrperc"))
        graph[info.name] = {m for m in found if importlib.util.find_spec(m.split(".")[0]) and _is_module(m)}
    return graph


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ModuleNotFoundError, ValueError):
        return False


def test_top_level_is_small_and_every_name_resolves():
    assert len(hrperc.__all__) <= 20
    for name in hrperc.__all__:
        assert hasattr(hrperc, name), name
    for name in (
        "LocalCrop",
        "StrideGlobalCrop",
        "Recombine",
        "DualPerspectiveEnhancement",
        "WindowCrossAttention",
        "local_crop",
        "stride_crop",
        "local_merge",
        "stride_merge",
        "create_backbone",
        "wrap_backbone",
        "create_encoder",
        "list_recipes",
        "HighResEncoder",
    ):
        assert name in hrperc.__all__, name


@pytest.mark.parametrize("package", ["ops", "modules", "attention", "backbones", "recipes", "pretrained"])
def test_subpackages_declare_their_public_names(package):
    module = importlib.import_module(f"hrperc.{package}")
    assert module.__all__
    for name in module.__all__:
        assert hasattr(module, name), f"hrperc.{package}.{name}"


def test_layers_import_only_downwards_and_there_are_no_cycles():
    graph = _imports()
    for module, targets in graph.items():
        for target in targets:
            src, dst = _layer(module), _layer(target)
            if src == dst or (module == "hrperc" or target == "hrperc"):
                continue
            assert dst in MAY_IMPORT[src], f"{module} imports {target}: layer {src!r} may not import {dst!r}"
    # No cycles between modules (a depth-first search over the module graph).
    modules = {m: {t for t in ts if t in graph and t != m} for m, ts in graph.items()}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for t in modules[m]:
            if t.startswith(m + "."):  # a package importing its own submodules is not a cycle
                continue
            if state.get(t) == 1 and not m.startswith(t + "."):
                raise AssertionError(f"import cycle: {' -> '.join(path + [t])}")
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in modules:
        if m not in state:
            visit(m, [m])


def test_the_core_never_imports_the_command_line_or_the_integrations():
    code = (
        "import sys, hrperc; print(sorted(m for m in sys.modules if m.startswith(('hrperc.cli', "
        "'hrperc.integrations', 'transformers'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- recipes -------------------------------------------------------------------------------------------
def test_inf_llava_recipe_is_the_released_front_end():
    assert "inf_llava" in hrperc.list_recipes()
    enc = hrperc.create_encoder("inf_llava", tiny_vit())
    crop = enc.crop
    assert (crop.grid, crop.tile_size, crop.max_tiles, crop.fit) == ((3, 3), (28, 28), 9, "resize")
    assert (crop.mode, crop.antialias, crop.thumbnail) == ("bicubic", False, True)
    assert (enc.combine, enc.layer) == ("mean", -2)
    dem = enc.dem
    assert (dem.pairing, dem.shared_attention, dem.residual_norm, dem.reduction) == ("released", True, True, "bilinear")
    assert enc.num_tokens((300, 200)) == 16 and enc.num_backbone_passes((300, 200)) == 11  # 9 + 1 + 1 of 19
    out = enc(torch.rand(3, 300, 200))
    assert out.tokens.shape == (1, 16, 32) and out.encoded == {"encoded": 11, "skipped": 8}


def test_recipe_options_override_crop_and_encoder_settings():
    enc = hrperc.create_encoder("inf_llava", tiny_vit(), grid=(2, 2), max_tiles=4, combine="concat", encode_all=True)
    assert enc.crop.grid == (2, 2) and enc.combine == "concat" and enc.encode_all
    assert enc.crop.mode == "bicubic" and not enc.crop.antialias  # the rest stays released


def test_unknown_recipe_names_the_choices():
    with pytest.raises(ValueError) as err:
        hrperc.create_encoder("llava_2", tiny_vit())
    assert_names(str(err.value), "recipe='llava_2'", "'inf_llava'")


def test_encoder_takes_a_crop_of_the_backbones_tile_size():
    vit = tiny_vit()
    with pytest.raises(ValueError) as err:
        hrperc.HighResEncoder(vit, hrperc.DualPerspectiveCrop(grid=(2, 2), tile_size=336))
    assert "(336, 336)" in str(err.value) and "(28, 28)" in str(err.value) and "tile_size" in str(err.value)
    with pytest.raises(TypeError) as err:
        hrperc.HighResEncoder(vit, crop={"grid": (2, 2)})
    assert "DualPerspectiveCrop" in str(err.value)
    enc = hrperc.HighResEncoder(
        vit, hrperc.DualPerspectiveCrop(grid=(2, 2), tile_size=28, thumbnail=False), combine="none"
    )
    assert enc.thumbnail is False  # read off the crop, not stored twice


def test_derived_state_follows_the_geometries():
    enc = hrperc.HighResEncoder(tiny_vit(), hrperc.DualPerspectiveCrop(grid="auto", tile_size=28, max_tiles=4))
    out = enc([torch.rand(3, 28, 28), torch.rand(3, 56, 56), torch.rand(3, 28, 56)])
    assert out.grids == [g.grid for g in out.geometries] == [(1, 1), (2, 2), (1, 2)]
    assert (
        out.num_tokens
        == [int(m.sum()) for m in out.token_mask]
        == [enc.num_tokens(g.input_size) for g in out.geometries]
    )
    crops = enc.crop([torch.rand(3, 28, 28), torch.rand(3, 56, 56), torch.rand(3, 28, 56)])
    assert crops.offsets == [0, 1, 5] and crops.local.shape[0] == 7


# --- released-checkpoint converters --------------------------------------------------------------------
def _released_checkpoint(dim=32):
    torch.manual_seed(3)
    dem = hrperc.DualPerspectiveEnhancement(dim, heads=2)
    proj = hrperc.modules.build_projector("mlp2x_gelu", dim, 48)
    sd = {f"model.spatial_embed.{k}": v for k, v in released_state_dict(dem).items()}
    sd |= {f"model.mm_projector.{k}": v for k, v in proj.state_dict().items()}
    return dem, proj, sd


def test_load_dem_and_projector_from_a_directory_of_shards_reads_only_their_shards(tmp_path):
    dem, proj, sd = _released_checkpoint()
    vision = {k: v.contiguous() for k, v in sd.items()}
    save_file(vision, tmp_path / "model-00002-of-00002.safetensors")
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"not a safetensors file: the LLM's shard")
    weight_map = {k: "model-00002-of-00002.safetensors" for k in vision}
    weight_map["model.layers.0.mlp.weight"] = "model-00001-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    got = load_dem(tmp_path, heads=2)
    for k, v in released_state_dict(dem).items():
        assert torch.equal(released_state_dict(got)[k], v), k
    x = torch.randn(1, 3, 32)
    assert torch.equal(load_projector(tmp_path)(x), proj(x))


def test_load_dem_from_unindexed_shards_and_files(tmp_path):
    dem, _, sd = _released_checkpoint()
    keys = sorted(sd)
    save_file({k: sd[k].contiguous() for k in keys[: len(keys) // 2]}, tmp_path / "a.safetensors")
    save_file({k: sd[k].contiguous() for k in keys[len(keys) // 2 :]}, tmp_path / "b.safetensors")
    loc, glo = torch.randn(9, 16, 32), torch.randn(9, 16, 32)
    assert torch.equal(load_dem(tmp_path, heads=2)(loc, glo, (3, 3)), dem(loc, glo, (3, 3)))
    torch.save(sd, tmp_path / "ckpt.bin")
    assert torch.equal(load_dem(tmp_path / "ckpt.bin", heads=2)(loc, glo, (3, 3)), dem(loc, glo, (3, 3)))


def test_load_dem_refuses_misfits_naming_the_keys(tmp_path):
    _, _, sd = _released_checkpoint()
    del sd["model.spatial_embed.ln_fuse.weight"]
    with pytest.raises(ValueError) as err:
        load_dem(sd, heads=2)
    assert "ln_fuse.weight" in str(err.value) and "docs/released.md" in str(err.value)
    with pytest.raises(ValueError) as err:
        load_dem(sd, heads=2, pairing="paper")
    assert_names(str(err.value), "pairing='paper'", "pairing='released'")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        load_dem(tmp_path / "empty")
    assert_names(str(err.value), str(tmp_path / "empty"), "*.safetensors")
