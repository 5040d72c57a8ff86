"""The INF-LLaVA example (examples/inf_llava): the Llava model with hrperc's front end, labels, generation,
training stages, resume, DDP/FSDP."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _messages import raises_naming
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from inf_llava import (  # noqa: E402
    IGNORE_INDEX,
    build_inf_llava,
    build_tokenizer,
    encoder_of,
    get_config,
    llm_parts,
    model_num_tokens,
    set_stage,
    token_loss_sum,
)
from inf_llava import train as train_mod  # noqa: E402
from inf_llava.data import GlyphTask, collate, conversation_ids, encode_prompts, expand_image_tokens  # noqa: E402
from inf_llava.generate import answer, generate_ids  # noqa: E402

TRAIN = ROOT / "examples" / "inf_llava" / "train.py"
# Parameter-name prefixes of the parts of the Llava model.
TOWER, DEM, PROJECTOR = "model.vision_tower.", "hrperc_front_end.front_end.dem.", "model.multi_modal_projector."
LLM = ("model.language_model.", "lm_head.")


def _train(argv, **kwargs):
    """``train.train`` on the CPU, whatever the host has (the comparisons here are CPU-exact)."""
    return train_mod.train([*argv, "--device", "cpu"], **kwargs)


pytestmark = pytest.mark.usefixtures("one_thread")  # the tiny model's ops gain nothing from threads


@pytest.fixture(scope="module")
def cfg():
    return get_config("tiny")


@pytest.fixture(scope="module")
def tok(cfg):
    return build_tokenizer(cfg)


@pytest.fixture(scope="module")
def model(cfg, tok):
    return build_inf_llava(cfg, tok).eval()


def _prompt(cfg, question, n_images=1):
    images = " ".join([cfg.image_token] * n_images)
    return cfg.prompt_template.format(question=f"{images} {question}")


# ---- tokenizer --------------------------------------------------------------------------------------------------
def test_offline_tokenizer_has_single_image_token_and_round_trips(cfg, tok):
    ids = tok(_prompt(cfg, "where is the red cross ?")).input_ids
    image_id = cfg.image_token_id(tok)
    assert image_id >= 0 and ids.count(image_id) == 1
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True).split() == "USER : where is the red cross ? ASSISTANT :".split()
    assert tok("a zebra").input_ids[-1] == tok.unk_token_id


# ---- data -------------------------------------------------------------------------------------------------------
def test_glyph_task_is_deterministic_and_answers_match_the_picture(cfg, tok, model):
    from inf_llava.data import COLOURS, ROWS

    task = GlyphTask(cfg.image_size, seed=3)
    a, b = task.sample(11), task.sample(11)
    assert torch.equal(a.image, b.image) and a.answer == b.answer
    assert not torch.equal(task.sample(12).image, a.image)
    for i in range(20):
        s = task.sample(i)
        # The glyph's colour is present exactly in the named 3 x 3 region and nowhere else.
        hit = (s.image - torch.tensor(COLOURS[s.colour])[:, None, None]).abs().amax(0) < 1e-6
        ys, xs = hit.nonzero(as_tuple=True)
        H, W = cfg.image_size
        assert len(ys) > 0
        assert set((ys * 3 // H).tolist()) == {s.row} and set((xs * 3 // W).tolist()) == {s.column}
        assert s.colour in s.answer or ROWS[s.row] in s.answer
    batch = collate(task.batch(range(4)), tok, cfg, model_num_tokens(model))
    for b in range(4):
        n = int(batch["attention_mask"][b].sum())
        lab = batch["labels"][b, :n]
        answer_ids = batch["input_ids"][b, :n][lab != IGNORE_INDEX]
        assert tok.decode(answer_ids, skip_special_tokens=True) == task.sample(b).answer
        assert answer_ids[-1] == tok.eos_token_id
        assert (batch["labels"][b, n:] == IGNORE_INDEX).all()


# ---- the model: transformers' Llava, hrperc's image path -------------------------------------------------------
def test_model_is_llava_whose_image_path_is_the_hrperc_encoder(cfg, tok, model):
    """A LlavaForConditionalGeneration (CLIP tower, LLaMA text model); its get_image_features is the attached
    inf_llava encoder through the model's projector, and collate puts num_tokens placeholders per image."""
    from transformers import CLIPVisionModel, LlamaModel, LlavaForConditionalGeneration

    import hrperc
    from hrperc.integrations.transformers import pack_images

    assert type(model) is LlavaForConditionalGeneration
    assert isinstance(model.model.vision_tower, CLIPVisionModel)
    assert isinstance(model.model.language_model, LlamaModel)
    enc = encoder_of(model)
    assert isinstance(enc, hrperc.HighResEncoder) and enc.recipe == "inf_llava"
    tower_params = {id(p) for p in model.model.vision_tower.parameters()}
    assert tower_params and {id(p) for p in enc.backbone.parameters()} <= tower_params  # the model's tower, shared
    assert model.hrperc_front_end.dem is enc.dem and model.config.image_token_id == cfg.image_token_id(tok)
    assert model.config.vision_feature_layer == -2 and model.config.projector_hidden_act == "gelu"
    g = torch.Generator().manual_seed(5)
    images = [torch.rand(3, *cfg.image_size, generator=g), torch.rand(3, 70, 120, generator=g)]  # ragged
    pixel_values, sizes = pack_images(images)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pixel_values, image_sizes=sizes).pooler_output
        for b, image in enumerate(images):
            ref = enc([image], project=model.model.multi_modal_projector)
            n = enc.num_tokens(tuple(image.shape[-2:]))
            assert feats[b].shape == (n, 64) and n == 16
            torch.testing.assert_close(feats[b], ref.tokens[0, :n], atol=1e-6, rtol=1e-6)
    samples = GlyphTask(cfg.image_size).batch(range(2))
    samples[1].image = images[1]
    batch = collate(samples, tok, cfg, model_num_tokens(model))
    placeholders = (batch["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert placeholders == [enc.num_tokens(tuple(s.image.shape[-2:])) for s in samples]
    assert (batch["labels"][batch["input_ids"] == model.config.image_token_id] == IGNORE_INDEX).all()
    assert torch.equal(batch["image_sizes"], torch.tensor([[96, 96], [70, 120]]))
    # The placeholders are one contiguous run per image, where "<image>" was in the text.
    ids, _ = conversation_ids(tok, cfg, samples[0].turns)
    k = ids.index(model.config.image_token_id)
    row = batch["input_ids"][0].tolist()
    assert row[:k] == ids[:k] and row[k : k + 16] == [model.config.image_token_id] * 16 and row[k + 16] == ids[k + 1]
    with pytest.raises(ValueError, match=r"1 image placeholder\(s\).*2 image\(s\)"):
        expand_image_tokens(ids, ids, model.config.image_token_id, [16, 16])


def _multi_image_batch(cfg, tok, model, specs, images):
    """Right-padded ``input_ids`` / ``attention_mask`` / ``labels`` of ``(question, n_images, answer)`` specs."""
    image_id, num_tokens = cfg.image_token_id(tok), model_num_tokens(model)
    rows, labs, start = [], [], 0
    for q, k, a in specs:
        ids, lab = conversation_ids(tok, cfg, [(" ".join([cfg.image_token] * k) + " " + q, a)])
        counts = [num_tokens(tuple(im.shape[-2:])) for im in images[start : start + k]]
        ids, lab = expand_image_tokens(ids, lab, image_id, counts)
        rows.append(ids)
        labs.append(lab)
        start += k
    L = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (L - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows])
    labels = torch.tensor([lab + [IGNORE_INDEX] * (L - len(lab)) for lab in labs])
    return ids, mask, labels, [len(r) for r in rows]


def test_padded_multi_image_batch_equals_samples_alone(cfg, tok, model):
    """Loss and logits of each sample in a padded batch (several images per sample) equal those of the
    sample run alone."""
    from hrperc.integrations.transformers import pack_images

    g = torch.Generator().manual_seed(1)
    specs = [
        ("what is in the image ?", 1, "a red cross"),
        ("where is the blue bar ?", 2, "top left"),
        ("describe the image .", 3, "a green ring at the middle center"),
    ]
    images = list(torch.rand(6, 3, *cfg.image_size, generator=g))
    ids, mask, labels, lengths = _multi_image_batch(cfg, tok, model, specs, images)
    px, sizes = pack_images(images)
    with torch.no_grad():
        full_batch = model(input_ids=ids, attention_mask=mask, pixel_values=px, image_sizes=sizes).logits
        batch_sum, batch_n = token_loss_sum(full_batch, labels)
        alone_sum, alone_n, start = 0.0, 0, 0
        for b, (_, k, _) in enumerate(specs):
            n = lengths[b]
            px_b, sizes_b = pack_images(images[start : start + k])
            one = model(
                input_ids=ids[b : b + 1, :n], attention_mask=mask[b : b + 1, :n], pixel_values=px_b, image_sizes=sizes_b
            ).logits
            torch.testing.assert_close(full_batch[b, :n], one[0], atol=1e-5, rtol=1e-5)
            s_b, n_b = token_loss_sum(one, labels[b : b + 1, :n])
            alone_sum += float(s_b)
            alone_n += int(n_b)
            start += k
    n_answer = sum(len(tok(a, add_special_tokens=False).input_ids) + 1 for _, _, a in specs)  # + EOS
    assert int(batch_n) == alone_n == n_answer
    assert abs(float(batch_sum) - alone_sum) < 1e-4 * max(1.0, alone_sum)


# ---- generation -------------------------------------------------------------------------------------------------
def test_generate_with_kv_cache_matches_full_recompute(cfg, tok, model):
    """transformers' generate (KV cache, left-padded batch) == greedy re-running of the whole sequence."""
    g = torch.Generator().manual_seed(2)
    questions = ["what is in the image ?", "where is the yellow square at the top ?"]
    images = torch.rand(2, 3, *cfg.image_size, generator=g)
    inputs = encode_prompts(tok, cfg, questions, images, model_num_tokens(model))
    attention_mask = inputs["attention_mask"]
    assert (attention_mask[0] == 0).any() and (attention_mask[:, -1] == 1).all()  # left-padded, lengths differ
    steps = 6
    with torch.no_grad():
        cached = generate_ids(model, tok, cfg, images, questions, max_new_tokens=steps, min_new_tokens=steps)
        assert cached.shape == (2, steps)
        for b in range(2):
            # Uncached greedy decoding of sample b alone: re-run the whole sequence each step.
            n = int(attention_mask[b].sum())
            ids = inputs["input_ids"][b : b + 1, -n:]
            px = inputs["pixel_values"][b : b + 1]
            for _ in range(steps):
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px).logits[0, -1]
                logits[tok.eos_token_id] = -float("inf")  # min_new_tokens
                ids = torch.cat([ids, logits.argmax().view(1, 1)], 1)
            assert ids[0, -steps:].tolist() == cached[b].tolist()


