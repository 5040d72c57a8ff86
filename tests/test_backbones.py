"""Backbone adapters against their backbones' own outputs; loading tiny local checkpoints; errors."""

from __future__ import annotations

import json

import pytest
import torch
from _messages import raises_naming, warns_naming
from safetensors.torch import save_file
from torch import nn

import hrperc
from hrperc.backbones import HFBackbone, OpenClipBackbone, TimmBackbone, create_backbone, wrap_backbone


def _hooked_block_output(blocks, k, run):
    """Reference: the output of ``blocks[k-1]`` captured from the model's own forward."""
    out = []
    handle = blocks[k - 1].register_forward_hook(lambda m, a, o: out.append(o[0] if isinstance(o, tuple) else o))
    try:
        run()
    finally:
        handle.remove()
    return out[0]


def _tiny_timm(**kw):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    cfg = dict(img_size=28, patch_size=7, embed_dim=32, depth=3, num_heads=2, num_classes=0) | kw
    return VisionTransformer(**cfg).eval()


# --- timm --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, prefix",
    [({}, 1), ({"reg_tokens": 4}, 5), ({"class_token": False, "global_pool": "avg"}, 0)],
)
@pytest.mark.parametrize("layer", [-2, -1, 1])
def test_timm_matches_block_output(kw, prefix, layer):
    vit = _tiny_timm(**kw)
    bb = wrap_backbone(vit)
    assert isinstance(bb, TimmBackbone)
    assert bb.num_prefix_tokens == prefix
    assert (bb.image_size, bb.patch_size, bb.grid_size, bb.hidden_size) == ((28, 28), (7, 7), (4, 4), 32)
    x = torch.randn(3, 3, 28, 28)
    k = layer if layer > 0 else 3 + 1 + layer
    with torch.no_grad():
        ref = _hooked_block_output(vit.blocks, k, lambda: vit(x))[:, prefix:]
        got = bb.features(x, layer=layer)
    assert got.shape == (3, 16, 32)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_timm_default_layer_is_second_to_last():
    vit = _tiny_timm()
    bb = wrap_backbone(vit)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(bb.features(x), bb.features(x, layer=2), rtol=0, atol=0)
        assert not torch.equal(bb.features(x), bb.features(x, layer=3))


def test_timm_normalization_from_pretrained_cfg():
    bb = create_backbone("timm:vit_base_patch16_clip_224", img_size=32, depth=2, embed_dim=32, num_heads=2)
    assert bb.mean == pytest.approx(hrperc.backbones.OPENAI_CLIP_MEAN)
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(bb.mean).view(3, 1, 1)
    std = torch.tensor(bb.std).view(3, 1, 1)
    torch.testing.assert_close(bb.normalize(x), (x - mean) / std)


