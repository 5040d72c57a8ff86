"""build_projector and the released mm_projector loader."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _messages import raises_naming

import hrperc
from hrperc.modules.projector import build_projector
from hrperc.pretrained.inf_llava import load_projector


@pytest.mark.parametrize("kind,n_linear", [("linear", 1), ("mlp1x_gelu", 1), ("mlp2x_gelu", 2), ("mlp3x_gelu", 3)])
def test_build_projector_shapes_and_layers(kind, n_linear):
    proj = build_projector(kind, 12, 20)
    assert proj(torch.randn(2, 5, 12)).shape == (2, 5, 20)
    assert sum(isinstance(m, torch.nn.Linear) for m in proj.modules()) == n_linear


def test_mlp2x_gelu_is_linear_gelu_linear_with_llava_keys():
    proj = build_projector("mlp2x_gelu", 8, 16)
    assert sorted(proj.state_dict()) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    x = torch.randn(3, 8)
    sd = proj.state_dict()
    expect = F.linear(F.gelu(F.linear(x, sd["0.weight"], sd["0.bias"])), sd["2.weight"], sd["2.bias"])
    torch.testing.assert_close(proj(x), expect)


def test_identity_and_bad_kinds():
    assert isinstance(build_projector("identity", 8, 8), torch.nn.Identity)
    with raises_naming(ValueError, "kind='identity'", "in_dim == out_dim", "in_dim=8", "out_dim=9"):
        build_projector("identity", 8, 9)
    with pytest.raises(ValueError, match="kind='mlp2x_relu'.*mlp\\{n\\}x_gelu"):
        build_projector("mlp2x_relu", 8, 8)
    with pytest.raises(ValueError, match="kind='mlp0x_gelu'"):
        build_projector("mlp0x_gelu", 8, 8)
    with pytest.raises(ValueError, match="in_dim=0"):
        build_projector("linear", 0, 8)


def _released(in_dim=16, out_dim=32, prefix="model.mm_projector."):
    g = torch.Generator().manual_seed(0)
    return {
        prefix + "0.weight": torch.randn(out_dim, in_dim, generator=g),
        prefix + "0.bias": torch.randn(out_dim, generator=g),
        prefix + "2.weight": torch.randn(out_dim, out_dim, generator=g),
        prefix + "2.bias": torch.randn(out_dim, generator=g),
    }


def test_load_from_full_checkpoint_ignores_other_modules(tmp_path):
    sd = _released()
    full = {**sd, "model.spatial_embed.ln_fuse.weight": torch.ones(16), "lm_head.weight": torch.zeros(4, 4)}
    proj = load_projector(full)
    assert torch.equal(proj[0].weight, sd["model.mm_projector.0.weight"])
    assert torch.equal(proj[2].bias, sd["model.mm_projector.2.bias"])
    from safetensors.torch import save_file

    save_file(full, str(tmp_path / "ckpt.safetensors"))
    again = hrperc.pretrained.inf_llava.load_projector(tmp_path / "ckpt.safetensors")
    x = torch.randn(2, 16)
    torch.testing.assert_close(again(x), proj(x))


def test_load_refuses_bad_weights(tmp_path):
    bare = _released(prefix="")
    with pytest.raises(ValueError, match=r"missing keys \['2.bias'\]"):
        load_projector({k: v for k, v in bare.items() if k != "2.bias"})
    with pytest.raises(ValueError, match=r"unexpected keys \['4.weight'\]"):
        load_projector({**bare, "4.weight": torch.zeros(1)})
    bad = dict(bare)
    bad["2.weight"] = torch.zeros(32, 31)
    with raises_naming(ValueError, "2.weight", "checkpoint (32, 31)", "module (32, 32)"):
        load_projector(bad)
    with pytest.raises(ValueError, match="mm_projector.0.weight"):
        load_projector({"foo": torch.zeros(1)})
    with raises_naming(FileNotFoundError, str(tmp_path / "nope.safetensors")):
        load_projector(tmp_path / "nope.safetensors")
    with raises_naming(TypeError, "state dict", "int"):
        load_projector(42)


def test_projector_errors_name_the_values_and_the_fix():
    with raises_naming(ValueError, "in_dim=8", "out_dim=16", "out_dim=8", "'linear'"):
        build_projector("identity", 8, 16)
    with raises_naming(ValueError, "kind='conv'", "'linear'", "'identity'", "'mlp{n}x_gelu'"):
        build_projector("conv", 8, 16)
    with raises_naming(TypeError, "['w']", "str", "model.state_dict()"):
        load_projector({"w": "not a tensor"})