def test_answer_helper_returns_text_per_question(cfg, tok, model):
    texts = answer(
        model, tok, cfg, torch.zeros(2, 3, *cfg.image_size), ["what is in the image ?"] * 2, max_new_tokens=3
    )
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    # Images of other sizes: each gets its own token count (the encoder fits it to the canvas).
    texts = answer(model, tok, cfg, [torch.rand(3, 50, 140), torch.rand(3, 96, 96)], ["where ?"] * 2, max_new_tokens=2)
    assert len(texts) == 2


def test_eos_list_stops_at_the_end_of_turn_token(cfg, tok, monkeypatch):
    """LLaMA-3 ends a turn with <|eot_id|> while its EOS is <|end_of_text|>: both must stop generation."""
    from inf_llava.generate import eos_token_ids

    assert eos_token_ids(tok, cfg) == [tok.eos_token_id]  # tiny: no end-of-turn token
    tok3 = build_tokenizer(cfg)
    tok3.add_tokens(["<|eot_id|>"], special_tokens=True)
    eot = tok3.convert_tokens_to_ids("<|eot_id|>")
    assert eot == len(tok3) - 1 != tok3.unk_token_id
    assert eos_token_ids(tok3, cfg) == [tok3.eos_token_id, eot]
    # The llama3-8b template's answer suffix names the same token: no duplicate.
    assert eos_token_ids(tok3, cfg.replace(answer_suffix="<|eot_id|>")) == [tok3.eos_token_id, eot]
    m = build_inf_llava(cfg, tok3).eval()
    image = torch.rand(1, 3, *cfg.image_size)
    only_eot = [i for i in range(len(tok3)) if i != eot]  # force <|eot_id|> at every step
    kw = {"max_new_tokens": 4, "suppress_tokens": only_eot}
    q = ["what is in the image ?"]
    assert generate_ids(m, tok3, cfg, image, q, eos_token_id=tok3.eos_token_id, **kw).tolist() == [[eot] * 4]
    assert generate_ids(m, tok3, cfg, image, q, **kw).tolist() == [[eot]]  # the list, by default
    assert generate_ids(m, tok3, cfg, image, q, eos_token_id=eos_token_ids(tok3, cfg), **kw).tolist() == [[eot]]
    # answer() passes the list to model.generate by default.
    seen = {}
    generate = m.generate
    monkeypatch.setattr(m, "generate", lambda *a, **k: seen.update(k) or generate(*a, **k))
    answer(m, tok3, cfg, image, ["what is in the image ?"], max_new_tokens=2)
    assert seen["eos_token_id"] == [tok3.eos_token_id, eot]
    assert {"input_ids", "attention_mask", "pixel_values", "image_sizes"} <= set(seen)


