"""QwenVisionTower against transformers: the packed layout of Qwen2VLImageProcessor, the tokens of
get_image_features, Qwen3-VL's deepstack, a ragged batch equal to its images alone, and the refusals.

Tiny random Qwen2-VL / Qwen2.5-VL / Qwen3-VL models built offline. Pixels are resized the way the
processor's torchvision backend resizes them: ``torchvision.transforms.v2.functional.resize`` on uint8 on
CPU (antialiased bicubic), then :meth:`QwenVisionTower.normalize`.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _messages import FIX, raises_naming
from _models import random_images
from torch import nn

tf = pytest.importorskip("transformers")
tvF = pytest.importorskip("torchvision.transforms.v2.functional")

from _qwen_tiny import build_qwen  # noqa: E402
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize  # noqa: E402

from hrperc.backbones.qwen_vl import QwenVisionTower  # noqa: E402

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
# Image sizes (h, w): a repeated size (one reshape for two views that are not neighbours), a thin one, one
# the budget shrinks and one it grows.
SIZES = [(150, 230), (97, 61), (150, 230), (40, 300), (300, 260), (20, 25)]


@pytest.fixture(scope="module", params=FAMILIES)
def built(request):
    model, ip = build_qwen(request.param)
    return request.param, model, ip


def _resized(ip, images):
    """The processor's target sizes (transformers' smart_resize) and the images resized like its
    torchvision backend: uint8 antialiased bicubic on CPU."""
    factor = ip.patch_size * ip.merge_size
    out = []
    for x in images:
        h, w = smart_resize(
            x.shape[1],
            x.shape[2],
            factor=factor,
            min_pixels=ip.size["shortest_edge"],
            max_pixels=ip.size["longest_edge"],
        )
        out.append(tvF.resize(x, [h, w], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True))
    return out


def _tower(model, ip):
    return QwenVisionTower(model.model.visual, mean=ip.image_mean, std=ip.image_std)


def _max_err(a, b) -> float:
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------- attributes


def test_attributes_are_read_off_the_tower(built):
    family, model, ip = built
    tower = QwenVisionTower(model.model.visual)
    cfg = model.config.vision_config
    assert tower.family == family
    assert (tower.patch_size, tower.merge_size, tower.temporal_patch_size) == (ip.patch_size, 2, 2)
    assert tower.factor == ip.patch_size * 2
    assert tower.hidden_size == (cfg.embed_dim if family == "qwen2_vl" else cfg.hidden_size)
    assert tower.out_size == model.config.text_config.hidden_size == 32
    assert tower.num_layers == cfg.depth
    assert tower.deepstack_layers == ((0, 1) if family == "qwen3_vl" else ())
    assert tower.window_size == (56 if family == "qwen2_5_vl" else None)
    assert (tower.dtype, tower.device) == (torch.float32, torch.device("cpu"))
    # the released checkpoints' normalization: 0.5 / 0.5 for Qwen3-VL, CLIP's (the processor class default) else
    default = tf.Qwen2VLImageProcessor()
    expected = (
        ((0.5,) * 3, (0.5,) * 3) if family == "qwen3_vl" else (tuple(default.image_mean), tuple(default.image_std))
    )
    assert tower.mean + tower.std == pytest.approx(expected[0] + expected[1])
    assert family in repr(tower)


# ------------------------------------------------------------------------------------------- pixels


def test_pack_is_the_processors_pixel_values_bit_for_bit(built):
    family, model, ip = built
    tower = _tower(model, ip)
    images = random_images(SIZES)
    ref = ip(images=images, return_tensors="pt")
    views = [tower.normalize(x) for x in _resized(ip, images)]
    pixel_values, grid_thw = tower.pack(views)
    assert grid_thw.dtype == torch.long
    assert torch.equal(grid_thw, ref["image_grid_thw"])
    assert pixel_values.shape == ref["pixel_values"].shape
    assert torch.equal(pixel_values, ref["pixel_values"])  # resize and fused normalization as the processor's: exact
    # the inverse gives the views back, and packing them again the same rows
    back = tower.unpack(ref["pixel_values"], ref["image_grid_thw"])
    assert all(torch.equal(a, b) for a, b in zip(back, views))
    assert torch.equal(tower.pack(back)[0], ref["pixel_values"])
    # one (n, 3, h, w) tensor of equal views packs like the list
    same = torch.stack([views[0], views[2]])
    assert torch.equal(tower.pack(same)[0], tower.pack([views[0], views[2]])[0])


def test_uint8_interpolate_equals_torchvisions_resize():
    """What a front end may call instead of torchvision: the same uint8 kernel on CPU, bit for bit."""
    for x in random_images([(150, 230), (97, 61), (40, 300)]):
        for size in [(112, 168), (56, 28), (84, 392)]:
            a = tvF.resize(x, list(size), interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
            b = nn.functional.interpolate(x[None], size=size, mode="bicubic", antialias=True, align_corners=False)[0]
            assert torch.equal(a, b)


def test_normalize_uint8_and_float():
    tower = QwenVisionTower(build_qwen("qwen3_vl")[0].model.visual)
    x = random_images([(32, 64)])[0]
    assert tower.normalize(x).dtype == torch.float32
    # 0.5 / 0.5: 0 -> -1, 255 -> +1
    assert (
        tower.normalize(torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 2).expand(3, 1, 2)).flatten().tolist()
        == [
            -1.0,
            1.0,
        ]
        * 3
    )
    batch = torch.stack([x, x])
    torch.testing.assert_close(tower.normalize(batch.float() / 255), tower.normalize(batch), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------- tokens


def test_tokens_equal_get_image_features(built):
    family, model, ip = built
    tower = _tower(model, ip)
    images = random_images(SIZES)
    ref_batch = ip(images=images, return_tensors="pt")
    views = [tower.normalize(x) for x in _resized(ip, images)]
    with torch.no_grad():
        ref = model.model.get_image_features(ref_batch["pixel_values"], ref_batch["image_grid_thw"])
        out = tower.encode(views, patches=True)
    assert torch.equal(out.grid_thw, ref_batch["image_grid_thw"])
    assert out.grids == [tuple(r[1:]) for r in ref_batch["image_grid_thw"].tolist()]
    assert [tuple(t.shape) for t in out.tokens] == [tuple(t.shape) for t in ref.pooler_output]
    # uint8 images in, through hrperc's resize + pack, tokens out: the processor + get_image_features, exactly
    assert all(torch.equal(a, b) for a, b in zip(out.tokens, ref.pooler_output))
    if family == "qwen3_vl":
        assert len(out.deepstack) == len(ref.deepstack_features) == 2
        for mine, theirs in zip(out.deepstack, ref.deepstack_features):
            assert all(torch.equal(a, b) for a, b in zip(mine, theirs))
    else:
        assert out.deepstack is None
    # patches: the tower's last_hidden_state per view, in merge-window order (Qwen2.5-VL's windows undone)
    last = ref.last_hidden_state
    if family == "qwen2_5_vl":
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(ref_batch["image_grid_thw"], 2, 56, 14)
        last = last.view(-1, 4, last.shape[-1])[torch.argsort(window_index)].view(last.shape)
        assert not torch.equal(last, ref.last_hidden_state)  # the windows did permute these images
    counts = [h * w for _, h, w in ref_batch["image_grid_thw"].tolist()]
    assert all(torch.equal(a, b) for a, b in zip(out.patches, last.split(counts)))
    # raster: the (gh, gw) patch map, whose m x m blocks flattened are the merge-window rows
    grid = tower.raster(out.patches[0], out.grids[0])
    gh, gw = out.grids[0]
    assert grid.shape == (tower.hidden_size, gh, gw)
    assert torch.equal(grid[:, :2, :2].permute(1, 2, 0).reshape(4, -1), out.patches[0][:4])
    assert torch.equal(grid[:, :2, 2:4].permute(1, 2, 0).reshape(4, -1), out.patches[0][4:8])


def test_tokens_in_the_towers_dtype():
    model, ip = build_qwen("qwen2_5_vl")
    model = copy.deepcopy(model).to(torch.bfloat16)
    tower = _tower(model, ip)
    images = random_images(SIZES[:3])
    ref_batch = ip(images=images, return_tensors="pt")
    with torch.no_grad():
        ref = model.model.get_image_features(ref_batch["pixel_values"], ref_batch["image_grid_thw"])
        out = tower([tower.normalize(x) for x in _resized(ip, images)])  # float32 views, cast by the tower
    assert tower.dtype == torch.bfloat16
    assert all(t.dtype == torch.bfloat16 for t in out.tokens)
    assert all(torch.equal(a, b) for a, b in zip(out.tokens, ref.pooler_output))


def test_ragged_batch_equals_each_view_alone(built):
    family, model, ip = built
    tower = _tower(model, ip)
    f = tower.factor
    g = torch.Generator().manual_seed(1)
    shapes = [(4 * f, 6 * f), (2 * f, 2 * f), (4 * f, 6 * f), (6 * f, 2 * f), (2 * f, 2 * f)]  # 5 views, 3 sizes
    views = [torch.randn(3, h, w, generator=g) for h, w in shapes]
    with torch.no_grad():
        together = tower(views, patches=True)
        alone = [tower([v], patches=True) for v in views]
        changed = tower([views[0] + 1.0, *views[1:]])
    assert _max_err(together.tokens, [a.tokens[0] for a in alone]) <= 1e-5
    assert _max_err(together.patches, [a.patches[0] for a in alone]) <= 1e-5
    if family == "qwen3_vl":
        for level in range(2):
            assert _max_err(together.deepstack[level], [a.deepstack[level][0] for a in alone]) <= 1e-5
    # no image attends to another: changing view 0 changes its tokens only
    assert not torch.allclose(changed.tokens[0], together.tokens[0])
    assert _max_err(changed.tokens[1:], together.tokens[1:]) <= 1e-5


# ------------------------------------------------------------------------------------------- refusals


def test_refusals():
    model, _ = build_qwen("qwen2_vl")
    with raises_naming(TypeError, FIX, "QwenVisionTower", "tower=Linear", "model.model.visual", "Qwen3VLVisionModel"):
        QwenVisionTower(nn.Linear(2, 2))
    with raises_naming(TypeError, FIX, "tower=Qwen2VLForConditionalGeneration", ".visual", "Pass"):
        QwenVisionTower(model)
    with raises_naming(ValueError, FIX, "mean=(0.5, 0.5)", "three", "Pass"):
        QwenVisionTower(model.model.visual, mean=(0.5, 0.5))
    with raises_naming(ValueError, FIX, "std=", "> 0", "Pass"):
        QwenVisionTower(model.model.visual, std=(0.5, 0.0, 0.5))
    tower = QwenVisionTower(model.model.visual)
    good = torch.zeros(3, 56, 28)
    with raises_naming(ValueError, FIX, "QwenVisionTower.pack", "views=[]", "pass at least one"):
        tower.pack([])
    with raises_naming(ValueError, FIX, "QwenVisionTower.pack", "views[1]", "50x56", "28", "Resize", "56x56"):
        tower.pack([good, torch.zeros(3, 50, 56)])
    with raises_naming(ValueError, FIX, "QwenVisionTower.forward", "views[0]", "14x28", "28"):
        tower([torch.zeros(3, 14, 28)])
    with raises_naming(ValueError, FIX, "views[0]", "(4, 56, 56)", "RGB"):
        tower.pack([torch.zeros(4, 56, 56)])
    with raises_naming(TypeError, FIX, "views[0]", "uint8", "normalize"):
        tower.pack([torch.zeros(3, 56, 56, dtype=torch.uint8)])
    with raises_naming(TypeError, FIX, "views=", "list"):
        tower.pack("image.png")
    with raises_naming(ValueError, FIX, "QwenVisionTower.normalize", "(1, 56, 56)", "RGB"):
        tower.normalize(torch.zeros(1, 56, 56, dtype=torch.uint8))
    with raises_naming(TypeError, FIX, "QwenVisionTower.normalize", "int64", "uint8"):
        tower.normalize(torch.zeros(3, 56, 56, dtype=torch.long))
    pixel_values, grid_thw = tower.pack([good])
    with raises_naming(
        ValueError, FIX, "QwenVisionTower.unpack", "pixel_values", "(1, 1176)", "(8, 1176)", "image_grid_thw"
    ):
        tower.unpack(pixel_values[:1], grid_thw)
    with raises_naming(ValueError, FIX, "QwenVisionTower.unpack", "grid_thw=[[2, 4, 2]]", "still images"):
        tower.unpack(pixel_values, torch.tensor([[2, 4, 2]]))
    with raises_naming(ValueError, FIX, "QwenVisionTower.raster", "(8, 1176)", "grid=(4, 4)"):
        tower.raster(pixel_values, (4, 4))
