"""hrperc.integrations.transformers: identity on the four LLaVA-family classes, upgrade, save and restore.

Tiny random models of full image and tile size (widths 32, 1-2 layers), an offline word-level tokenizer,
the real transformers processors; nothing is downloaded.
"""

from __future__ import annotations

import pytest
import torch

tf = pytest.importorskip("transformers")

from _hf_tiny import FAMILIES, _images, build  # noqa: E402

import hrperc  # noqa: E402
from hrperc.integrations.transformers import (  # noqa: E402
    AttachedProcessor,
    _families,
    attach,
    encoder_from_model,
    load_front_end,
    pack_images,
    save_front_end,
    unpack_images,
)


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_attach_gives_the_unmodified_model_s_logits(family):
    model, proc, texts = build(family)
    images = _images([(300, 500), (700, 400)])
    ref_inputs = proc(images=images, text=texts, return_tensors="pt", padding=True)
    single = proc(images=images[:1], text=texts[:1], return_tensors="pt")
    with torch.no_grad():
        ref, ref_single = model(**ref_inputs).logits, model(**single).logits
    enc = encoder_from_model(model, proc)
    assert enc.recipe == hrperc.integrations.transformers.FAMILIES[family]
    assert enc.backbone.model is model.model.vision_tower  # shared, not copied
    model, aproc = attach(model, proc, enc)
    inputs = aproc(images=images, text=texts, return_tensors="pt", padding=True)
    assert torch.equal(inputs["input_ids"], ref_inputs["input_ids"])  # the same token counts and layout
    assert torch.equal(inputs["attention_mask"], ref_inputs["attention_mask"])
    with torch.no_grad():
        out = model(**inputs).logits
        out_single = model(**aproc(images=images[:1], text=texts[:1], return_tensors="pt")).logits
    # the same steps as transformers' default image processor: equal to float rounding
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_single, ref_single, atol=1e-5, rtol=0)


def test_identity_holds_for_labels_and_generate():
    model, proc, texts = build("llava_next")
    images = _images([(200, 150), (480, 640)])
    ref_in = proc(images=images, text=texts, return_tensors="pt", padding=True)
    labels = ref_in["input_ids"].masked_fill(ref_in["attention_mask"] == 0, -100)
    with torch.no_grad():
        ref_loss = model(**ref_in, labels=labels).loss
    ref_gen = model.generate(**ref_in, max_new_tokens=4, do_sample=False)
    model, aproc = attach(model, proc, encoder_from_model(model, proc))
    inputs = aproc(images=images, text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        loss = model(**inputs, labels=labels).loss
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
    assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), ref_gen)  # KV cache path too


def test_processor_expands_each_image_to_the_encoder_s_count():
    model, proc, texts = build("llava_next")
    enc = encoder_from_model(model, proc, dcm=True)
    model, aproc = attach(model, proc, enc)
    assert isinstance(aproc, AttachedProcessor)
    images = _images([(90, 1000), (1000, 90)])
    inputs = aproc(images=images, text=texts, return_tensors="pt", padding=True)
    counts = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert counts == [enc.num_tokens((90, 1000)), enc.num_tokens((1000, 90))]
    assert inputs["image_sizes"].tolist() == [[90, 1000], [1000, 90]]
    with pytest.raises(ValueError, match="placeholder"):
        aproc(images=images[:1], text=texts, return_tensors="pt", padding=True)


def test_pixels_survive_packing_casting_and_devices():  # more in test_trust_transformers.py
    images = [torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8), torch.randint(0, 256, (3, 9, 2), dtype=torch.uint8)]
    px, sizes = pack_images(images)
    assert px.dtype == torch.int16 and sizes.tolist() == [[5, 7], [9, 2]]
    assert all(torch.equal(a, b) for a, b in zip(unpack_images(px), images))
    floats = [torch.rand(3, 4, 4), images[0]]
    pf, _ = pack_images(floats)
    back = unpack_images(pf.to(torch.bfloat16).float())
    assert back[0].dtype == torch.float32 and back[1].shape == (3, 5, 7)
    torch.testing.assert_close(back[1], images[0].float() / 255, atol=4e-3, rtol=0)
    with pytest.raises(ValueError, match="processor"):
        unpack_images(torch.randn(1, 3, 8, 8) * 3)  # normalized pixels from the original processor