# ---- training ---------------------------------------------------------------------------------------------------
def _frozen_and_trained(cfg, tok, ckpt_dir, stage):
    """Compare a freshly built model with one whose trained parts come from ``ckpt_dir``."""
    fresh = build_inf_llava(cfg, tok)
    trained = load_file(Path(ckpt_dir) / "model.safetensors")
    expected = set(set_stage(fresh, stage))
    return fresh, trained, expected


def _check_freezing(trained_model, cfg, tok, stage, llm_dtype=None) -> set[str]:
    """Every frozen tensor of the model ``train`` returns (CLIP; in stage 1 also the LLM; buffers too) is
    bit-identical, dtype included, to a fresh build from the same seed, and every trained one moved.

    Returns the names of the frozen tensors checked."""
    fresh = build_inf_llava(cfg, tok, llm_dtype=llm_dtype)
    trainable = set(set_stage(fresh, stage))
    ref, got = fresh.state_dict(), trained_model.state_dict()
    assert set(got) == set(ref)
    assert {n for n, p in trained_model.named_parameters() if p.requires_grad} == trainable
    frozen = set(ref) - trainable
    assert any(n.startswith(TOWER) for n in frozen)
    assert any(n.startswith(LLM) for n in frozen) == (stage == 1)
    assert not any(n.startswith((DEM, PROJECTOR)) for n in frozen)
    changed = sorted(n for n in frozen if got[n].dtype != ref[n].dtype or not torch.equal(got[n].cpu(), ref[n]))
    assert not changed, f"frozen tensors changed in stage {stage}: {changed[:5]} ({len(changed)} in all)"
    still = sorted(n for n in trainable if torch.equal(got[n].cpu().to(ref[n].dtype), ref[n]))
    assert not still, f"trained parameters did not move in stage {stage}: {still[:5]} ({len(still)} in all)"
    return frozen


def test_stage1_trains_dem_and_projector_only(tmp_path, cfg, tok):
    out = tmp_path / "s1"
    s = _train(
        [
            "--stage",
            "1",
            "--steps",
            "25",
            "--batch-size",
            "8",
            "--lr",
            "3e-3",
            "--no-progress",
            "--out",
            str(out),
            "--dump-params",
            str(tmp_path / "p"),
        ],
        return_model=True,
    )
    fresh, trained, expected = _frozen_and_trained(cfg, tok, s["checkpoint"], 1)
    assert set(trained) == expected == set(s["trainable"])
    assert all(n.startswith((DEM, PROJECTOR)) for n in expected)
    assert any(n.startswith(DEM) for n in expected) and any(n.startswith(PROJECTOR) for n in expected)
    # Trained parts moved; frozen parts (ViT, LLM) are bit-identical to the seeded build.
    assert all(not torch.equal(trained[n], fresh.state_dict()[n]) for n in expected)
    frozen = _check_freezing(s["model"], cfg, tok, 1)
    assert len(frozen) > len(expected)  # the whole ViT and LLM
    # The checkpoint holds exactly the trained model's final values.
    final_sd = s["model"].state_dict()
    assert all(torch.equal(trained[n], final_sd[n]) for n in expected)
    final = load_file(tmp_path / "p" / "rank0.safetensors")
    assert set(final) == expected
    losses = s["losses"]
    assert sum(losses[-5:]) / 5 < losses[0] - 0.05


def test_stage2_loss_falls_and_vit_stays_frozen(tmp_path, cfg, tok):
    s = _train(
        [
            "--stage",
            "2",
            "--steps",
            "40",
            "--batch-size",
            "8",
            "--lr",
            "1e-3",
            "--no-progress",
            "--out",
            str(tmp_path),
        ],
        return_model=True,
    )
    fresh, trained, expected = _frozen_and_trained(cfg, tok, s["checkpoint"], 2)
    assert set(trained) == expected
    assert any(n.startswith(LLM) for n in expected) and not any(n.startswith(TOWER) for n in expected)
    losses = s["losses"]
    assert sum(losses[-5:]) / 5 < 0.75 * losses[0]
    # The frozen ViT of the trained model is untouched (compared with the seeded build); the DEM,
    # projector and LLM all moved, and the checkpoint holds their final values.
    frozen = _check_freezing(s["model"], cfg, tok, 2)
    assert all(n.startswith(TOWER) for n in frozen)
    final_sd = s["model"].state_dict()
    assert all(torch.equal(trained[n], final_sd[n]) for n in expected)