def test_timm_create_encoder_loads_local_safetensors(tmp_path):
    arch = dict(img_size=32, patch_size=16, depth=2, embed_dim=32, num_heads=2)
    import timm

    torch.manual_seed(1)
    src = timm.create_model("vit_tiny_patch16_224", **arch).eval()  # with its 1000-class head
    path = tmp_path / "tiny.safetensors"
    save_file(src.state_dict(), str(path))
    bb = create_backbone("timm:vit_tiny_patch16_224", pretrained=path, layer=-1, **arch)
    assert bb.source == str(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = _hooked_block_output(src.blocks, 2, lambda: src(x))[:, 1:]
        torch.testing.assert_close(bb.features(x), ref, rtol=0, atol=0)
    random = create_backbone("timm:vit_tiny_patch16_224", **arch)
    assert random.source is None
    assert not torch.equal(random.model.pos_embed, bb.model.pos_embed)


def test_timm_grad_checkpointing_same_gradients():
    vit = _tiny_timm()
    bb = wrap_backbone(vit, layer=-1).train()
    x = torch.randn(2, 3, 28, 28)
    bb.features(x).square().sum().backward()
    ref = {n: p.grad.clone() for n, p in bb.named_parameters() if p.grad is not None}
    bb.zero_grad()
    bb.set_grad_checkpointing(True)
    assert vit.grad_checkpointing
    bb.features(x).square().sum().backward()
    got = {n: p.grad for n, p in bb.named_parameters() if p.grad is not None}
    assert ref.keys() == got.keys() and "model.blocks.0.attn.qkv.weight" in ref
    for n in ref:
        torch.testing.assert_close(got[n], ref[n])


# --- open_clip ---------------------------------------------------------------------------------------
_OC_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 28, "layers": 3, "width": 32, "patch_size": 14, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def oc_name(tmp_path_factory):
    import open_clip

    folder = tmp_path_factory.mktemp("oc_cfg")
    (folder / "hrperc-test-tiny.json").write_text(json.dumps(_OC_CFG))
    open_clip.add_model_config(folder)
    return "hrperc-test-tiny"


@pytest.mark.parametrize("layer", [-2, -1])
def test_open_clip_matches_block_output(oc_name, layer):
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model(oc_name).eval()
    bb = wrap_backbone(model, layer=layer)
    assert isinstance(bb, OpenClipBackbone)
    assert (bb.num_prefix_tokens, bb.grid_size, bb.hidden_size, bb.num_layers) == (1, (2, 2), 32, 3)
    x = torch.randn(3, 3, 28, 28)
    k = 3 + 1 + layer
    with torch.no_grad():
        ref = _hooked_block_output(model.visual.transformer.resblocks, k, lambda: model.encode_image(x))
        torch.testing.assert_close(bb.features(x), ref[:, 1:], rtol=0, atol=0)


def test_open_clip_create_encoder_loads_local_file_and_dir(oc_name, tmp_path):
    import open_clip

    torch.manual_seed(2)
    src = open_clip.create_model(oc_name).eval()
    path = tmp_path / "open_clip_model.safetensors"
    save_file(src.state_dict(), str(path))
    (tmp_path / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": _OC_CFG, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}})
    )
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        ref = _hooked_block_output(src.visual.transformer.resblocks, 2, lambda: src.encode_image(x))[:, 1:]
        by_file = create_backbone(f"open_clip:{oc_name}", pretrained=str(path))
        torch.testing.assert_close(by_file.features(x), ref, rtol=0, atol=0)
        by_dir = create_backbone(f"open_clip:local-dir:{tmp_path}")
        torch.testing.assert_close(by_dir.features(x), ref, rtol=0, atol=0)
    assert by_dir.mean == (0.5, 0.5, 0.5) and by_dir.std == (0.25, 0.25, 0.25)
    assert by_file.mean == pytest.approx(hrperc.backbones.OPENAI_CLIP_MEAN)


# --- Hugging Face ------------------------------------------------------------------------------------
def _hf_vision(kind: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2)
    if kind == "clip":
        cfg = transformers.CLIPVisionConfig(image_size=28, patch_size=14, **common)
        return transformers.CLIPVisionModel(cfg).eval()
    cfg = transformers.SiglipVisionConfig(image_size=28, patch_size=7, **common)
    return transformers.SiglipVisionModel(cfg).eval()


@pytest.mark.parametrize("kind, prefix, grid", [("clip", 1, (2, 2)), ("siglip", 0, (4, 4))])
@pytest.mark.parametrize("layer", [-2, -1, 1])
def test_hf_matches_hidden_states(kind, prefix, grid, layer):
    model = _hf_vision(kind)
    bb = wrap_backbone(model)
    assert isinstance(bb, HFBackbone)
    assert (bb.num_prefix_tokens, bb.grid_size, bb.num_layers) == (prefix, grid, 3)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        ref = model(pixel_values=x, output_hidden_states=True).hidden_states[layer][:, prefix:]
        torch.testing.assert_close(bb.features(x, layer=layer), ref, rtol=0, atol=0)


def test_hf_create_encoder_from_local_dir(tmp_path):
    transformers = pytest.importorskip("transformers")
    vision = _hf_vision("clip")
    vision.save_pretrained(tmp_path / "vision")
    (tmp_path / "vision" / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.1, 0.2, 0.3], "image_std": [0.5, 0.5, 0.5]})
    )
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        ref = vision(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
        bb = create_backbone(f"hf:{tmp_path / 'vision'}")
        torch.testing.assert_close(bb.features(x), ref, rtol=0, atol=0)
    assert bb.mean == (0.1, 0.2, 0.3)
    # A full CLIPModel checkpoint loads its vision tower.
    torch.manual_seed(3)
    full = transformers.CLIPModel(
        transformers.CLIPConfig(
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=28,
                patch_size=14,
            ),
            text_config=dict(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                vocab_size=64,
                max_position_embeddings=8,
            ),
            projection_dim=8,
        )
    ).eval()
    full.save_pretrained(tmp_path / "full")
    with torch.no_grad():
        ref = full.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(create_backbone(f"hf:{tmp_path / 'full'}").features(x), ref, rtol=0, atol=0)


def test_hf_grad_checkpointing_same_gradients():
    bb = wrap_backbone(_hf_vision("clip"), layer=-2).train()
    x = torch.randn(2, 3, 28, 28)
    bb.features(x).square().sum().backward()
    ref = {n: p.grad.clone() for n, p in bb.named_parameters() if p.grad is not None}
    bb.zero_grad()
    bb.set_grad_checkpointing(True)
    bb.features(x).square().sum().backward()
    got = {n: p.grad for n, p in bb.named_parameters() if p.grad is not None}
    assert ref.keys() == got.keys() and len(ref) > 0
    for n in ref:
        torch.testing.assert_close(got[n], ref[n])


