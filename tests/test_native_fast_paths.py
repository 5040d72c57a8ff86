"""The native-resolution recipes' fast paths against their reference computations: sources reach the views
without a copy, Qwen's and Pixtral's towers normalize while packing (bit for bit the values of normalizing
first), channels-last sources (PIL images) give the tokens of channels-first ones, Pixtral's positions are
the model's, and its attention's intermediates are gone before the MLP runs."""

from __future__ import annotations

import copy
import gc

import pytest
import torch

tf = pytest.importorskip("transformers")

from _pixtral_tiny import SETTINGS as PIXTRAL  # noqa: E402
from _pixtral_tiny import build_pixtral  # noqa: E402
from _qwen_tiny import build_qwen  # noqa: E402

import hrperc  # noqa: E402
from hrperc.backbones.pixtral import _positions  # noqa: E402
from hrperc.backbones.qwen_vl import QwenVisionTower  # noqa: E402


def _uint8(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)


@pytest.fixture(scope="module")
def qwen():
    model, ip = build_qwen("qwen3_vl")  # the deepstack levels ride on the channels: the widest layout
    budget = dict(min_pixels=ip.size["shortest_edge"], max_pixels=ip.size["longest_edge"])
    return model, hrperc.create_encoder("qwen3_vl", model.model.visual, **budget)


@pytest.fixture(scope="module")
def pixtral():
    model, _ = build_pixtral("llava")
    patch, merge, edge = PIXTRAL["llava"]
    return model, hrperc.create_encoder("pixtral", model.model.vision_tower, merge_size=merge, longest_edge=edge)


def test_sources_reach_the_views_uncopied_unless_a_size_group_must_be_joined(qwen, monkeypatch):
    _, enc = qwen
    seen = []
    views = enc.front_end.views
    monkeypatch.setattr(enc.front_end, "views", lambda x, plan: seen.append(x) or views(x, plan))
    images = [_uint8(3, 70, 90), _uint8(3, 50, 60, seed=1), _uint8(3, 70, 90, seed=2)]
    hwc = _uint8(64, 80, 3, seed=3).permute(2, 0, 1)  # a PIL image's layout: channels last in memory
    with torch.no_grad():
        enc([*images, hwc])
    one, two, last = (seen[i] for i in (1, 0, 2))  # groups in order of first appearance: (70, 90) first
    assert one.untyped_storage().data_ptr() == images[1].untyped_storage().data_ptr()  # a view, not a copy
    assert last.untyped_storage().data_ptr() == hwc.untyped_storage().data_ptr()
    assert last.is_contiguous(memory_format=torch.channels_last)  # the resize reads it without repacking
    assert two.shape[0] == 2 and torch.equal(two, torch.stack([images[0], images[2]]))  # joined: a copy