@pytest.mark.parametrize("leak", ["llm", "vit"])
def test_freezing_check_catches_broken_freezing(tmp_path, cfg, tok, monkeypatch, leak):
    """The frozen-parameter check above can fail: with the LLM (or the ViT) left trainable in stage 1,
    it does, both on the requires_grad flags and on the weights themselves."""

    def leaky(model, stage):
        set_stage(model, stage)
        if leak == "llm":
            for part in llm_parts(model):
                part.requires_grad_(True)  # the bug: stage 1 forgets to freeze the LLM
        else:
            model.model.vision_tower.requires_grad_(True)  # the bug: the ViT runs with autograd and trains
            encoder_of(model).train_backbone = True
        return [n for n, p in model.named_parameters() if p.requires_grad]

    monkeypatch.setattr(train_mod, "set_stage", leaky)
    s = _train(
        ["--stage", "1", "--steps", "1", "--warmup-ratio", "0", "--batch-size", "2", "--no-progress"]
        + ["--out", str(tmp_path)],
        return_model=True,
    )
    monkeypatch.setattr(train_mod, "set_stage", set_stage)
    m = s["model"]
    with pytest.raises(AssertionError):
        _check_freezing(m, cfg, tok, 1)
    # Even with the flags put back, the weights that moved are caught.
    for part in llm_parts(m) if leak == "llm" else [m.model.vision_tower]:
        part.requires_grad_(False)
    with pytest.raises(AssertionError, match="frozen tensors changed"):
        _check_freezing(m, cfg, tok, 1)


@pytest.mark.parametrize("stage", [1, 2])
def test_bf16_two_steps(tmp_path, cfg, tok, stage):
    """``--precision bf16``: finite losses; the LLM is bf16 when frozen (stage 1), fp32 master weights when
    trained (stage 2); trained parts stay fp32; frozen parts equal a fresh build of the same dtype."""
    s = _train(
        ["--stage", str(stage), "--steps", "2", "--batch-size", "2", "--lr", "1e-3", "--precision", "bf16"]
        + ["--no-progress", "--out", str(tmp_path)],
        return_model=True,
    )
    assert len(s["losses"]) == 2 and all(torch.isfinite(torch.tensor(s["losses"])))
    m = s["model"]
    llm_dtype = torch.bfloat16 if stage == 1 else torch.float32
    assert {p.dtype for part in llm_parts(m) for p in part.parameters()} == {llm_dtype}
    assert {p.dtype for p in m.model.vision_tower.parameters()} == {torch.float32}
    assert {p.dtype for p in m.parameters() if p.requires_grad} == {torch.float32}
    _check_freezing(m, cfg, tok, stage, llm_dtype=llm_dtype)
    saved = load_file(Path(s["checkpoint"]) / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}


def test_resume_continues_bit_exactly(tmp_path):
    common = ["--stage", "2", "--batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-3", "--no-progress"]
    straight = _train(common + ["--steps", "4", "--out", str(tmp_path / "a")])
    _train(common + ["--steps", "4", "--save-every", "2", "--out", str(tmp_path / "b")])
    # Drop the final checkpoint of run b and resume from step 2.
    import shutil

    shutil.rmtree(tmp_path / "b" / "checkpoint-4")
    resumed = _train(common + ["--steps", "4", "--resume", "auto", "--out", str(tmp_path / "b")])
    assert resumed["start_step"] == 2 and resumed["losses"] == straight["losses"]
    for f in ("model.safetensors", "optimizer.safetensors"):
        a = load_file(tmp_path / "a" / "checkpoint-4" / f)
        b = load_file(tmp_path / "b" / "checkpoint-4" / f)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), f
    meta = json.loads((tmp_path / "b" / "checkpoint-4" / "trainer_state.json").read_text())
    assert meta["step"] == 4 and meta["scheduler"]["last_epoch"] == 4


def test_checkpoint_writes_gathered_tensors_without_copying_them(tmp_path):
    """save_checkpoint does not clone the gathered state (for the 8B model that doubled rank 0's host
    memory): contiguous tensors are written as they are; only non-contiguous or storage-sharing ones copy."""
    from inf_llava.checkpoint import _writable

    a, b = torch.randn(4, 3), torch.randn(3, 4)
    shared = a.view(3, 4)
    out = _writable({"a": a, "b": b, "bt": b.t(), "shared": shared})
    assert out["a"].data_ptr() == a.data_ptr() and out["b"].data_ptr() == b.data_ptr()
    assert out["bt"].is_contiguous() and torch.equal(out["bt"], b.t())
    assert out["shared"].data_ptr() != a.data_ptr() and torch.equal(out["shared"], shared)
    from safetensors.torch import save_file

    save_file(out, tmp_path / "x.safetensors")  # safetensors accepts the result
    back = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(back[k], out[k]) for k in out)


def test_resume_with_other_stage_is_refused(tmp_path):
    _train(["--stage", "1", "--steps", "1", "--batch-size", "2", "--no-progress", "--out", str(tmp_path)])
    checkpoint = tmp_path / "checkpoint-1" / "model.safetensors"
    with raises_naming(ValueError, str(checkpoint), "21", "'lm_head.weight'", "--stage", "--init-from"):
        _train(
            [
                "--stage",
                "2",
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--no-progress",
                "--out",
                str(tmp_path),
                "--resume",
                "auto",
            ]
        )