# --- errors ------------------------------------------------------------------------------------------
def test_unknown_names():
    with raises_naming(
        ValueError,
        "name='ViT-L-14-336'",
        "'timm:<model>'",
        "'open_clip:<model>'",
        "'hf:<local dir>'",
        "open_clip:ViT-L-14-336",
    ):
        create_backbone("ViT-L-14-336")
    with raises_naming(ValueError, "'timm:vit_no_such_model'", "timm.list_models("):
        create_backbone("timm:vit_no_such_model")
    with raises_naming(ValueError, "'open_clip:ViT-Q-99'", "open_clip.list_models()"):
        create_backbone("open_clip:ViT-Q-99")
    with raises_naming(ValueError, "'open_clip:hf-hub:timm/ViT-B-16-SigLIP'", "'open_clip:local-dir:<folder>'"):
        create_backbone("open_clip:hf-hub:timm/ViT-B-16-SigLIP")


def test_missing_weights_say_where(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with raises_naming(FileNotFoundError, str(missing), "'vit_tiny_patch16_224'", "pretrained=None"):
        create_backbone("timm:vit_tiny_patch16_224", pretrained=missing)
    with raises_naming(FileNotFoundError, str(tmp_path / "open_clip_config.json"), "open_clip_model.safetensors"):
        create_backbone(f"open_clip:local-dir:{tmp_path}")
    pytest.importorskip("transformers")
    with raises_naming(FileNotFoundError, str(tmp_path / "missing"), "config.json", "'hf:DIR'"):
        create_backbone(f"hf:{tmp_path / 'missing'}")


def test_unsupported_model_class(tmp_path):
    with raises_naming(TypeError, "Linear", "VisionTransformer", "CLIPVisionModel", "SiglipVisionModel"):
        wrap_backbone(nn.Linear(3, 3))
    with raises_naming(TypeError, "'timm:resnet18'", "ResNet", "forward_intermediates"):
        create_backbone("timm:resnet18")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    transformers.ViTModel(cfg).save_pretrained(tmp_path)
    with raises_naming(TypeError, str(tmp_path), "'vit'", "clip_vision_model", "siglip_vision_model"):
        create_backbone(f"hf:{tmp_path}")


def test_layer_out_of_range_and_wrong_pixels():
    bb = wrap_backbone(_tiny_timm())
    x = torch.randn(1, 3, 28, 28)
    with raises_naming(ValueError, "layer=4", "3-layer", "1..3", "-3..-1"):
        bb.features(x, layer=4)
    with raises_naming(ValueError, "layer=-4", "3-layer", "1..3", "-3..-1"):
        wrap_backbone(_tiny_timm(), layer=-4)
    with raises_naming(ValueError, "layer=0", "1..3", "-3..-1"):
        bb.features(x, layer=0)
    with raises_naming(ValueError, "(1, 3, 32, 32)", "(N, 3, 28, 28)", "tile_size=(28, 28)"):
        bb.features(torch.randn(1, 3, 32, 32))


def test_open_clip_with_timm_trunk_uses_timm_adapter(tmp_path):
    import open_clip

    cfg = {
        "embed_dim": 16,
        "vision_cfg": {
            "timm_model_name": "vit_tiny_patch16_224",
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": 32,
        },
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    }
    (tmp_path / "hrperc-test-timm-tower.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path)
    model = open_clip.create_model("hrperc-test-timm-tower").eval()
    bb = wrap_backbone(model)
    assert isinstance(bb, TimmBackbone) and bb.model is model.visual.trunk
    assert bb.image_size == tuple(model.visual.trunk.patch_embed.img_size)  # the trunk's own size
    assert bb.mean == pytest.approx(hrperc.backbones.OPENAI_CLIP_MEAN)
    x = torch.randn(2, 3, *bb.image_size)
    with torch.no_grad():
        ref = _hooked_block_output(model.visual.trunk.blocks, 11, lambda: model.encode_image(x))[:, 1:]
        torch.testing.assert_close(bb.features(x), ref, rtol=0, atol=0)


# --- gradient checkpointing really recomputes; the HF adapter stops at the requested layer ----------
def _count_forwards(module):
    """A forward hook on ``module`` counting its calls: ``(counter list, handle)``."""
    calls = []
    return calls, module.register_forward_hook(lambda m, a, o: calls.append(1))


def _forward_backward_counts(bb, x, probe, ckpt: bool) -> int:
    """Calls of ``probe`` (a submodule inside a block) in one forward+backward of ``bb.features``.

    The probe is the first linear of a block's MLP, not the MLP itself: non-reentrant checkpointing stops
    the recomputation as soon as the last tensor backward needs is saved (inside the MLP's last linear),
    so the MLP's own forward never returns during the recompute and its forward hook would not fire.
    """
    bb.set_grad_checkpointing(ckpt)
    calls, handle = _count_forwards(probe)
    try:
        bb.features(x).square().sum().backward()
    finally:
        handle.remove()
    bb.zero_grad()
    return len(calls)


def test_timm_grad_checkpointing_recomputes_blocks():
    vit = _tiny_timm()
    bb = wrap_backbone(vit, layer=-1).train()
    x = torch.randn(2, 3, 28, 28)
    assert _forward_backward_counts(bb, x, vit.blocks[0].mlp.fc1, ckpt=False) == 1
    assert _forward_backward_counts(bb, x, vit.blocks[0].mlp.fc1, ckpt=True) == 2  # forward + recompute


def test_open_clip_grad_checkpointing_same_gradients_and_recomputes(oc_name):
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model(oc_name)
    bb = wrap_backbone(model, layer=-1).train()
    x = torch.randn(2, 3, 28, 28)
    mlp = model.visual.transformer.resblocks[0].mlp.c_fc
    grads = []
    for ckpt in (False, True):
        bb.set_grad_checkpointing(ckpt)
        assert model.visual.transformer.grad_checkpointing == ckpt
        bb.features(x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in bb.named_parameters() if p.grad is not None})
        bb.zero_grad()
    assert grads[0].keys() == grads[1].keys() and "model.transformer.resblocks.0.attn.in_proj_weight" in grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n])
    assert _forward_backward_counts(bb, x, mlp, ckpt=False) == 1
    assert _forward_backward_counts(bb, x, mlp, ckpt=True) == 2


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_grad_checkpointing_recomputes_and_stops_early(kind):
    model = _hf_vision(kind)
    if kind == "siglip":
        assert model.vision_model.use_head if hasattr(model, "vision_model") else model.use_head
    bb = wrap_backbone(model, layer=1).train()  # block 1 of 3: blocks 2, 3 and the heads must not run
    vision = bb.model
    x = torch.randn(2, 3, 28, 28)
    # transformers 5 checkpoints a layer's forward inside its __call__, so count a submodule's forward.
    probe = vision.encoder.layers[0].mlp.fc1
    later = [vision.encoder.layers[1], vision.encoder.layers[2]]
    later += [getattr(vision, n) for n in ("post_layernorm", "head") if getattr(vision, n, None) is not None]
    for ckpt, expected in ((False, 1), (True, 2)):
        counters = [_count_forwards(m) for m in later]
        try:
            assert _forward_backward_counts(bb, x, probe, ckpt=ckpt) == expected
            with torch.no_grad():
                bb.features(x)
        finally:
            for _, handle in counters:
                handle.remove()
        assert [len(calls) for calls, _ in counters] == [0] * len(later), f"later modules ran (ckpt={ckpt})"
    # and the tokens are still the model's own hidden state of layer 1, checkpointing on
    with torch.no_grad():
        ref = model(pixel_values=x, output_hidden_states=True).hidden_states[1][:, bb.num_prefix_tokens :]
        torch.testing.assert_close(bb.features(x), ref, rtol=0, atol=0)


