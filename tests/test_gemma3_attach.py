"""hrperc.integrations.transformers on Gemma 3: the attached model against the unmodified one (logits, ``generate``),
the attached processor's ``input_ids`` / ``token_type_ids`` against ``Gemma3Processor``'s with pan and scan off and
on, the options read from the model and the processor, and the refusals.

A tiny random ``Gemma3ForConditionalGeneration`` (``_gemma3_tiny``) with the real ``Gemma3Processor`` around an
offline word-level tokenizer; nothing is downloaded.
"""

from __future__ import annotations

import pytest
import torch
from _messages import FIX, raises_naming

tf = pytest.importorskip("transformers")

from _gemma3_tiny import MM_TOKENS, build_gemma3, images, processor  # noqa: E402

import hrperc  # noqa: E402
from hrperc.integrations.transformers import _families, attach, encoder_from_model  # noqa: E402

BOI = "<start_of_image>"
# one image; several images of different sizes in one text; a ragged batch (other sizes and counts per row, padded).
# With pan and scan: 300 x 700 and 700 x 301 get 2 crops, 1000 x 260 three, 50 x 60 and 200 x 2000 none.
CASES = {
    "one image": ([(300, 700)], [f"{BOI} describe it"]),
    "several images in one text": ([(300, 700), (50, 60), (1000, 260)], [f"what {BOI} is {BOI} it {BOI}"]),
    "ragged batch": ([(700, 301), (200, 2000), (50, 60)], [f"describe {BOI} it {BOI}", f"{BOI} what is the image"]),
}
PAN = dict(do_pan_and_scan=True, pan_and_scan_min_crop_size=100)  # honoured at the processor's call


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: intra-op threads only wait on each other (and on a shared machine, on everything else)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _nested(sizes, texts, seed=0):
    """The images per text, as Gemma3Processor takes them."""
    flat, out = images(sizes, seed), []
    for t in texts:
        out.append(flat[: t.count(BOI)])
        flat = flat[t.count(BOI) :]
    return out


@pytest.fixture(scope="module")
def attached():
    """The unmodified model's outputs on every case, with and without pan and scan, then the same model attached."""
    model, proc = build_gemma3()
    proc.tokenizer.padding_side = "left"  # generate continues every row from its last real token
    ref = {}
    with torch.no_grad():
        for case, (sizes, texts) in CASES.items():
            for pan in (False, True):
                kw = PAN if pan else {}
                inputs = proc(images=_nested(sizes, texts), text=texts, return_tensors="pt", padding=True, **kw)
                ref[case, pan] = inputs, model(**inputs).logits
        sizes, texts = CASES["ragged batch"]
        gen_in = proc(images=_nested(sizes, texts), text=texts, return_tensors="pt", padding=True, **PAN)
        ref_gen = model.generate(**gen_in, max_new_tokens=4, do_sample=False)
    encoder = encoder_from_model(model, proc)
    model, aproc = attach(model, proc, encoder)
    return model, proc, aproc, encoder, ref, ref_gen


@pytest.mark.parametrize("pan", [False, True], ids=["plain", "pan and scan"])
@pytest.mark.parametrize("case", list(CASES))
def test_attached_logits_equal_the_unmodified_model_s(attached, case, pan):
    model, _, aproc, _, ref, _ = attached
    ref_in, ref_logits = ref[case, pan]
    sizes, texts = CASES[case]
    inputs = aproc(images=images(sizes), text=texts, return_tensors="pt", padding=True, **(PAN if pan else {}))
    for key in ("input_ids", "attention_mask", "token_type_ids"):  # the processor's text, crops' sentence included
        assert torch.equal(inputs[key], ref_in[key]), key
    assert "image_sizes" not in inputs  # Gemma 3's forward takes none
    image_id = model.config.image_token_id
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"]).pooler_output
        logits = model(**inputs).logits
    views = ref_in["pixel_values"].shape[0]
    assert features.shape == (1, views * MM_TOKENS, model.config.text_config.hidden_size)
    assert (inputs["input_ids"] == image_id).sum().item() == views * MM_TOKENS
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    if case != "ragged batch":  # that the images reach the LLM: once per pan-and-scan setting is enough
        return
    other = aproc(images=images(sizes, seed=1), text=texts, return_tensors="pt", padding=True, **(PAN if pan else {}))
    with torch.no_grad():
        assert not torch.allclose(model(**other).logits, ref_logits, atol=1e-3)  # the images do reach the LLM