# ---- distributed ------------------------------------------------------------------------------------------------
# Two processes cost ~15 s each on 2 cores: DDP runs in the default suite, FSDP with the slow tests.
@pytest.mark.parametrize("mode", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_two_process_run_matches_single_process(tmp_path, mode):
    """2 processes x 1 micro-batch == 1 process x 2 micro-batches (same global batch), step for step.

    The 2-process run resumes from the 1-process run's step-1 checkpoint (so checkpoints move between
    launch modes), and its checkpoints are compared with the 1-process ones."""
    common = ["--stage", "2", "--steps", "3", "--batch-size", "8", "--lr", "1e-3", "--no-progress"]
    single = _train(common + ["--micro-batch-size", "4", "--save-every", "1", "--out", str(tmp_path / "one")])
    # CPU and gloo explicitly, GPUs hidden: the same test on a GPU host (even one with a single GPU).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        str(TRAIN),
        *common,
        "--dist",
        mode,
        "--device",
        "cpu",
        "--dist-backend",
        "gloo",
        "--out",
        str(tmp_path / mode),
        "--summary-json",
        str(tmp_path / "s.json"),
        "--dump-params",
        str(tmp_path / "ranks"),
        "--resume",
        str(tmp_path / "one" / "checkpoint-1"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    multi = json.loads((tmp_path / "s.json").read_text())
    assert multi["world_size"] == 2 and multi["start_step"] == 1
    torch.testing.assert_close(torch.tensor(multi["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=1e-6)
    one = load_file(Path(single["checkpoint"]) / "model.safetensors")
    two = load_file(Path(multi["checkpoint"]) / "model.safetensors")
    assert set(one) == set(two)
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)
    opt_one = load_file(Path(single["checkpoint"]) / "optimizer.safetensors")
    opt_two = load_file(Path(multi["checkpoint"]) / "optimizer.safetensors")
    assert set(opt_one) == set(opt_two) and any(k.endswith("/exp_avg_sq") for k in opt_one)
    for k in opt_one:
        torch.testing.assert_close(opt_two[k], opt_one[k], rtol=1e-3, atol=1e-9)
    r0 = load_file(tmp_path / "ranks" / "rank0.safetensors")
    r1 = load_file(tmp_path / "ranks" / "rank1.safetensors")
    for k in two:
        if mode == "ddp":  # replicas: bit-identical, and equal to the saved checkpoint
            assert torch.equal(r0[k], r1[k]) and torch.equal(r0[k], two[k]), k
        else:  # FSDP shards dim 0 over the ranks: the shards put together are the saved full parameter
            assert torch.equal(torch.cat([r0[k], r1[k]])[: two[k].shape[0]], two[k]), k


def test_device_and_backend_choice():
    """auto: GPUs + nccl only with a GPU per process on the node, else CPU + gloo (with a note on a GPU host)."""
    choose = train_mod.choose_device_backend
    assert choose("auto", "auto", n_gpus=2, local_world=2, distributed=True) == ("cuda", "nccl", None)
    dev, backend, note = choose("auto", "auto", n_gpus=1, local_world=2, distributed=True)
    assert (dev, backend) == ("cpu", "gloo") and "2 processes" in note and "1 visible GPU" in note
    assert choose("auto", "auto", n_gpus=0, local_world=2, distributed=True) == ("cpu", "gloo", None)
    assert choose("auto", "auto", n_gpus=1, local_world=1, distributed=False) == ("cuda", None, None)
    assert choose("cpu", "auto", n_gpus=8, local_world=2, distributed=True) == ("cpu", "gloo", None)
    assert choose("cuda", "gloo", n_gpus=2, local_world=2, distributed=True) == ("cuda", "gloo", None)
    with raises_naming(ValueError, "--device cuda", "2 processes", "1 GPU", "--device cpu"):
        choose("cuda", "auto", n_gpus=1, local_world=2, distributed=True)
    with raises_naming(ValueError, "2 processes", "1 GPU", "--device cpu"):
        choose("auto", "nccl", n_gpus=1, local_world=2, distributed=True)
    with raises_naming(ValueError, "--dist-backend nccl", "--dist-backend gloo", "--device cpu"):
        choose("cpu", "nccl", n_gpus=2, local_world=2, distributed=True)
    with raises_naming(ValueError, "--device cuda", "--device cpu"):
        choose("cuda", "auto", n_gpus=0, local_world=1, distributed=False)


# ---- the llama3-8b path, at toy sizes ---------------------------------------------------------------------------
def test_llama3_config_needs_local_dirs(monkeypatch):
    for var in ("INF_LLAVA_LLM_DIR", "INF_LLAVA_CLIP_DIR", "INF_LLAVA_WEIGHTS"):
        monkeypatch.delenv(var, raising=False)
    with raises_naming(ValueError, "INF_LLAVA_LLM_DIR", "llm_dir=None", "--llm-dir"):
        get_config("llama3-8b")


def test_pretrained_path_loads_local_dirs_and_released_weights(tmp_path, cfg):
    """llama3-8b's loading path with toy local directories: HF CLIP dir, LLaMA dir + tokenizer, released
    spatial_embed/mm_projector weights (into the DEM and Llava's linear_1 / linear_2); a tokenizer without an
    image token (LLaMA-3's) uses its first reserved special token, and one with neither is refused."""
    from inf_llava import LLAMA3_IMAGE_TOKEN
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    import hrperc

    tok = build_tokenizer(cfg)
    tok.add_tokens([LLAMA3_IMAGE_TOKEN], special_tokens=True)  # as in LLaMA-3's vocabulary
    reserved = tok.convert_tokens_to_ids(LLAMA3_IMAGE_TOKEN)
    clip_dir, llm_dir = tmp_path / "clip", tmp_path / "llm"
    clip = CLIPVisionModel(
        CLIPVisionConfig(
            image_size=28,
            patch_size=14,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
        )
    )
    clip.save_pretrained(clip_dir)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=tok.pad_token_id,
        )
    )
    llama.save_pretrained(llm_dir)
    tok.save_pretrained(llm_dir)
    dem = hrperc.DualPerspectiveEnhancement(32, heads=8)
    proj = hrperc.modules.build_projector("mlp2x_gelu", 32, 48)
    released = {f"model.spatial_embed.{k}": v for k, v in hrperc.pretrained.inf_llava.released_state_dict(dem).items()}
    released |= {f"model.mm_projector.{k}": v for k, v in proj.state_dict().items()}
    released["model.layers.0.other"] = torch.zeros(1)  # ignored
    save_file({k: v.contiguous() for k, v in released.items()}, tmp_path / "inf_llava.safetensors")

    real = get_config(
        "llama3-8b",
        llm_dir=str(llm_dir),
        clip_dir=str(clip_dir),
        weights=str(tmp_path / "inf_llava.safetensors"),
    )
    with raises_naming(ValueError, str(llm_dir), "'hidden_size': (48, 4096)", "--llm-dir"):
        build_inf_llava(real, build_tokenizer(real))
    toy = real.replace(
        name="llama3-toy",
        image_token="<im_patch>",  # not in the vocabulary, like <image> in LLaMA-3's
        prompt_template="USER : {question} ASSISTANT :",
        answer_suffix="",
    )
    toy_tok = build_tokenizer(toy)
    m = build_inf_llava(toy, toy_tok, llm_dtype=torch.float32).eval()
    assert m.config.image_token_id == reserved == len(tok) - 1
    # The pretrained parts are the directories' weights; the released ones are in the DEM and the projector.
    tower_sd, clip_sd = m.model.vision_tower.state_dict(), clip.state_dict()
    assert set(tower_sd) == set(clip_sd) and all(torch.equal(tower_sd[k], clip_sd[k]) for k in clip_sd)
    assert torch.equal(m.model.language_model.layers[1].mlp.up_proj.weight, llama.model.layers[1].mlp.up_proj.weight)
    assert torch.equal(m.lm_head.weight, llama.lm_head.weight)
    assert torch.equal(m.hrperc_front_end.dem.attention.linears[0].weight, dem.attention.linears[0].weight)
    assert torch.equal(m.model.multi_modal_projector.linear_1.weight, proj[0].weight)
    assert torch.equal(m.model.multi_modal_projector.linear_2.bias, proj[2].bias)
    enc = encoder_of(m)
    assert enc.num_tokens((84, 84)) == 4 and enc.backbone.hidden_size == 32
    ids, labels = conversation_ids(toy_tok, toy, [("what is in the image ?", "a red cross")])
    assert ids.count(reserved) == 1 and ids[:4] == [toy_tok.bos_token_id, 5, 7, reserved]  # <s> USER : <image> ...
    batch = collate([GlyphTask((84, 84), glyph_size=5).sample(0)], toy_tok, toy, model_num_tokens(m))
    assert int((batch["input_ids"] == reserved).sum()) == 4
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = m(**batch).logits
    loss_sum, n = token_loss_sum(logits, labels)
    assert logits.shape[:2] == batch["input_ids"].shape and int(n) > 0 and torch.isfinite(loss_sum)
    # A tokenizer with neither the image token nor LLaMA-3's reserved one: refused, naming the fix.
    with raises_naming(ValueError, "'<im_patch>'", LLAMA3_IMAGE_TOKEN, "add_tokens", "resize_token_embeddings"):
        toy.image_token_id(build_tokenizer(cfg))


def test_generate_cli_with_checkpoint_and_glyph_eval(tmp_path, cfg, capsys):
    import numpy as np
    from inf_llava import generate as gen
    from PIL import Image

    s = _train(["--stage", "1", "--steps", "1", "--batch-size", "2", "--no-progress", "--out", str(tmp_path)])
    sample = GlyphTask(cfg.image_size).sample(3)
    png = tmp_path / "glyph.png"
    Image.fromarray((sample.image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(png)
    assert torch.allclose(gen.load_image(png), sample.image, atol=1 / 255)
    argv = ["--image", str(png), "--image", str(png), "--prompt", sample.question, "--max-new-tokens", "4"]
    texts = gen.main(argv + ["--checkpoint", s["checkpoint"], "--eval-glyphs", "4"])
    out = capsys.readouterr().out
    assert len(texts) == 2 and texts[0] == texts[1]  # same image and question, greedy: same answer
    assert "exact-match accuracy" in out and "meaningless" not in out
    gen.main(argv)
    assert "meaningless" in capsys.readouterr().out


def test_glyph_eval_honours_seed_and_glyph_size(cfg, monkeypatch):
    """generate.py --eval-glyphs scores the task variant given by --seed / --glyph-size (as train.py)."""
    from inf_llava import generate as gen

    seen = []

    def fake_answer(model, tokenizer, cfg, images, questions, **kw):
        seen.append((images, questions))
        return ["" for _ in questions]

    monkeypatch.setattr(gen, "answer", fake_answer)
    gen.main(["--eval-glyphs", "3", "--seed", "5", "--glyph-size", "6", "--device", "cpu"])
    held_out = range(10_000_000, 10_000_003)
    want = GlyphTask(cfg.image_size, glyph_size=6, seed=5).batch(held_out)
    ((images, questions),) = seen
    assert torch.equal(images, torch.stack([s.image for s in want]))
    assert questions == [s.question for s in want]
    default = GlyphTask(cfg.image_size).batch(held_out)
    assert not torch.equal(images, torch.stack([s.image for s in default]))


def test_llava_json_data_multi_turn_labels_and_training(tmp_path, cfg, tok, model):
    import numpy as np
    from inf_llava.data import build_dataset
    from PIL import Image

    (tmp_path / "img").mkdir()
    for name, size in (("a.png", (90, 120)), ("b.png", (96, 96))):
        Image.fromarray(np.full((*size, 3), 128, np.uint8)).save(tmp_path / "img" / name)
    records = [
        {
            "image": "a.png",
            "conversations": [
                {"from": "human", "value": "<image>\nwhat is in the image ?"},
                {"from": "gpt", "value": "a red cross"},
                {"from": "human", "value": "where is the red cross ?"},
                {"from": "gpt", "value": "top left"},
            ],
        },
        {
            "id": "text-only",
            "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "a"}],
        },
        {
            "image": "b.png",
            "conversations": [
                {"from": "human", "value": "describe the image ."},
                {"from": "gpt", "value": "a blue ring"},
            ],
        },
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    spec = f"llava:{tmp_path / 'data.json'}:{tmp_path / 'img'}"
    data = build_dataset(spec, cfg)
    assert len(data) == 2  # the text-only record is skipped
    batch = collate(data.batch([0, 1]), tok, cfg, model_num_tokens(model))
    assert batch["image_sizes"].tolist() == [[90, 120], [96, 96]]  # ragged sizes
    image_id = cfg.image_token_id(tok)
    for b, answers in enumerate([["a red cross", "top left"], ["a blue ring"]]):
        ids = batch["input_ids"][b]
        assert int((ids == image_id).sum()) == 16  # given in turn 1, or added before the first question
        scored = tok.decode(ids[batch["labels"][b] != IGNORE_INDEX]).split("</s>")
        assert [t.strip() for t in scored if t.strip()] == answers
    s = _train(
        [
            "--data",
            spec,
            "--stage",
            "2",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--no-progress",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert len(s["losses"]) == 2 and all(np.isfinite(s["losses"]))


# ---- the documented commands, and the scripts' errors ----------------------------------------------------------
DOC = ROOT / "docs" / "inf_llava.md"


def _doc_commands(section: str) -> list[list[str]]:
    """The commands of the first bash block under ``section`` in docs/inf_llava.md, as argv lists
    (continuation lines joined, ``VAR=value`` prefixes dropped)."""
    import shlex

    text = DOC.read_text()
    block = re.search(r"```bash\n(.*?)```", text[text.index(section) :], flags=re.S).group(1)
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):
            argv.pop(0)
        if argv:
            commands.append(argv)
    return commands


def _shrunk(argv: list[str]) -> list[str]:
    """A documented command at test size: 2 steps (and the checkpoint names that follow), 2 scored samples."""
    out = []
    for i, a in enumerate(argv):
        if i and argv[i - 1] in ("--steps", "--eval-glyphs"):
            a = "2"
        out.append(re.sub(r"checkpoint-\d+", "checkpoint-2", a))
    return out


def test_documented_tiny_commands_run_top_to_bottom(tmp_path, monkeypatch, capsys):
    """docs/inf_llava.md's 'tiny, on a CPU' block, in order, in an empty folder (2 steps each): the generate
    command writes the sample image the next one reads, and prints the answer the doc quotes. The torchrun
    lines are parsed (their 2-process runs: test_two_process_run_matches_single_process). Then the doc's
    first python block runs as written."""
    from inf_llava import generate as gen
    from inf_llava.generate import SAMPLE_INDEX

    monkeypatch.chdir(tmp_path)
    commands = _doc_commands("### tiny, on a CPU")
    assert [c[0] for c in commands] == ["python"] * 4 + ["torchrun"] * 2
    for argv in commands:
        argv = _shrunk(argv)
        script = next(a for a in argv if a.endswith(".py"))
        args = argv[argv.index(script) + 1 :]
        assert (ROOT / script).is_file(), script
        if argv[0] == "torchrun":
            parsed = train_mod.parse_args(args)
            assert parsed.dist in ("ddp", "fsdp") and parsed.steps == 2
        elif script.endswith("train.py"):
            train_mod.main([*args, "--device", "cpu", "--batch-size", "2", "--no-progress"])
        else:
            texts = gen.main([*args, "--device", "cpu", "--max-new-tokens", "3"])
            assert len(texts) == 1
    out = capsys.readouterr().out
    assert "wrote glyph.png" in out
    assert "the answer to 'describe the image .' is 'a green square at the bottom right'" in out  # quoted in the doc
    assert "glyph.png | describe the image . ->" in out and "glyph.png | what is in the image ? ->" in out
    assert "exact-match accuracy" in out
    cfg = get_config("tiny")
    from inf_llava.data import GlyphTask

    sample = GlyphTask(cfg.image_size).sample(SAMPLE_INDEX)
    assert (sample.colour, sample.shape, sample.row, sample.column) == ("green", "square", 2, 2)  # as the doc says
    assert torch.allclose(gen.load_image(tmp_path / "glyph.png"), sample.image, atol=0.5 / 255)
    assert (tmp_path / "runs" / "tiny-s2" / "checkpoint-2" / "model.safetensors").is_file()
    text = DOC.read_text()
    snippet = re.search(r"```python\n(.*?)```", text, flags=re.S).group(1)
    namespace: dict = {}
    monkeypatch.chdir(ROOT)  # the snippet puts "examples" on sys.path, relative to the repository root
    exec(compile(snippet, str(DOC), "exec"), namespace)
    assert namespace["new_ids"].shape[0] == 1 and 1 <= namespace["new_ids"].shape[1] <= 8


def test_sample_image_is_written_kept_and_never_overwrites(tmp_path, cfg):
    import numpy as np
    from inf_llava.data import GlyphTask
    from inf_llava.generate import SAMPLE_INDEX, load_image, write_sample_image
    from PIL import Image

    path = tmp_path / "new" / "dir" / "glyph.png"  # parents are created
    sample, wrote = write_sample_image(path, cfg, seed=3, glyph_size=6)
    want = GlyphTask(cfg.image_size, glyph_size=6, seed=3).sample(SAMPLE_INDEX)
    assert wrote and sample.answer == want.answer
    assert torch.allclose(load_image(path), want.image, atol=0.5 / 255)
    stamp = path.stat().st_mtime_ns
    assert write_sample_image(path, cfg, seed=3, glyph_size=6)[1] is False  # the same image: kept
    for seed, glyph in ((0, 6), (3, None), (4, 6)):  # another sample at that path: refused, left as it is
        with raises_naming(FileExistsError, str(path), "--image", "another --sample-image"):
            write_sample_image(path, cfg, seed=seed, glyph_size=glyph)
    other = tmp_path / "photo.png"
    Image.fromarray(np.zeros((96, 96, 3), np.uint8)).save(other)
    before = other.read_bytes()
    with raises_naming(FileExistsError, str(other), "is not glyph sample"):
        write_sample_image(other, cfg)
    (tmp_path / "notes.txt").write_text("mine")
    with raises_naming(FileExistsError, "notes.txt"):
        write_sample_image(tmp_path / "notes.txt", cfg)
    assert other.read_bytes() == before and (tmp_path / "notes.txt").read_text() == "mine"
    assert path.stat().st_mtime_ns == stamp
    with raises_naming(IsADirectoryError, str(tmp_path), "file name"):
        write_sample_image(tmp_path, cfg)


def _bad_inputs(tmp_path):
    """Files for the error cases: a non-image, a garbage checkpoint, a checkpoint directory without optimizer."""
    (tmp_path / "page.png").write_text("<html>not found</html>")
    bad = tmp_path / "bad-ckpt"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{oops")
    half = tmp_path / "half-ckpt"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"")
    (tmp_path / "ann.json").write_text("[{not json")
    (tmp_path / "img").mkdir()
    return tmp_path


TRAIN_ERRORS = [
    (["--steps", "0"], ["--steps '0'", "positive integer"]),
    (["--batch-size", "-2"], ["--batch-size '-2'"]),
    (["--micro-batch-size", "0"], ["--micro-batch-size '0'"]),
    (["--lr", "nan"], ["--lr 'nan'", "finite number"]),
    (["--lr", "-1"], ["--lr '-1'"]),
    (["--warmup-ratio", "1.5"], ["--warmup-ratio '1.5'", "0 to 1"]),
    (["--save-every", "-1"], ["--save-every '-1'"]),
    (["--glyph-size", "33"], ["--glyph-size 33", "96x96", "--glyph-size 32"]),
    (["--init-from", "{d}/nope"], ["--init-from", "nope", "Check the path"]),
    (["--init-from", "{d}/bad-ckpt"], ["--init-from", "bad-ckpt", "not a readable safetensors file"]),
    (["--init-from", "{d}/page.png"], ["--init-from", "page.png", "safetensors"]),
    (["--resume", "{d}/half-ckpt"], ["--resume", "half-ckpt", "optimizer.safetensors", "trainer_state.json"]),
    (["--resume", "{d}/half-ckpt/model.safetensors"], ["--resume", "is a file", "--resume auto"]),
    (["--data", "llava:{d}/nope.json:{d}/img"], ["--data", "nope.json", "llava:<annotations.json>"]),
    (["--data", "llava:{d}/ann.json:{d}/nope"], ["--data", "image folder", "nope"]),
    (["--data", "llava:{d}/ann.json:{d}/img"], ["--data", "not valid JSON", "Check the file"]),
    (["--data", "shapes"], ["data='shapes'", "'glyphs'"]),
    (["--out", "{d}/page.png"], ["--out", "page.png", "is a file"]),
    (["--config", "llama3-8b", "--llm-dir", "{d}/nope", "--clip-dir", "{d}"], ["--llm-dir", "nope", "Check the path"]),
    (["--config", "llama3-8b", "--llm-dir", "{d}", "--clip-dir", "{d}"], ["--llm-dir", "config.json"]),
    (["--batch-size", "3", "--micro-batch-size", "2"], ["--batch-size 3", "micro-batches of 2"]),
]

GENERATE_ERRORS = [
    (["--image", "{d}/nope.png", "--prompt", "q"], ["--image", "nope.png", "Check the path"]),
    (["--image", "{d}", "--prompt", "q"], ["--image", "is a directory"]),
    (["--image", "{d}/page.png", "--prompt", "q"], ["--image", "page.png", "cannot be read as an image"]),
    (["--image", "{d}/page.png"], ["--prompt is given 0 time(s) for 1 image(s)"]),
    (["--sample-image", "{d}/s.png", "--image", "{d}/page.png"], ["--prompt is given 0 time(s) for 2 image(s)"]),
    ([], ["--image", "--sample-image", "--eval-glyphs"]),
    (["--checkpoint", "{d}/nope", "--eval-glyphs", "1"], ["--checkpoint", "nope"]),
    (["--checkpoint", "{d}/img", "--eval-glyphs", "1"], ["--checkpoint", "lacks model.safetensors"]),
    (["--checkpoint", "{d}/bad-ckpt", "--eval-glyphs", "1"], ["--checkpoint", "not a readable safetensors file"]),
    (["--sample-image", "{d}/page.png"], ["--sample-image", "page.png", "is not glyph sample", "--image"]),
    (["--sample-image", "{d}/img"], ["--sample-image", "is a directory"]),
    (["--sample-image", "{d}/page.png/x.png"], ["--sample-image", "is a file"]),
    (["--eval-glyphs", "-1"], ["--eval-glyphs '-1'"]),
    (["--eval-glyphs", "1", "--max-new-tokens", "0"], ["--max-new-tokens '0'"]),
    (["--eval-glyphs", "1", "--glyph-size", "40"], ["--glyph-size 40", "--glyph-size 32"]),
    (["--eval-glyphs", "1", "--device", "bogus"], ["--device 'bogus'", "cpu"]),
]


@pytest.mark.parametrize(
    "script, argv, names",
    [("train", a, n) for a, n in TRAIN_ERRORS] + [("generate", a, n) for a, n in GENERATE_ERRORS],
)
def test_scripts_refuse_bad_arguments_and_paths_in_one_line_before_building(
    tmp_path, capsys, monkeypatch, script, argv, names
):
    from _messages import FIX, assert_names
    from inf_llava import generate as gen

    def fail(*a, **k):
        raise AssertionError("the model was built before the inputs were checked")

    monkeypatch.setattr(train_mod, "build_inf_llava", fail)
    monkeypatch.setattr(gen, "build_inf_llava", fail)
    d = _bad_inputs(tmp_path)
    argv = [a.format(d=d) for a in argv]
    main = train_mod.main if script == "train" else gen.main
    extra = ["--device", "cpu", "--no-progress", "--out", str(tmp_path / "run")] if script == "train" else []
    if script == "train" and "--out" in argv:
        extra = extra[:3]
    with pytest.raises(SystemExit) as info:
        main([*extra, *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"{script}.py: error: ") and f"{script}.py: {script}.py" not in lines[0], lines[0]
    assert_names(lines[0], *names)
    assert FIX.search(lines[0]) or "use " in lines[0], lines[0]


def test_scripts_traceback_flag_raises_the_error(tmp_path):
    from inf_llava import generate as gen

    with pytest.raises(FileNotFoundError, match="nope.png"):
        gen.main(["--image", str(tmp_path / "nope.png"), "--prompt", "q", "--traceback"])
    with pytest.raises(FileNotFoundError, match="--init-from"):
        train_mod.main(["--init-from", str(tmp_path / "nope"), "--out", str(tmp_path), "--traceback"])