def test_hf_adapter_checkpoints_layers_that_do_not_checkpoint_themselves(monkeypatch):
    """Layers that do not checkpoint themselves (transformers < 4.52) are wrapped by the adapter."""
    import hrperc.backbones.hf_vit as hf_vit

    bb = wrap_backbone(_hf_vision("clip"), layer=-1).train()
    x = torch.randn(2, 3, 28, 28)
    probe = bb.model.encoder.layers[0].mlp.fc1
    bb.features(x).square().sum().backward()
    ref = {n: p.grad.clone() for n, p in bb.named_parameters() if p.grad is not None}
    bb.zero_grad()
    monkeypatch.setattr(hf_vit, "_is_self_checkpointing", lambda layer: False)
    for layer in bb.model.encoder.layers:  # as if the layers could not checkpoint themselves
        monkeypatch.setattr(layer, "gradient_checkpointing", False, raising=False)
    bb.grad_checkpointing = True
    bb.model.encoder.gradient_checkpointing = True
    calls, handle = _count_forwards(probe)
    bb.features(x).square().sum().backward()
    handle.remove()
    assert len(calls) == 2
    for n, p in bb.named_parameters():
        if n in ref:
            torch.testing.assert_close(p.grad, ref[n])


# --- messages and loading details ----------------------------------------------------------------------
def test_missing_transformers_says_what_to_install(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    with raises_naming(ImportError, "'transformers'", "pip install", "hrperc[hf]"):
        create_backbone(f"hf:{tmp_path}")


def test_open_clip_local_dir_honours_pretrained(oc_name, tmp_path):
    import open_clip

    folder = tmp_path / "dir"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": _OC_CFG}))
    torch.manual_seed(4)
    in_folder = open_clip.create_model(oc_name).eval()
    save_file(in_folder.state_dict(), str(folder / "open_clip_model.safetensors"))
    torch.manual_seed(5)
    other = open_clip.create_model(oc_name).eval()
    path = tmp_path / "other.safetensors"
    save_file(other.state_dict(), str(path))
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        ref_folder = _hooked_block_output(in_folder.visual.transformer.resblocks, 2, lambda: in_folder.encode_image(x))
        ref_other = _hooked_block_output(other.visual.transformer.resblocks, 2, lambda: other.encode_image(x))
        by_dir = create_backbone(f"open_clip:local-dir:{folder}")
        torch.testing.assert_close(by_dir.features(x), ref_folder[:, 1:], rtol=0, atol=0)
        by_file = create_backbone(f"open_clip:local-dir:{folder}", pretrained=path)
        torch.testing.assert_close(by_file.features(x), ref_other[:, 1:], rtol=0, atol=0)
    assert by_file.source == str(path)
    (folder / "open_clip_model.safetensors").unlink()
    with raises_naming(FileNotFoundError, str(folder), "open_clip_model.safetensors", "pretrained="):
        create_backbone(f"open_clip:local-dir:{folder}")
    with raises_naming(FileNotFoundError, str(tmp_path / "missing.bin"), "pretrained=None"):
        create_backbone(f"open_clip:local-dir:{folder}", pretrained=tmp_path / "missing.bin")


def test_quickgelu_warnings(oc_name, tmp_path):
    import warnings

    import open_clip

    # open_clip configs shrunk to the tiny test tower (create_backbone passes **kw on to open_clip), so
    # the checkpoint of a tiny model loads into them.
    ckpt = tmp_path / "vit-l-14-336.safetensors"
    save_file(open_clip.create_model(oc_name).state_dict(), str(ckpt))
    openai_ckpt = tmp_path / "openai" / "ViT-B-16.safetensors"
    openai_ckpt.parent.mkdir()
    openai_ckpt.write_bytes(ckpt.read_bytes())
    laion_ckpt = tmp_path / "laion2b.safetensors"
    laion_ckpt.write_bytes(ckpt.read_bytes())

    def load(name, path, **kw):
        return create_backbone(f"open_clip:{name}", pretrained=path, **_OC_CFG, **kw)

    # open_clip: OpenAI's are the only published ViT-L-14-336 weights, and they need QuickGELU
    with warns_naming(
        UserWarning, str(ckpt), "'ViT-L-14-336'", "'open_clip:ViT-L-14-336-quickgelu'", "force_quick_gelu=True"
    ):
        load("ViT-L-14-336", ckpt)
    with warns_naming(
        UserWarning,
        str(openai_ckpt),
        "'ViT-B-16'",
        "'openai'",
        "'open_clip:ViT-B-16-quickgelu'",
        "force_quick_gelu=True",
    ):
        load("ViT-B-16", openai_ckpt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load("ViT-L-14-336-quickgelu", ckpt)
        load("ViT-L-14-336", ckpt, force_quick_gelu=True)
        load("ViT-B-16", laion_ckpt)  # GELU weights exist too
    # timm: vit_*_clip_* is GELU; a file that says 'openai' gets pointed at vit_*_clip_quickgelu_*
    import timm

    arch = dict(img_size=32, depth=2, embed_dim=32, num_heads=2)
    src = timm.create_model("vit_base_patch16_clip_224", **arch)
    path = tmp_path / "openai-clip-b16.safetensors"
    save_file(src.state_dict(), str(path))
    with warns_naming(
        UserWarning, str(path), "'vit_base_patch16_clip_224'", "'openai'", "'timm:vit_base_patch16_clip_quickgelu_224'"
    ):
        create_backbone("timm:vit_base_patch16_clip_224", pretrained=path, **arch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_backbone("timm:vit_base_patch16_clip_quickgelu_224", pretrained=path, **arch)


# --- towers whose tile is not a multiple of the patch (SigLIP so400m-patch14-384: 27 x 27 patches) -----------
def _siglip(image_size=30, patch_size=14, seed=0):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    cfg = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )
    torch.manual_seed(seed)
    return SiglipVisionModel(cfg).eval()


@pytest.mark.parametrize("image_size,patch_size", [(30, 14), (384, 14), (40, 16)])
def test_tiles_that_are_not_a_multiple_of_the_patch_keep_whole_patches(image_size, patch_size):
    model = _siglip(image_size, patch_size)
    bb = wrap_backbone(model)
    side = image_size // patch_size
    assert bb.image_size == (image_size, image_size) and bb.grid_size == (side, side)
    x = bb.normalize(torch.rand(2, 3, image_size, image_size))
    with torch.no_grad():
        ref = model(pixel_values=x, output_hidden_states=True).hidden_states[-2]
        got = bb.features(x)
    assert got.shape == (2, side * side, 32)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_encoder_on_a_non_multiple_tile_counts_and_masks_whole_patches():
    bb = wrap_backbone(_siglip(30, 14))  # 2 x 2 patches per 30-pixel tile, 2 pixels unread
    enc = hrperc.create_encoder("inf_llava", bb)
    images = [torch.rand(3, 100, 60), torch.rand(3, 31, 95)]
    out = enc(images)
    assert out.num_tokens == [enc.num_tokens(tuple(i.shape[-2:])) for i in images] == [4, 4]
    assert out.tokens.shape == (2, 4, 32) and all(m.shape == (6, 6) and m.all() for m in out.valid_masks)
    pad = hrperc.HighResEncoder(
        bb, hrperc.DualPerspectiveCrop(grid="auto", tile_size=30, fit="pad", max_tiles=4), dem=None, combine="none"
    )
    mask = pad(torch.rand(3, 30, 40)).valid_masks[0]  # grid (1, 2): content in columns 0..39 of 60
    # Tile 1's patches cover columns 30..43 and 44..57: the first holds content, the second only padding.
    assert mask.shape == (2, 4) and mask.tolist() == [[True, True, True, False]] * 2


# --- views of other sizes: accepts() and features() at sizes other than the native one --------------------------
def _oc_tiny(oc_name):
    import open_clip

    torch.manual_seed(0)
    return open_clip.create_model(oc_name).eval()


@pytest.mark.parametrize(
    "make, dynamic",
    [
        (lambda oc: _tiny_timm(), False),
        (lambda oc: _tiny_timm(dynamic_img_size=True), True),
        (lambda oc: _tiny_timm(dynamic_img_size=True, reg_tokens=2, patch_size=4), True),
        (_oc_tiny, False),
        (lambda oc: _hf_vision("clip"), True),
        (lambda oc: _hf_vision("siglip"), True),
        (lambda oc: _siglip(30, 14), True),  # native 30 is not a multiple of 14: accepted as the native size only
    ],
    ids=["timm", "timm-dynamic", "timm-dynamic-p4-reg", "open_clip", "hf-clip", "hf-siglip", "hf-siglip-30"],
)
def test_accepts_the_native_size_and_other_sizes_only_when_the_model_resizes(make, dynamic, oc_name):
    bb = wrap_backbone(make(oc_name))
    (h, w), (ph, pw) = bb.image_size, bb.patch_size
    assert bb.dynamic_size is dynamic
    assert bb.accepts((h, w)) and bb.accepts([h, w]) and bb.accepts(torch.Size([h, w]))
    for size in [(2 * ph, 3 * pw), (5 * ph, pw), (h + 2 * ph - h % ph, w - w % pw)]:
        assert bb.accepts(size) is dynamic, size
    for size in [(2 * ph + 1, 2 * pw), (2 * ph, 3 * pw - 1)]:  # not whole patches: refused by every backbone
        assert bb.accepts(size) is False, size


@pytest.mark.parametrize("size", ["224", 224, (224,), (224, 224, 3), (224.0, 224), (True, 28), None])
def test_accepts_refuses_what_is_not_a_size(size):
    bb = wrap_backbone(_tiny_timm(dynamic_img_size=True))
    with raises_naming(TypeError, f"size={size!r}", "(h, w)", "size=("):
        bb.accepts(size)


@pytest.mark.parametrize("size", [(0, 28), (28, -7)])
def test_accepts_refuses_empty_sizes(size):
    with raises_naming(ValueError, f"size={size!r}", ">= 1", "size=("):
        wrap_backbone(_tiny_timm()).accepts(size)


@pytest.mark.parametrize(
    "kw, prefix", [({}, 1), ({"reg_tokens": 3}, 4), ({"class_token": False, "global_pool": "avg"}, 0)]
)
@pytest.mark.parametrize("size", [(56, 28), (14, 49), (35, 35)])
def test_timm_dynamic_views_of_other_sizes_match_block_output(kw, prefix, size):
    vit = _tiny_timm(dynamic_img_size=True, **kw)
    bb = wrap_backbone(vit, layer=-2)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref = _hooked_block_output(vit.blocks, 2, lambda: vit(x))[:, prefix:]
        got = bb.features(x)
    assert got.shape == (2, (size[0] // 7) * (size[1] // 7), 32)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


@pytest.mark.parametrize("kind, prefix, patch", [("clip", 1, 14), ("siglip", 0, 7)])
@pytest.mark.parametrize("cells", [(4, 2), (1, 3), (3, 3)])
@pytest.mark.parametrize("layer", [-1, 1])
def test_hf_views_of_other_sizes_match_interpolated_hidden_states(kind, prefix, patch, cells, layer):
    model = _hf_vision(kind)
    bb = wrap_backbone(model)
    x = torch.randn(2, 3, cells[0] * patch, cells[1] * patch)
    with torch.no_grad():
        out = model(pixel_values=x, interpolate_pos_encoding=True, output_hidden_states=True)
        got = bb.features(x, layer=layer)
    assert got.shape == (2, cells[0] * cells[1], 32)
    torch.testing.assert_close(got, out.hidden_states[layer][:, prefix:], rtol=0, atol=0)


def test_views_a_backbone_does_not_accept_are_refused(oc_name):
    fixed = wrap_backbone(_tiny_timm())
    for bb in (fixed, wrap_backbone(_oc_tiny(oc_name))):
        (h, w) = bb.image_size
        with raises_naming(ValueError, f"(1, 3, {2 * h}, {w})", f"(N, 3, {h}, {w})", f"tile_size={bb.image_size}"):
            bb.features(torch.randn(1, 3, 2 * h, w))
    dynamic = [wrap_backbone(_tiny_timm(dynamic_img_size=True)), wrap_backbone(_hf_vision("clip"))]
    for bb in dynamic:
        (h, w), (ph, pw) = bb.image_size, bb.patch_size
        for shape in [(1, 3, h + 1, w), (1, 3, 2 * ph, 2 * pw - 2)]:
            with raises_naming(ValueError, str(shape), f"multiple of {ph}", f"({h}, {w})", "Resize"):
                bb.features(torch.randn(*shape))
        with raises_naming(ValueError, "(1, 1, 28, 28)"):
            bb.features(torch.randn(1, 1, 28, 28))


# --- the family registry -----------------------------------------------------------------------------------------
@pytest.fixture
def registry(monkeypatch):
    """The family registry, restored after the test."""
    from hrperc.backbones import factory

    monkeypatch.setattr(factory, "_FAMILIES", dict(factory._FAMILIES))
    return factory


def test_the_three_families_are_registered_with_their_aliases(oc_name, tmp_path):
    families = hrperc.backbones.list_families()
    assert [(f.prefix, f.aliases) for f in families] == [
        ("timm", ()),
        ("open_clip", ("open-clip", "openclip")),
        ("hf", ("transformers",)),
    ]
    for prefix in ("timm", "open_clip", "open-clip", "openclip"):
        name = "vit_tiny_patch16_224" if prefix == "timm" else oc_name
        bb = create_backbone(f"{prefix}:{name}")
        assert bb.family == ("timm" if prefix == "timm" else "open_clip") and not bb.training
    _hf_vision("siglip").save_pretrained(tmp_path)
    for prefix in ("hf", "transformers"):
        assert isinstance(create_backbone(f"{prefix}:{tmp_path}"), HFBackbone)


def test_a_registered_family_is_built_by_name_and_wraps_its_models(registry):
    calls = []

    def create(name, pretrained, *, layer, mean, std, strict, **kwargs):
        calls.append((name, pretrained, layer, strict, kwargs))
        return wrap_backbone(_tiny_timm(), layer=layer, mean=mean, std=std)

    class Tower(nn.Module):
        pass

    def wrap(model, *, layer, mean, std):
        return wrap_backbone(_tiny_timm(), layer=layer) if isinstance(model, Tower) else None

    family = hrperc.backbones.register_family(
        "toy", create, wrap=wrap, aliases=("toy-vit",), usage="'toy:<x>'", supports="Tower"
    )
    assert family in hrperc.backbones.list_families() and family.prefix == "toy"
    bb = create_backbone("toy-vit:small:v2", pretrained="/w.bin", layer=-1, strict=False, depth=9)
    assert calls == [("small:v2", "/w.bin", -1, False, {"depth": 9})]
    assert not bb.training and bb.layer == -1
    assert isinstance(wrap_backbone(Tower(), layer=1), TimmBackbone)
    with raises_naming(TypeError, "Linear", "Tower", "timm VisionTransformer", "CLIPVisionModel"):
        wrap_backbone(nn.Linear(2, 2))
    with raises_naming(ValueError, "name='nope:x'", "'toy:<x>'", "'timm:<model>'", "'hf:<local dir>'"):
        create_backbone("nope:x")


def test_register_family_refuses_taken_and_malformed_prefixes(registry):
    def create(name, pretrained, **kw):
        raise AssertionError("never called")

    for prefix, aliases in [("timm", ()), ("mine", ("openclip",)), ("transformers", ("x",))]:
        taken = prefix if prefix != "mine" else "openclip"
        with raises_naming(ValueError, f"{taken!r}", "Pick another prefix"):
            hrperc.backbones.register_family(prefix, create, aliases=aliases)
    for prefix, aliases in [("", ()), ("a:b", ()), (3, ()), ("ok", ["list"]), ("ok", ("",))]:
        with raises_naming(TypeError, f"prefix={prefix!r}", f"aliases={aliases!r}", "Pass"):
            hrperc.backbones.register_family(prefix, create, aliases=aliases)
    for bad in [dict(create="create"), dict(create=create, wrap=3)]:
        with raises_naming(TypeError, "create=", "wrap=", "Pass"):
            hrperc.backbones.register_family("fine", **bad)
    assert "fine" not in [f.prefix for f in hrperc.backbones.list_families()]


def test_backbones_use_no_private_names_of_timm_open_clip_or_transformers():
    """No ``from timm.models._registry import ...``, ``open_clip.factory._x`` or ``transformers._x`` in the adapters."""
    import ast
    from pathlib import Path

    libraries = ("timm", "open_clip", "transformers")
    found = []
    for path in sorted(Path(hrperc.backbones.__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text())
        aliases = {}  # local name -> library module path, from the imports
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in libraries:
                parts = node.module.split(".") + [a.name for a in node.names]
                found += [
                    f"{path.name}: from {node.module} import {a.name}"
                    for a in node.names
                    if any(p.startswith("_") for p in parts)
                ]
                aliases.update({a.asname or a.name: node.module for a in node.names})
            elif isinstance(node, ast.Import):
                aliases.update({(a.asname or a.name).split(".")[0]: a.name for a in node.names})
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                root = node.value
                while isinstance(root, ast.Attribute):
                    root = root.value
                if isinstance(root, ast.Name) and str(aliases.get(root.id, "")).split(".")[0] in libraries:
                    found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert found == []


# --- open_clip checkpoints: hrperc's reader, open_clip's conversions --------------------------------------------
def _oc_config(tmp_path, name, **vision):
    import open_clip

    cfg = json.loads(json.dumps(_OC_CFG))
    cfg["vision_cfg"].update(vision)
    folder = tmp_path / f"cfg_{name}"
    folder.mkdir()
    (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    return name


@pytest.mark.parametrize("case", ["plain", "scalar logit_scale", "other image size", "custom text tower"])
def test_open_clip_checkpoints_load_as_open_clips_own_loader_loads_them(oc_name, tmp_path, case):
    import open_clip

    torch.manual_seed(7)
    target = oc_name
    if case == "other image size":  # a 42-pixel checkpoint into the 28-pixel config: open_clip resamples pos-embed
        src = open_clip.create_model(_oc_config(tmp_path, "hrperc-test-tiny-42", image_size=42))
    else:
        src = open_clip.create_model(oc_name)
    sd = {k: v.detach().clone() for k, v in src.state_dict().items()}
    if case == "scalar logit_scale":
        sd["logit_scale"] = sd["logit_scale"].reshape(())
    if case == "custom text tower":  # an old-layout (CLIP) checkpoint into a CustomTextCLIP config
        name = "hrperc-test-tiny-custom-text"
        folder = tmp_path / "cfg_custom"
        folder.mkdir()
        (folder / f"{name}.json").write_text(json.dumps(_OC_CFG | {"custom_text": True}))
        open_clip.add_model_config(folder)
        target = name
    path = tmp_path / "ckpt.safetensors"
    save_file(sd, str(path))
    bb = create_backbone(f"open_clip:{target}", pretrained=path)
    ref = open_clip.create_model(target)
    open_clip.load_checkpoint(ref, str(path))
    assert bb.source == str(path)
    got = bb.model.state_dict()
    want = ref.visual.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_open_clip_tower_with_more_prefix_tokens_strips_them_all():
    from open_clip.transformer import VisionTransformer

    class Registers(VisionTransformer):  # a class token plus two register tokens, all with positions
        def __init__(self, **kw):
            super().__init__(**kw)
            self.registers = nn.Parameter(torch.randn(2, self.conv1.out_channels))
            grid = self.grid_size[0] * self.grid_size[1]
            self.positional_embedding = nn.Parameter(torch.randn(grid + 3, self.conv1.out_channels))

        def _embeds(self, x):
            x = self.conv1(x).flatten(2).transpose(1, 2)
            prefix = torch.cat([self.class_embedding[None], self.registers]).expand(x.shape[0], -1, -1)
            return self.ln_pre(torch.cat([prefix, x], dim=1) + self.positional_embedding)

    torch.manual_seed(0)
    vit = Registers(image_size=28, patch_size=7, width=32, layers=3, heads=2, mlp_ratio=2.0).eval()
    bb = OpenClipBackbone(vit, layer=-2)
    assert bb.num_prefix_tokens == 3
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        ref = _hooked_block_output(vit.transformer.resblocks, 2, lambda: vit(x))[:, 3:]
        got = bb.features(x)
    assert got.shape == (2, 16, 32)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


@pytest.mark.parametrize(
    "files, chosen",
    [
        (["b.bin", "a.pth", "z.safetensors"], "z.safetensors"),
        (["a.bin", "c.bin"], "a.bin"),
        (["model.safetensors", "open_clip_pytorch_model.bin", "x.safetensors"], "open_clip_pytorch_model.bin"),
        (["pytorch_model.bin", "model.pth", "a.safetensors"], "pytorch_model.bin"),
    ],
)
def test_open_clip_local_dir_picks_the_checkpoint_open_clip_would(oc_name, tmp_path, files, chosen):
    import open_clip

    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": _OC_CFG}))
    for i, name in enumerate(files):
        torch.manual_seed(i)
        save_file(open_clip.create_model(oc_name).state_dict(), str(tmp_path / name))
    bb = create_backbone(f"open_clip:local-dir:{tmp_path}")  # every file is safetensors: read by content
    torch.manual_seed(files.index(chosen))
    want = open_clip.create_model(oc_name).visual.state_dict()
    got = bb.model.state_dict()
    assert bb.source == str(tmp_path) and all(torch.equal(got[k], want[k]) for k in want)