def test_a_channels_last_source_gives_the_tokens_of_a_channels_first_one(qwen, pixtral):
    image = _uint8(3, 90, 130, seed=4)
    hwc = image.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    for _, enc in (qwen, pixtral):
        with torch.no_grad():
            a, b = enc([image, _uint8(3, 40, 100)]), enc([hwc, _uint8(3, 40, 100)])
        assert torch.equal(a.tokens, b.tokens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qwen_packing_pixels_equals_packing_normalized_views(qwen, dtype):
    model, _ = qwen
    bb = hrperc.create_encoder("qwen3_vl", copy.deepcopy(model.model.visual).to(dtype)).backbone
    # uint8 and [0, 1] float stacks of several sizes, two views in one stack
    stacks = [_uint8(2, 3, 64, 96), _uint8(1, 3, 32, 64, seed=1).float() / 255, _uint8(1, 3, 64, 64, seed=2)]
    with torch.no_grad():
        fast = bb.features_packed(stacks, pixels=True)
        ref = bb.features_packed([bb.normalize(s).to(dtype) for s in stacks])
        views = [bb.normalize(v).to(dtype) for s in stacks for v in s.unbind(0)]
        alone = torch.cat(bb._tokens(views), 1)[0]  # the tower's own per-view forward
    assert [tuple(f.shape) for f in fast] == [(2, 6, 96), (1, 2, 96), (1, 4, 96)]
    assert all(f.dtype == dtype and torch.equal(f, r) for f, r in zip(fast, ref))
    assert torch.equal(torch.cat([f.flatten(0, 1) for f in fast]), alone)


def test_qwen_pack_of_interleaved_sizes_equals_each_view_packed_alone():
    model, _ = build_qwen("qwen2_vl")
    tower = QwenVisionTower(model.model.visual)
    a, b, c = (tower.normalize(_uint8(3, h, w, seed=s)) for s, (h, w) in enumerate([(56, 84), (28, 56), (56, 84)]))
    for views in ([a, b, c], [a, c, b], [b, a, c]):  # sizes interleaved (a scatter) and consecutive (in place)
        packed, grid_thw = tower.pack(views)
        alone = torch.cat([tower.pack([v])[0] for v in views])
        assert torch.equal(packed, alone)
        assert grid_thw[:, 1:].tolist() == [[v.shape[1] // 14, v.shape[2] // 14] for v in views]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pixtral_packing_pixels_equals_packing_normalized_views(pixtral, dtype):
    model, _ = pixtral
    bb = hrperc.create_encoder("pixtral", copy.deepcopy(model.model.vision_tower).to(dtype)).backbone
    stacks = [_uint8(2, 3, 32, 48), _uint8(1, 3, 64, 16, seed=1).float() / 255, _uint8(1, 3, 16, 16, seed=2)]
    with torch.no_grad():
        fast = bb.features_packed(stacks, pixels=True)
        ref = bb.features_packed([bb.normalize(s).to(dtype) for s in stacks])
    assert [tuple(f.shape) for f in fast] == [(2, 6, 32), (1, 4, 32), (1, 1, 32)]
    assert all(f.dtype == dtype and torch.equal(f, r) for f, r in zip(fast, ref))


def test_pixtral_positions_are_the_models_meshgrid_per_image():
    stacks = [torch.zeros(2, 3, 32, 48), torch.zeros(1, 3, 64, 16), torch.zeros(1, 3, 16, 16)]
    expected = []
    for s in stacks:  # PixtralVisionModel.forward's positions, image by image
        for _ in range(s.shape[0]):
            h, w = torch.meshgrid(torch.arange(s.shape[-2] // 16), torch.arange(s.shape[-1] // 16), indexing="ij")
            expected.append(torch.stack([h.flatten(), w.flatten()], -1))
    assert torch.equal(_positions(stacks, 16, torch.device("cpu")), torch.cat(expected))


def test_pixtral_attention_intermediates_are_freed_before_the_mlp(pixtral):
    model, enc = pixtral
    tower = model.model.vision_tower
    layers = tower.transformer.layers
    weights = {t.untyped_storage().data_ptr() for t in [*tower.parameters(), *tower.buffers()]}
    alive: list[int] = []

    def count(module, args):  # distinct live buffers of (N, D) elements (not weights) when the MLP starts
        n = args[0].numel()
        ptrs = {
            o.untyped_storage().data_ptr()
            for o in gc.get_objects()
            if issubclass(type(o), torch.Tensor) and o.numel() == n and o.dtype == args[0].dtype
        }
        alive.append(len(ptrs - weights))

    hooks = [layer.feed_forward.register_forward_pre_hook(count) for layer in layers]
    try:
        with torch.no_grad():
            enc([_uint8(3, 150, 230), _uint8(3, 97, 61, seed=1)])
    finally:
        for h in hooks:
            h.remove()
    # the layer's input, the residual sum and the MLP's normed input; not the normed attention input, q,
    # k or v (seven with them)
    assert alive == [3] * len(layers), alive


@pytest.mark.parametrize("train", [False, True])
def test_qwen_tower_input_is_released_after_the_patch_embedding_only_without_autograd(qwen, train):
    model, _ = qwen
    tower = copy.deepcopy(model.model.visual)
    enc = hrperc.create_encoder("qwen3_vl", tower, train_backbone=train)
    seen, sizes = [], []
    hooks = [
        tower.patch_embed.register_forward_hook(lambda m, args, out: seen.append(args[0])),
        tower.blocks[0].register_forward_pre_hook(lambda m, args: sizes.append(seen[0].untyped_storage().nbytes())),
    ]
    try:
        out = enc([_uint8(3, 90, 130), _uint8(3, 40, 100, seed=1)])
    finally:
        for h in hooks:
            h.remove()
    # pixel_values are read once: freed before the blocks run, unless the backward pass needs them
    assert (sizes[0] == 0) != train and out.tokens.requires_grad == train
