"""transformers' InternVL vision tower (``InternVLVisionModel``) as an hrperc backbone."""

from __future__ import annotations

import pytest
import torch
from _messages import raises_naming
from torch import nn

import hrperc
from hrperc.backbones import HFBackbone, wrap_backbone

transformers = pytest.importorskip("transformers")
modeling_internvl = pytest.importorskip("transformers.models.internvl.modeling_internvl")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _tiny_internvl(image_size=28, patch_size=14, **kw):
    torch.manual_seed(0)
    cfg = transformers.InternVLVisionConfig(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=image_size,
        patch_size=patch_size,
        **kw,
    )
    model = modeling_internvl.InternVLVisionModel(cfg).eval()
    with torch.no_grad():  # the checkpoint-free init zeroes these; random values make the checks bite
        model.embeddings.cls_token.normal_()
        if model.embeddings.position_embeddings is not None:
            model.embeddings.position_embeddings.normal_()
    return model


@pytest.mark.parametrize(
    "sizes",
    [dict(image_size=28, patch_size=14), dict(image_size=[28, 28], patch_size=[14, 14])],
    ids=["int", "list"],
)
@pytest.mark.parametrize("pos", [True, False], ids=["abs_pos", "no_pos"])
@pytest.mark.parametrize("mean_pooling", [True, False], ids=["mean_pool", "cls_norm"])
def test_internvl_matches_hidden_states(sizes, pos, mean_pooling):
    model = _tiny_internvl(**sizes, use_absolute_position_embeddings=pos, use_mean_pooling=mean_pooling)
    bb = wrap_backbone(model)
    assert isinstance(bb, HFBackbone) and bb.model is model
    assert bb.num_prefix_tokens == 1
    assert (bb.image_size, bb.patch_size, bb.grid_size) == ((28, 28), (14, 14), (2, 2))
    assert (bb.hidden_size, bb.num_layers, bb.layer) == (32, 3, -2)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        out = model(pixel_values=x, output_hidden_states=True)
        # this transformers: hidden_states[0] is the embeddings, hidden_states[k] block k's output
        assert len(out.hidden_states) == 4
        torch.testing.assert_close(out.hidden_states[0], model.embeddings(x), rtol=0, atol=0)
        for k in (1, 2, 3, -1, -2, -3):
            ref = out.hidden_states[k][:, 1:]
            torch.testing.assert_close(bb.features(x, layer=k), ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(bb.features(x), out.hidden_states[-2][:, 1:], rtol=0, atol=1e-6)
        last = bb.features(x, layer=-1)
        if mean_pooling:  # layernorm is Identity: layer -1 is InternVLModel's vision_feature_layer=-1
            assert isinstance(model.layernorm, nn.Identity)
            torch.testing.assert_close(last, out.last_hidden_state[:, 1:], rtol=0, atol=1e-6)
        else:  # the final LayerNorm is not applied by hrperc (documented)
            assert isinstance(model.layernorm, nn.LayerNorm)
            assert not torch.allclose(last, out.last_hidden_state[:, 1:], atol=1e-3)
            torch.testing.assert_close(model.layernorm(last), out.last_hidden_state[:, 1:], rtol=0, atol=1e-6)


@pytest.mark.parametrize("pos", [True, False], ids=["abs_pos", "no_pos"])
@pytest.mark.parametrize("size", [(56, 28), (14, 42), (42, 42)])
def test_internvl_views_of_other_sizes_match_hidden_states(pos, size):
    model = _tiny_internvl(use_absolute_position_embeddings=pos)
    bb = wrap_backbone(model)
    assert bb.dynamic_size and bb.accepts(size) and not bb.accepts((size[0] + 1, size[1]))
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = model(pixel_values=x, output_hidden_states=True)  # InternVL resamples its embeddings itself
        for k in (1, -1):
            got = bb.features(x, layer=k)
            assert got.shape == (2, (size[0] // 14) * (size[1] // 14), 32)
            torch.testing.assert_close(got, out.hidden_states[k][:, 1:], rtol=0, atol=1e-6)


def test_internvl_mean_std_defaults_and_overrides():
    model = _tiny_internvl()
    bb = HFBackbone(model)
    assert bb.mean == pytest.approx(IMAGENET_MEAN) and bb.std == pytest.approx(IMAGENET_STD)
    assert bb.mean != pytest.approx(hrperc.backbones.OPENAI_CLIP_MEAN)
    bb = wrap_backbone(model, layer=1, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert (bb.mean, bb.std, bb.layer) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 1)


def test_internvl_layer_runs_only_requested_blocks():
    model = _tiny_internvl(use_mean_pooling=False)
    bb = wrap_backbone(model, layer=1)
    calls = []
    handles = [
        m.register_forward_hook(lambda m, a, o: calls.append(1)) for m in (*model.encoder.layer[1:], model.layernorm)
    ]
    try:
        with torch.no_grad():
            bb.features(torch.randn(1, 3, 28, 28))
    finally:
        for h in handles:
            h.remove()
    assert calls == []


def test_internvl_grad_checkpointing_same_gradients():
    model = _tiny_internvl()
    bb = wrap_backbone(model, layer=-1).train()
    x = torch.randn(2, 3, 28, 28)
    probe = model.encoder.layer[0].mlp.fc1
    grads, counts = [], []
    for ckpt in (False, True):
        bb.set_grad_checkpointing(ckpt)
        assert model.encoder.layer[0].gradient_checkpointing == ckpt
        calls = []
        handle = probe.register_forward_hook(lambda m, a, o, calls=calls: calls.append(1))
        try:
            bb.features(x).square().sum().backward()
        finally:
            handle.remove()
        counts.append(len(calls))
        grads.append({n: p.grad.clone() for n, p in bb.named_parameters() if p.grad is not None})
        bb.zero_grad()
    assert counts == [1, 2]  # checkpointing recomputes the block in backward
    assert grads[0].keys() == grads[1].keys() and "model.encoder.layer.0.attention.q_proj.weight" in grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n])


def test_unsupported_model_names_internvl():
    with raises_naming(TypeError, "Linear", "InternVLVisionModel", "CLIPVisionModel"):
        HFBackbone(nn.Linear(2, 2))