def test_generate_gives_the_unmodified_model_s_tokens(attached):
    model, _, aproc, _, _, ref_gen = attached
    sizes, texts = CASES["ragged batch"]
    inputs = aproc(images=images(sizes), text=texts, return_tensors="pt", padding=True, **PAN)
    gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 4 and torch.equal(gen, ref_gen)


def test_the_family_entry_and_the_options_read_from_the_model_and_processor(attached):
    model, proc, _, encoder, _, _ = attached
    entry = _families.family_of(model.config.model_type)
    assert entry.key == "gemma3" and entry.model_class == type(model).__name__
    assert hrperc.integrations.transformers.FAMILIES["gemma3"] == "gemma3" in hrperc.list_recipes()
    fe = encoder.front_end
    assert encoder.recipe == "gemma3" and fe.mm_tokens_per_image == model.config.mm_tokens_per_image
    assert (fe.do_pan_and_scan, fe.pan_and_scan_min_crop_size, fe.pan_and_scan_max_num_crops) == (False, 256, 4)
    assert fe.pan_and_scan_min_ratio_to_activate == 1.2  # Gemma3Processor's defaults, over its image processor's
    assert encoder.backbone.mean == (0.5, 0.5, 0.5) and encoder.backbone.image_size == (64, 64)
    # an encoder built with pan and scan on writes the crops without a call option
    fresh, proc2 = build_gemma3()
    on = encoder_from_model(fresh, proc2, do_pan_and_scan=True, pan_and_scan_min_crop_size=100)
    fresh, aproc = attach(fresh, proc2, on)
    sizes, texts = CASES["one image"]
    ours = aproc(images=images(sizes), text=texts, return_tensors="pt")
    theirs = proc2(images=_nested(sizes, texts), text=texts, return_tensors="pt", **PAN)
    assert torch.equal(ours["input_ids"], theirs["input_ids"])


def test_refusals_name_the_value_and_the_fix(attached):
    model, proc, aproc, _, _, _ = attached
    fresh, _ = build_gemma3()
    wrong_seq = tf.Gemma3Processor(
        image_processor=proc.image_processor, tokenizer=proc.tokenizer, image_seq_length=2 * MM_TOKENS
    )
    with raises_naming(ValueError, "image_seq_length=32", "mm_tokens_per_image=16", FIX):
        encoder_from_model(fresh, wrong_seq)
    with raises_naming(ValueError, "resample=", "bilinear", FIX):
        encoder_from_model(fresh, processor(resample=3))
    with raises_naming(ValueError, "size=", "64x64", FIX):
        encoder_from_model(fresh, processor(size={"height": 32, "width": 32}))
    sizes, texts = CASES["one image"]
    with raises_naming(ValueError, "pan_and_scan_max_num_crops=0", ">= 1", FIX):
        aproc(images=images(sizes), text=texts, do_pan_and_scan=True, pan_and_scan_max_num_crops=0)
    with raises_naming(ValueError, "size=", "Drop size"):
        aproc(images=images(sizes), text=texts, size={"height": 32, "width": 32})
    with raises_naming(ValueError, "image_size=(1, 7)", "empty", FIX):  # an empty crop, which transformers fails on
        aproc(
            images=images([(1, 7)]),
            text=texts,
            do_pan_and_scan=True,
            pan_and_scan_min_crop_size=1,
            pan_and_scan_max_num_crops=5,
            pan_and_scan_min_ratio_to_activate=1.0,
        )


def test_save_and_restore_keep_the_pan_and_scan_options(tmp_path):
    from hrperc.integrations.transformers import load_front_end, save_front_end

    model, proc = build_gemma3()
    model, aproc = attach(model, proc, encoder_from_model(model, proc, **PAN))
    sizes, texts = CASES["one image"]
    inputs = aproc(images=images(sizes), text=texts, return_tensors="pt")
    save_front_end(model, tmp_path)
    restored, proc2 = load_front_end(*build_gemma3(), tmp_path)
    again = proc2(images=images(sizes), text=texts, return_tensors="pt")
    assert torch.equal(again["input_ids"], inputs["input_ids"]) and restored.hrperc_front_end.front_end.do_pan_and_scan
    with torch.no_grad():
        torch.testing.assert_close(restored(**again).logits, model(**inputs).logits, atol=1e-6, rtol=0)