def _trainable_only_dem(model):
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.hrperc_front_end.parameters():
        p.requires_grad_(True)


@pytest.mark.parametrize("how", ["inf_llava on llava", "dcm on llava_next"])
def test_upgrade_trains_only_the_front_end_and_generates(how):
    family = "llava" if how.startswith("inf_llava") else "llava_next"
    model, proc, texts = build(family)
    tower = model.model.vision_tower
    if family == "llava":
        ip = proc.image_processor
        enc = hrperc.create_encoder(
            "inf_llava", hrperc.backbones.HFBackbone(tower, mean=ip.image_mean, std=ip.image_std)
        )
    else:
        enc = encoder_from_model(model, proc, dcm=True)
    model, aproc = attach(model, proc, enc)
    _trainable_only_dem(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model.train()
    inputs = aproc(images=_images([(400, 600), (256, 256)]), text=texts, return_tensors="pt", padding=True)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("hrperc_front_end.front_end.dem.") for k in changed)
    model.eval()
    prompt = aproc(images=_images([(300, 300)]), text=texts[:1], return_tensors="pt")
    gen = model.generate(**prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    n = prompt["input_ids"].shape[1]
    assert gen.shape == (1, n + 3) and torch.equal(gen[:, :n], prompt["input_ids"])  # the prompt, then 3 answers


def test_a_wider_encoder_gets_a_new_projector_reported():
    model, proc, texts = build("llava")
    enc = hrperc.create_encoder("s2", hrperc.backbones.HFBackbone(model.model.vision_tower))  # 2 x 32 channels
    with pytest.warns(UserWarning, match="new mlp2x_gelu projector"):
        model, aproc = attach(model, proc, enc)
    assert model.hrperc_front_end.projector[0].in_features == 64
    with torch.no_grad():
        out = model(**aproc(images=_images([(300, 500)]), text=texts[:1], return_tensors="pt"))
    assert torch.isfinite(out.logits).all()


def test_save_and_restore_give_the_same_logits(tmp_path):
    model, proc, texts = build("llava_next")
    model, aproc = attach(model, proc, encoder_from_model(model, proc, dcm=True))
    with torch.no_grad():
        for p in model.hrperc_front_end.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # "trained" weights, not the initialization
    inputs = aproc(images=_images([(300, 500), (700, 400)]), text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = model(**inputs).logits
    model.save_pretrained(tmp_path)
    save_front_end(model, tmp_path)
    saved = set()
    from safetensors import safe_open

    for f in tmp_path.glob("model*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            saved |= set(fh.keys())
    assert saved and not any("hrperc" in k for k in saved)  # the model's own checkpoint stays the model's
    restored = tf.LlavaNextForConditionalGeneration.from_pretrained(tmp_path).eval()
    restored, rproc = load_front_end(restored, proc, tmp_path)
    with torch.no_grad():
        out = restored(
            **rproc(images=_images([(300, 500), (700, 400)]), text=texts, return_tensors="pt", padding=True)
        ).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_an_inf_llava_front_end_without_a_dem_never_gets_a_random_one(tmp_path):
    # dem=None (combine="concat") is a front end of its own: another feature layer at forward time and a
    # save/restore must keep it DEM-free, not add a fresh random DEM.
    model, proc, texts = build("llava")
    encoder = hrperc.create_encoder("inf_llava", model.model.vision_tower, dem=None, combine="concat")
    model, aproc = attach(model, proc, encoder, projector=torch.nn.Linear(encoder.token_width, 32))
    inputs = aproc(images=_images([(300, 500)]), text=texts[:1], return_tensors="pt")
    with torch.no_grad():
        ref = model(**inputs).logits
        again = model(**inputs, vision_feature_layer=-2).logits
    assert model.hrperc_front_end.dem is None
    torch.testing.assert_close(again, ref, atol=0, rtol=0)
    model.save_pretrained(tmp_path)
    save_front_end(model, tmp_path)
    restored, rproc = load_front_end(tf.LlavaForConditionalGeneration.from_pretrained(tmp_path).eval(), proc, tmp_path)
    with torch.no_grad():
        out = restored(**rproc(images=_images([(300, 500)]), text=texts[:1], return_tensors="pt")).logits
    assert restored.hrperc_front_end.dem is None
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_refusals_name_the_problem():
    model, proc, _ = build("llava")
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        encoder_from_model(torch.nn.Linear(2, 2))
    model.config.vision_feature_layer = [-2, 1]  # one block twice (a list of distinct layers is read)
    with pytest.raises(ValueError, match="vision_feature_layer"):
        encoder_from_model(model, proc)
    model.config.vision_feature_layer = -2
    model.config.vision_feature_select_strategy = "full"  # LLaVA-1.5 keeps the CLS token: 1 + 24 * 24 tokens
    assert encoder_from_model(model, proc).num_tokens((336, 336)) == 577
    model.config.vision_feature_select_strategy = "default"
    enc = encoder_from_model(model, proc)
    model, _ = attach(model, proc, enc)
    with pytest.raises(ValueError, match="already"):
        attach(model, proc, enc)
    with pytest.raises(ValueError, match="processor"):
        model.model.get_image_features(pixel_values=torch.randn(1, 3, 336, 336) * 2)


def test_several_images_in_one_text_and_a_bf16_model():
    model, proc, _ = build("llava_next")
    texts = ["<image> what is in the image <image>", "describe it <image>"]
    images = _images([(300, 500), (200, 150), (700, 400)])
    ref_in = proc(images=images, text=texts, return_tensors="pt", padding=True)
    import copy

    with torch.no_grad():
        ref = model(**ref_in).logits
        ref16 = copy.deepcopy(model).to(torch.bfloat16)(**ref_in.to(torch.bfloat16)).logits.float()
    model, aproc = attach(model, proc, encoder_from_model(model, proc))
    inputs = aproc(images=images, text=texts, return_tensors="pt", padding=True)
    assert torch.equal(inputs["input_ids"], ref_in["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, ref, atol=1e-5, rtol=0)
        model.to(torch.bfloat16)
        inputs16 = inputs.to(torch.bfloat16)  # casts float tensors only: the packed int16 pixels stay exact
        assert inputs16["pixel_values"].dtype == torch.int16
        out16 = model(**inputs16).logits.float()
    torch.testing.assert_close(out16, ref16, atol=1e-2 * max(1.0, ref16.abs().max().item()), rtol=0)


def test_onevision_refuses_multi_image_prompts_it_would_encode_differently():
    model, proc, _ = build("llava_onevision")
    model, aproc = attach(model, proc, encoder_from_model(model, proc))
    with pytest.raises(ValueError, match="several images"):
        aproc(images=_images([(100, 100), (100, 100)]), text=["<image> <image> what"], return_tensors="pt")


def test_trainer_fine_tunes_the_attached_front_end(tmp_path):
    pytest.importorskip("accelerate")
    model, proc, texts = build("llava_next")
    model, aproc = attach(model, proc, encoder_from_model(model, proc, dcm=True))
    _trainable_only_dem(model)
    rows = [{"image": img, "text": texts[i % 2]} for i, img in enumerate(_images([(300, 500), (256, 256)] * 2))]

    def collate(batch):  # the attached processor does the token expansion; labels ignore padding
        inputs = aproc(
            images=[r["image"] for r in batch], text=[r["text"] for r in batch], return_tensors="pt", padding=True
        )
        inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        return inputs

    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = tf.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=2,
        learning_rate=1e-2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = tf.Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("hrperc_front_end.front_end.dem.") for k in changed)


# --- the per-family table ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_entry_matches_the_transformers_classes(family):
    import inspect

    model, proc, _ = build(family)
    entry = _families.family_of(family)
    assert entry.model_type == model.config.model_type and entry.model_class == type(model).__name__
    params = list(inspect.signature(type(model.model).get_image_features).parameters)
    assert params[1] == "pixel_values" and (params[2] == "image_sizes") == entry.image_sizes_second
    assert hasattr(model.model, entry.newline or "image_newline") == (entry.newline is not None)
    for name in entry.image_brackets or ():
        assert isinstance(getattr(proc, name), str)  # the processor holds the token written around an image
    assert hrperc.integrations.transformers.FAMILIES[family] == entry.recipe in hrperc.list_recipes()


def test_no_module_but_the_table_names_a_family():
    import ast
    import pathlib

    names = {f.model_type for f in _families.TABLE}
    for path in pathlib.Path(_families.__file__).parent.glob("*.py"):
        if path.name == "_families.py":
            continue
        found = [
            n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant) and n.value in names
        ]
        assert not found, f"{path.name} names the families {found}: put what it decides in _families.TABLE"


def _tokens(encoder):
    with torch.no_grad():
        return encoder(_images([(40, 70)])).tokens


@pytest.mark.parametrize("setting, recipe", [(s, r) for s, rs in _families.RECIPE_SETTINGS.items() for r in rs])
def test_the_recipe_settings_table_holds_the_recipes_defaults(setting, recipe):
    model, _, _ = build("llava")
    tower = hrperc.backbones.HFBackbone(model.model.vision_tower)
    default = _families.RECIPE_SETTINGS[setting][recipe]
    other = (not default) if isinstance(default, bool) else default + 1
    sizes = [(300, 500), (100, 5000), (336, 336)]
    plain = hrperc.create_encoder(recipe, tower)
    assert _families.recipe_setting(plain, setting) == default
    counts, tokens = [plain.num_tokens(s) for s in sizes], _tokens(plain)
    same = hrperc.create_encoder(recipe, tower, **{setting: default})
    assert [same.num_tokens(s) for s in sizes] == counts and torch.equal(_tokens(same), tokens)
    changed = hrperc.create_encoder(recipe, tower, **{setting: other})  # the setting shows in counts or tokens
    assert _families.recipe_setting(changed, setting) == other
    assert [changed.num_tokens(s) for s in sizes] != counts or not torch.equal(_tokens(changed), tokens)


def test_a_new_family_is_a_table_entry(monkeypatch):
    """A model_type hrperc did not know runs once its entry is in the table (here: LLaVA-NeXT's, renamed, with
    a multi-image rule), and every module reads the entry."""
    import dataclasses

    model, proc, texts = build("llava_next")
    model.config.model_type = "hrperc_test_next"
    with pytest.raises(TypeError, match="hrperc_test_next"):
        encoder_from_model(model, proc)
    entry = dataclasses.replace(
        _families.family_of("llava_next"),
        model_type="hrperc_test_next",
        several_images="the test family takes one image per text",
    )
    monkeypatch.setitem(_families._BY_TYPE, entry.model_type, entry)
    enc = encoder_from_model(model, proc)
    assert enc.recipe == "llava_next" and enc.recipe_options["pinpoints"] == [
        tuple(p) for p in model.config.image_grid_pinpoints
    ]
    model, aproc = attach(model, proc, enc)
    images = _images([(300, 500), (200, 150)])
    ref = proc(images=images, text=texts, return_tensors="pt", padding=True)
    assert torch.equal(
        aproc(images=images, text=texts, return_tensors="pt", padding=True)["input_ids"], ref["input_ids"]
    )
    with pytest.raises(ValueError, match="the test family takes one image per text"):
        aproc(images=images, text=[f"{texts[0]} {proc.image_token}"], return_tensors="pt")


def test_a_model_state_dict_with_the_older_dem_names_loads_into_the_front_end():
    model, proc, _ = build("llava_next")
    model, _ = attach(model, proc, encoder_from_model(model, proc, dcm=True))
    new, old = "hrperc_front_end.front_end.dem.", "hrperc_front_end.dem."
    state = {(old + k[len(new) :] if k.startswith(new) else k): v + 1 for k, v in model.state_dict().items()}
    assert any(k.startswith(old) for k in state)
    model.load_state_dict(state, strict=True)  # the names written before the front end owned its DEM
    dem = model.hrperc_front_end.dem.state_dict()
    assert all(torch.equal(v, state[old + k]) for k, v in dem.items())
