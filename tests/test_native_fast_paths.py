"""The native-resolution recipes' fast paths against their reference computations: sources reach the views
without a copy, Qwen's and Pixtral's towers normalize while packing (bit for bit the values of normalizing
first), channels-last sources (PIL images) give the tokens of channels-first ones, Pixtral's positions are
the model's, and its attention's intermediates are gone before the MLP runs. MiniCPM-V's packed tower
without autograd (its lean pass) equals its reference pass bit for bit and holds less."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

tf = pytest.importorskip("transformers")

from _minicpm_tiny import build_minicpm  # noqa: E402
from _pixtral_tiny import SETTINGS as PIXTRAL  # noqa: E402
from _pixtral_tiny import build_pixtral  # noqa: E402
from _qwen_tiny import build_qwen  # noqa: E402

import hrperc  # noqa: E402
from hrperc.backbones.pixtral import _positions  # noqa: E402
from hrperc.backbones.qwen_vl import QwenVisionTower  # noqa: E402
from hrperc.recipes.minicpm_v import MiniCPMVBackbone, _inplace_gelu  # noqa: E402


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


# --- MiniCPM-V: the lean pass (no autograd) against the reference pass ------------------------------------------
@pytest.fixture(scope="module")
def minicpm():
    return build_minicpm("4_6")[0]


def _minicpm_stacks():
    """uint8 and ``[0, 1]`` float stacks of three view sizes (whole 28 px windows), two views in one."""
    return [_uint8(2, 3, 56, 84), _uint8(1, 3, 28, 56, seed=1).float() / 255, _uint8(3, 3, 112, 56, seed=2)]


@pytest.mark.parametrize("mode", ["16x", "4x"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_minicpm_lean_pass_equals_the_reference_pass_bit_for_bit(minicpm, mode, dtype):
    tower = copy.deepcopy(minicpm.model.vision_tower).to(dtype).requires_grad_(True)
    bb = MiniCPMVBackbone(tower, downsample_mode=mode)
    stacks = _minicpm_stacks()
    with torch.no_grad():
        lean = bb.features_packed(stacks, pixels=True)  # the runner's path: normalized stack by stack
        lean_normalized = bb.features_packed([bb.normalize(s) for s in stacks])
    ref = bb.features_packed([bb.normalize(s) for s in stacks])  # autograd on: the reference pass, kept
    per_side = 28 if mode == "16x" else 14
    assert [tuple(r.shape) for r in ref] == [
        (s.shape[0], (s.shape[-2] // per_side) * (s.shape[-1] // per_side), 32) for s in stacks
    ]
    assert all(r.requires_grad and r.dtype == dtype for r in ref)
    assert all(torch.equal(a, r) and torch.equal(b, r) for a, b, r in zip(lean, lean_normalized, ref))
    torch.cat([r.flatten() for r in ref]).float().square().sum().backward()  # the reference still trains
    assert all(p.grad is not None for p in tower.encoder.parameters())


def test_minicpm_gelu_runs_in_place_only_where_it_is_the_same_kernel(minicpm):
    from transformers.activations import GELUTanh

    tower = minicpm.model.vision_tower
    x = torch.randn(97, 40)
    for act in (
        tower.encoder.layers[0].mlp.activation_fn,
        tower.vit_merger.act,
        torch.nn.GELU(),
        torch.nn.GELU("tanh"),
    ):
        inplace = _inplace_gelu(act)
        assert inplace is not None, act
        y = x.clone()
        out = inplace(y)
        assert out.data_ptr() == y.data_ptr() and torch.equal(out, act(x))
    for other in (GELUTanh(use_gelu_tanh_python=True), torch.nn.ReLU(), torch.nn.SiLU()):
        assert _inplace_gelu(other) is None  # run out of place, as they are


@pytest.mark.parametrize("train", [False, True])
def test_minicpm_float_pixels_are_freed_after_their_convolution_only_without_autograd(minicpm, train):
    tower = copy.deepcopy(minicpm.model.vision_tower)
    enc = hrperc.create_encoder("minicpm_v", tower, train_backbone=train, scale_resolution=112)
    seen: list = []
    alive: list = []
    hooks = [
        tower.embeddings.patch_embedding.register_forward_hook(lambda m, args, out: seen.append(weakref.ref(args[0]))),
        tower.encoder.layers[0].layer_norm1.register_forward_pre_hook(
            lambda m, args: alive.append([r() is not None for r in seen])
        ),
    ]
    try:
        out = enc([_uint8(3, 125, 225), _uint8(3, 40, 60, seed=1)])  # 1 x 2 slices; the source alone
    finally:
        for h in hooks:
            h.remove()
    # the float copy of each view stack (one per view size) is read once: gone before the first block, unless
    # autograd keeps it for the convolution's backward
    assert len(seen) >= 2 and alive[0] == [train] * len(seen) and out.tokens.requires_grad == train


def test_minicpm_lean_pass_holds_one_mlp_intermediate_and_no_normed_input(minicpm):
    tower = copy.deepcopy(minicpm.model.vision_tower)
    bb = MiniCPMVBackbone(tower)
    layer, merger = tower.encoder.layers[0], tower.vit_merger  # the window merger runs after block 0
    weights = {t.untyped_storage().data_ptr() for t in [*tower.parameters(), *tower.buffers()]}
    width = layer.mlp.fc1.in_features
    counts: list = []
    made: list = []

    def count(module, args):  # distinct live (not weight) buffers of (N, D) elements when fc2 starts
        rows = args[0].shape[0] * (4 if module is merger.linear_2 else 1)  # N: the tokens before the merge
        ptrs = {
            o.untyped_storage().data_ptr()
            for o in gc.get_objects()
            if issubclass(type(o), torch.Tensor) and o.numel() == rows * width and o.dtype == args[0].dtype
        }
        # fc2 reads the buffer of the fc1 that ran just before it? (Only that one: an earlier fc1's buffer is
        # freed and its address can be handed out again, e.g. to the reference's GELU output.)
        counts.append((len(ptrs - weights), args[0].data_ptr() == made[-1]))

    hooks = [m.register_forward_pre_hook(count) for m in (layer.mlp.fc2, merger.linear_2)]
    hooks += [
        m.register_forward_hook(lambda m, a, out: made.append(out.data_ptr())) for m in (layer.mlp.fc1, merger.linear_1)
    ]
    stacks = _minicpm_stacks()
    try:
        with torch.no_grad():
            lean = bb.features_packed(stacks, pixels=True)
            lean_counts, counts[:] = counts[:], []
            ref = bb._run([bb.normalize(s) for s in stacks])  # the reference pass, here without autograd
    finally:
        for h in hooks:
            h.remove()
    assert all(torch.equal(a, r) for a, r in zip(lean, ref))
    # Block 0's MLP: the reference holds the layer's input, the residual after attention and the normed input
    # (and its GELU makes a second (N, I) buffer, alive with fc1's while it runs); the lean pass holds the
    # sequence alone and its GELU writes over fc1's output. The merger's MLP: the reference still holds the
    # layer's output and the windows' features; the lean pass only their norm, which fc1 reads.
    assert counts == [(3, False), (2, False)]
    assert lean_counts == [(1, True), (1, True)]
