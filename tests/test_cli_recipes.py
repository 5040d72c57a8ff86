"""``hrperc encode --recipe NAME --option key=value --save``, ``hrperc recipes`` and ``hrperc --version``."""

from __future__ import annotations

import argparse
import re

import numpy as np
import pytest
import torch
from _messages import FIX, assert_names, raises_naming
from PIL import Image

import hrperc
from hrperc.cli import build_parser, main
from hrperc.cli.args import read_image
from hrperc.cli.recipes import RecipeOption, describe_recipe, parse_options, parse_value
from hrperc.cli.save import load_tokens

# timm's smallest ViT: 160 px tiles of 16 px patches, width 64, 6 blocks (random weights, built offline)
TEST_VIT = "timm:test_vit"


@pytest.fixture
def images(tmp_path):
    paths = []
    for i, (h, w) in enumerate([(90, 130), (300, 200)]):
        arr = np.random.default_rng(i).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(arr).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def vit_weights(tmp_path_factory):
    """A seeded checkpoint of ``timm:test_vit``: the CLI and the test build the same backbone from it."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    bb = hrperc.create_backbone(TEST_VIT)
    path = tmp_path_factory.mktemp("vit") / "test_vit.safetensors"
    save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, path)
    return path


@pytest.fixture
def no_build(monkeypatch):
    """Building a backbone fails the test: a bad option must be refused before any model is built."""

    def fail(*a, **k):
        raise AssertionError("create_backbone ran: the options were not checked first")

    monkeypatch.setattr(hrperc.backbones, "create_backbone", fail)


def _error_line(capsys, argv, *names) -> str:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, (argv, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"hrperc {argv[0]}: error:"), lines[0]
    assert_names(lines[0], *names)
    assert FIX.search(lines[0]), lines[0]
    return lines[0]


# ---- the options, read from each recipe's own declaration ---------------------------------------------------


@pytest.mark.parametrize("name", hrperc.list_recipes())
def test_options_are_those_the_recipe_accepts(name):
    # The recipe's own refusal of an unknown option lists what it accepts: the listing must be exactly that.
    with pytest.raises(TypeError) as info:
        hrperc.create_encoder(name, None, no_such_option=1)
    accepted = set(re.findall(r"'(\w+)'", str(info.value).split("unknown option(s)", 1)[1])) - {"no_such_option"}
    recipe = describe_recipe(name)
    assert set(recipe.names) == accepted
    assert len(recipe.names) == len(set(recipe.names))


def test_defaults_are_the_recipes_own():
    assert describe_recipe("internvl").option("max_tiles").default == 12  # the front end's constructor
    assert describe_recipe("internvl").option("layer").default == -1  # set by the recipe, not HighResEncoder
    assert describe_recipe("llava_next").option("layer").default == -2
    onevision = describe_recipe("llava_onevision")
    assert onevision.option("max_tiles").default == 9 and onevision.option("layer").default == -1  # anyres_max_9
    released = describe_recipe("inf_llava")  # inf_llava.CROP / ENCODER over DualPerspectiveCrop's defaults
    assert released.option("antialias").default is False and released.option("combine").default == "mean"
    assert released.option("grid").default == (3, 3) and released.option("layer").default == -2
    qwen3 = describe_recipe("qwen3_vl")  # the family's released budget, not NativeFrontEnd's (Qwen2-VL's)
    assert (qwen3.option("min_pixels").default, qwen3.option("max_pixels").default) == (65536, 16777216)
    assert describe_recipe("qwen2_vl").option("max_pixels").default == 12845056
    assert describe_recipe("smolvlm").option("scale_factor").default == 4  # idefics3's front end, SmolVLM's value
    assert describe_recipe("idefics3").option("scale_factor").default == 2
    assert describe_recipe("qwen2_vl").native and describe_recipe("pixtral").native
    assert not any(describe_recipe(n).native for n in ("inf_llava", "llava15", "llava_next", "internvl", "s2"))


def test_recipes_command_lists_every_recipe_with_options_and_defaults(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in hrperc.list_recipes():
        assert re.search(rf"^{name}: \S", out, re.M), name
    block = out.split("llava_onevision:", 1)[1].split("\n\n", 1)[0]
    assert re.search(r"max_tiles\s+int or none\s+9\n", block) and re.search(
        r"layer\s+int or list or none\s+-1\n", block
    )
    assert re.search(r"tie_break\s+str\s+'transformers'", block) and "front end  AnyresFrontEnd" in block
    assert main(["recipes", "s2"]) == 0
    only = capsys.readouterr().out
    assert re.search(r"scales\s+list\s+1,2\n", only) and "llava15:" not in only
    assert main(["recipes", "inf_llava"]) == 0  # a Literal alias (DualPerspectiveCrop's Fit) shows its choices
    assert re.search(r"fit\s+one of 'resize', 'pad', 'resize_pad'\s+'resize'", capsys.readouterr().out)
    assert main(["recipes", "qwen3_vl", "pixtral"]) == 0
    native = capsys.readouterr().out
    assert re.search(r"min_pixels\s+int\s+65536\n\s+max_pixels\s+int\s+16777216\n", native)
    # a default the recipe computes is described (pixtral's longest_edge: by merge_size)
    assert re.search(r"longest_edge\s+int or none\s+none = by merge_size: 1024 .*1540 with merge_size=2", native)
    _error_line(capsys, ["recipes", "nope"], "'nope'", "llava_next")


def test_a_recipe_registered_without_a_front_end_is_listed_with_unchecked_options(capsys):
    @hrperc.recipes.register_recipe("probe_undeclared")
    def build(backbone, **options):
        return hrperc.HighResEncoder(backbone, **options)

    try:
        info = describe_recipe("probe_undeclared")
        assert not info.declared and info.options == () and not info.native
        # read as JSON, else the text (only the recipe checks them)
        assert parse_options(info, ["anything=1,2", "flag=true", "s=x"]) == {"anything": (1, 2), "flag": True, "s": "x"}
        assert main(["recipes", "probe_undeclared"]) == 0
        assert "not declared to register_recipe" in capsys.readouterr().out
    finally:
        hrperc.recipes._RECIPES.pop("probe_undeclared", None)


def test_parse_value_reads_each_type_and_names_a_bad_value():
    assert parse_value(RecipeOption("dcm", "front end", "bool", False), "TRUE") is True
    assert parse_value(RecipeOption("dcm", "front end", "bool", False), "0") is False
    assert parse_value(RecipeOption("n", "front end", "int | None", None), "none") is None
    assert parse_value(RecipeOption("n", "front end", "int | None", None), "-3") == -3
    assert parse_value(RecipeOption("max_batch", "encoder", "int | str", "auto"), "auto") == "auto"
    pinpoints = RecipeOption("pinpoints", "front end")  # no annotation, no default: JSON, nested lists as tuples
    assert parse_value(pinpoints, "[[160, 320], [320, 160]]") == ((160, 320), (320, 160))
    assert parse_value(RecipeOption("scales", "front end", "", (1, 2)), "1,2,3") == (1, 2, 3)
    assert parse_value(RecipeOption("grid", "front end", "", (3, 3)), "auto") == "auto"
    assert parse_value(RecipeOption("r", "front end", "float", 1.2), "1.5") == 1.5
    with raises_naming(ValueError, "--option dcm='maybe'", "true or false"):
        parse_value(RecipeOption("dcm", "front end", "bool", False), "maybe")
    with raises_naming(ValueError, "--option max_tiles='many'", "int", "max_tiles=12"):
        parse_value(RecipeOption("max_tiles", "front end", "int", 12), "many")
    with raises_naming(ValueError, "--option r='x'", "number"):
        parse_value(RecipeOption("r", "front end", "float", 1.2), "x")


def test_parse_options_refuses_unknown_malformed_and_repeated_names():
    info = describe_recipe("internvl")
    assert parse_options(info, ["dcm=true", "downsample=1", "max_batch=4"]) == {
        "dcm": True,
        "downsample": 1,
        "max_batch": 4,
    }
    llava15 = describe_recipe("llava15")  # layer: int | list[int] | None (several layers on the channels)
    assert parse_options(llava15, ["layer=-2,-5", "dem=none"]) == {"layer": (-2, -5), "dem": None}
    assert parse_options(llava15, ["layer=[-2]", "max_batch=auto"]) == {"layer": (-2,), "max_batch": "auto"}
    with raises_naming(ValueError, "--option layer='x'", "int or list or none", "layer=-2"):
        parse_options(llava15, ["layer=x"])
    with raises_naming(ValueError, "--option tiles=6", "'internvl'", "max_tiles", "min_tiles", "layer"):
        parse_options(info, ["tiles=6"])
    with raises_naming(ValueError, "--option 'max_tiles'", "key=value"):
        parse_options(info, ["max_tiles"])
    with raises_naming(ValueError, "--option max_tiles", "twice"):
        parse_options(info, ["max_tiles=2", "max_tiles=3"])


# ---- hrperc encode --recipe ---------------------------------------------------------------------------------


def test_encode_recipe_prints_plans_and_saves_the_encoders_tokens(images, vit_weights, tmp_path, capsys):
    save = tmp_path / "tokens.safetensors"
    argv = ["encode", *map(str, images), "--recipe", "llava_next", "--backbone", TEST_VIT, "--weights", vit_weights]
    argv += ["--option", "tie_break=original", "--layer", "-3", "--save", save]
    assert main([str(a) for a in argv]) == 0
    out = capsys.readouterr().out
    bb = hrperc.create_backbone(TEST_VIT, pretrained=str(vit_weights))
    enc = hrperc.create_encoder("llava_next", bb, tie_break="original", layer=-3)
    pixels = [read_image(p) for p in images]
    ref = enc(pixels)  # one ragged batch: the CLI encodes one image at a time
    for path, px, layout in zip(images, pixels, ref.layout):
        plan = enc.plan(px.shape[-2:])
        (gh, gw), (ch, cw) = plan.grid, plan.canvas_size
        block = out.split(f"{path}\n", 1)[1]
        assert f"grid {gh}x{gw}, canvas {cw}x{ch}, tiles 160x160" in block
        assert f"{plan.views} views through the ViT" in block
        assert f"tokens     {plan.num_tokens} x 64: base 100 (10x10), tiles {layout[1].length}" in block
    assert "recipe       llava_next: AnyresFrontEnd(" in out and "tie_break='original'" in out and "layer -3" in out
    assert f"wrote        {save}" in out
    tensors, meta = load_tokens(save)
    torch.testing.assert_close(tensors["tokens"], ref.tokens, rtol=1e-5, atol=1e-5)
    assert torch.equal(tensors["token_mask"], ref.token_mask) and torch.equal(tensors["slot_mask"], ref.slot_mask)
    assert meta["recipe"] == "llava_next" and meta["backbone"] == TEST_VIT and meta["weights"] == str(vit_weights)
    assert meta["options"] == {"tie_break": "original", "layer": -3} and meta["hrperc_version"] == hrperc.__version__
    for entry, path, layout, geo in zip(meta["images"], images, ref.layout, ref.geometries):
        assert entry["file"] == str(path) and entry["image_size"] == list(geo.input_size)
        assert entry["grid"] == list(geo.grid) and entry["num_tokens"] == layout[-1].stop
        assert [(s["source"], s["start"], s["stop"], s["newline"]) for s in entry["layout"]] == [
            (s.source, s.start, s.stop, s.newline) for s in layout
        ]
        assert [tuple(s["shape"]) for s in entry["layout"]] == [s.shape for s in layout]


def test_encode_default_recipe_saves_inf_llava_tokens(images, vit_weights, tmp_path, capsys):
    save = tmp_path / "t.safetensors"
    argv = ["encode", images[0], "--backbone", TEST_VIT, "--weights", vit_weights, "--grid", "1x1", "--no-dem"]
    assert main([str(a) for a in [*argv, "--option", "thumbnail=false", "--save", save]]) == 0
    out = capsys.readouterr().out
    assert "ViT passes 2 of 2 (1 local + 1 strided + 0 thumbnail" in out  # thumbnail=false reached the crop
    assert "thumbnail=False" in out and "tokens     200 x 64: local 100 (10x10), global 100 (10x10)" in out
    bb = hrperc.create_backbone(TEST_VIT, pretrained=str(vit_weights))
    enc = hrperc.create_encoder("inf_llava", bb, grid=(1, 1), dem=None, combine="concat", thumbnail=False)
    ref = enc(read_image(images[0]))
    tensors, meta = load_tokens(save)
    torch.testing.assert_close(tensors["tokens"], ref.tokens, rtol=1e-5, atol=1e-5)
    assert meta["recipe"] == "inf_llava" and meta["options"]["dem"] is None and meta["options"]["grid"] == [1, 1]


@pytest.mark.parametrize(
    "extra, names",
    [
        (["--recipe", "internvl", "--option", "tiles=3"], ["--option tiles=3", "'internvl'", "max_tiles", "dcm"]),
        (["--recipe", "internvl", "--option", "max_tiles=x"], ["--option max_tiles='x'", "int"]),
        (["--recipe", "llava_next", "--option", "dcm=maybe"], ["--option dcm='maybe'", "true or false"]),
        (["--recipe", "internvl", "--grid", "2x2"], ["--grid", "inf_llava", "'internvl'", "max_tiles"]),
        (["--recipe", "internvl", "--max-tiles", "3"], ["--max-tiles", "--option max_tiles=3"]),
        (["--recipe", "s2", "--no-dem"], ["--no-dem", "'s2'", "--option dem=none"]),
        (["--recipe", "s2", "--fit", "pad"], ["--fit", "'s2'", "scales", "pad"]),
        (["--layer", "-1", "--option", "layer=-3"], ["--layer", "--option layer=-3"]),
        (["--save", "out.pt"], ["--save 'out.pt'", ".safetensors"]),
        (["--option", "dem=/nope.safetensors"], ["--option dem", "'/nope.safetensors'", "does not exist"]),
        (["--recipe", "qwen2_vl"], ["--recipe qwen2_vl", "vision tower", "create_encoder('qwen2_vl'", "llava_next"]),
        (["--recipe", "pixtral"], ["--recipe pixtral", "encoder_from_model", "inf_llava"]),
    ],
)
def test_bad_options_are_refused_before_any_model_is_built(images, capsys, no_build, extra, names):
    _error_line(capsys, ["encode", images[0], "--backbone", TEST_VIT, *extra], *names)


def test_the_recipe_checks_values_itself(images, capsys):
    _error_line(capsys, ["encode", images[0], "--backbone", TEST_VIT, "--recipe", "internvl", "--option",
                         "max_tiles=0"], "create_encoder('internvl')", "max_tiles=0")  # fmt: skip
    _error_line(capsys, ["encode", images[0], "--recipe", "nope"], "--recipe", "'nope'", "llava_next")


# ---- --help, --version --------------------------------------------------------------------------------------


def test_every_option_is_explained_in_help(capsys):
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in [("hrperc", parser), *subparsers.choices.items()]:
        for action in sub._actions:
            if action.option_strings or action.dest not in ("command",):
                assert action.help and action.help.strip(), (name, action.option_strings or action.dest)
    assert main(["encode", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert_names(text, "--fit {resize,pad,resize_pad} INF-LLaVA: how the image meets", "--dtype", "halve the memory")
    assert_names(text, "--recipe NAME", "--option KEY=VALUE", "--save FILE.safetensors", "hrperc recipes")


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"hrperc {hrperc.__version__}"
