"""Unit tests of the node-side checks (nodes/checks.py, loaded without ComfyUI), the LoRA factor checks at load,
and the edit canvas choice of `prepare_references`."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen_image_core.checkpoint import CheckpointError, open_checkpoint
from qwen_image_core.formats.lora import parse_lora
from qwen_image_core.pipeline import prepare_references
from qwen_image_core.prompts import calculate_dimensions
from tools.checkpoints import dit as W
from tools.checkpoints.lora import lora_modules, write_lora

_spec = importlib.util.spec_from_file_location("qwenpix_checks", Path(__file__).parent.parent / "nodes" / "checks.py")
checks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(checks)
InputError = checks.InputError


def raises(fn, *fragments):
    with pytest.raises(InputError) as info:
        fn()
    msg = str(info.value)
    for f in fragments:
        assert f in msg, f"{f!r} not in: {msg}"
    assert "\nFix: " in msg, msg
    return msg


# -- numbers
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_numbers_are_refused_with_the_input_name(value):
    word = "NaN" if math.isnan(value) else "infinite"
    raises(lambda: checks.finite_number("cfg", value, "set cfg to 4"), "cfg '", word, "Fix: set cfg to 4")


def test_numbers_that_are_fine_pass_and_bounds_apply():
    assert checks.finite_number("cfg", 4, "x") == 4.0
    assert checks.finite_number("cfg", np.float32(2.5), "x") == 2.5
    raises(lambda: checks.finite_number("shift", 0.0, "raise it", above=0), "shift '0.0': must be above 0")
    raises(lambda: checks.finite_number("cfg", "4", "x"), "cfg: expected a number, got the text '4'")
    raises(lambda: checks.finite_number("cfg", True, "x"), "expected a number")


# -- images and latents
def test_image_with_some_nan_values_names_the_count():
    image = torch.rand(1, 32, 32, 3)
    image.view(-1)[:12] = float("nan")
    raises(lambda: checks.check_image("image1", image), "image1: 12 of 3072 values are NaN", "float16")


def test_all_nan_and_inf_images():
    raises(lambda: checks.check_image("image2", torch.full((1, 4, 4, 3), float("nan"))), "all 48 values are NaN")
    image = torch.zeros(1, 4, 4, 3)
    image[0, 0, 0, 0] = float("inf")
    raises(lambda: checks.check_image("image", image), "image: 1 of 48 values are infinite")


def test_image_of_the_wrong_kind_or_shape():
    raises(
        lambda: checks.check_image("image1", {"samples": torch.zeros(1, 16, 1, 4, 4)}), "got a LATENT [1, 16, 1, 4, 4]"
    )
    raises(lambda: checks.check_image("image1", torch.zeros(1, 8, 8)), "with 1-4 channels, got [1, 8, 8]", "MASK")
    raises(lambda: checks.check_image("image1", torch.zeros(1, 8, 8, 5)), "got [1, 8, 8, 5]")
    raises(lambda: checks.check_image("image1", torch.zeros(0, 8, 8, 3)), "image1: the image is empty")
    checks.check_image("image1", torch.rand(2, 8, 8, 4, dtype=torch.float16))  # fine


def test_latent_checks():
    raises(lambda: checks.check_latent("samples", torch.zeros(1, 16, 4, 4)), "samples: expected a LATENT")
    raises(lambda: checks.check_latent("samples", {"samples": torch.zeros(1, 4, 8, 8)}), "16-channel", "[1, 4, 8, 8]")
    raises(lambda: checks.check_latent("samples", {"samples": torch.zeros(1, 16, 3, 8, 8)}), "has 3 frames")
    raises(lambda: checks.check_latent("samples", {"samples": torch.full((1, 16, 2, 2), float("nan"))}), "all 64")
    assert checks.check_latent("samples", {"samples": torch.zeros(1, 16, 1, 2, 2)}).shape == (1, 16, 1, 2, 2)


# -- conditioning
def _cond(tokens=5, dim=8, **extra):
    return [[torch.randn(1, tokens, dim), extra]]


def test_good_conditioning_passes_in_both_layouts():
    checks.check_conditioning("positive", _cond(), 8)
    native = _cond(attention_mask=torch.ones(1, 5, dtype=torch.long), reference_latents=[torch.zeros(1, 16, 1, 4, 4)])
    checks.check_conditioning("positive", native, 8)
    checks.check_conditioning("positive", _cond(reference_latents=[torch.zeros(1, 16, 4, 4)], pooled_output=None), 8)


def test_conditioning_structure_errors_name_the_input():
    raises(lambda: checks.check_conditioning("negative", torch.zeros(1, 5, 8), 8), "negative: expected a CONDITIONING")
    raises(lambda: checks.check_conditioning("positive", [], 8), "positive: the conditioning is empty")
    raises(lambda: checks.check_conditioning("positive", [torch.zeros(1, 5, 8)], 8), "positive: expected an [embed")
    raises(lambda: checks.check_conditioning("positive", [[torch.zeros(1, 5, 8), "x"]], 8), "the options are the text")
    raises(lambda: checks.check_conditioning("positive", [["a", {}]], 8), "the embeddings are the text 'a'")
    two = _cond() + [[torch.zeros(1, 3, 4), {}]]
    raises(
        lambda: checks.check_conditioning("negative", two, 8),
        "negative[1]: the conditioning is [1, 3, 4]",
        "[1, tokens, 8]",
    )


def test_non_finite_embeddings_are_refused():
    c = _cond()
    c[0][0][0, 1, 2] = float("nan")
    raises(
        lambda: checks.check_conditioning("positive", c, 8),
        "positive: the embeddings [1, 5, 8] hold NaN/inf: 1 of 40 values are NaN",
    )


@pytest.mark.parametrize(
    "mask, fragment",
    [
        (torch.ones(1, 7, dtype=torch.bool), "attention_mask is [1, 7], the embeddings are [1, 5, 8]"),
        (torch.ones(5), "attention_mask is [5]"),
        ([1, 1, 1, 1, 1], "attention_mask is a list of 5 items, expected a tensor [batch, tokens]"),
        ("yes", "attention_mask is the text 'yes'"),
        (torch.full((1, 5), float("nan")), "attention_mask holds NaN/inf"),
    ],
    ids=["too_long", "one_dim", "list", "text", "nan"],
)
def test_bad_attention_masks_name_the_key(mask, fragment):
    raises(lambda: checks.check_conditioning("positive", _cond(attention_mask=mask), 8), "positive: ", fragment)


@pytest.mark.parametrize(
    "refs, fragment",
    [
        (torch.zeros(1, 16, 1, 4, 4), "reference_latents is a tensor [1, 16, 1, 4, 4], expected a list"),
        ([torch.zeros(1, 4, 1, 4, 4)], "reference_latents[0] is [1, 4, 1, 4, 4], expected a 16-channel"),
        ([torch.zeros(1, 16, 1, 4, 4), torch.zeros(1, 16, 2, 4, 4)], "reference_latents[1] is [1, 16, 2, 4, 4]"),
        ([{"samples": torch.zeros(1, 16, 4, 4)}], "reference_latents[0] is a LATENT"),
        ([torch.full((1, 16, 1, 2, 2), float("inf"))], "reference_latents[0]: all 64 values are infinite"),
    ],
    ids=["not_a_list", "channels", "frames", "latent_dict", "inf"],
)
def test_bad_reference_latents_name_the_key(refs, fragment):
    raises(lambda: checks.check_conditioning("positive", _cond(reference_latents=refs), 8), "positive: ", fragment)


# -- text and handles
def test_lone_surrogate_in_a_prompt():
    raises(lambda: checks.check_text("prompt", "a cat \ud83d here"), "character 7 is a lone UTF-16 surrogate (U+D83D)")
    assert checks.check_text("prompt", "a cat \U0001f408") == "a cat \U0001f408"  # a whole emoji is fine


class DiTHandle:  # stand-ins named like the pack's handle classes
    pass


class ImageVAE:
    pass


def test_handle_of_the_wrong_kind():
    msg = raises(
        lambda: checks.check_handle(
            "dit", ImageVAE(), DiTHandle, "a Qwen-Image diffusion model", "Load Qwen-Image Diffusion Model"
        ),
        "dit: expected a Qwen-Image diffusion model from 'Load Qwen-Image Diffusion Model', got a Qwen-Image VAE",
    )
    assert "connect the output of 'Load Qwen-Image Diffusion Model' to dit" in msg
    assert checks.describe_value(torch.zeros(1, 8, 8, 3)) == "an IMAGE [1, 8, 8, 3]"
    assert checks.describe_value(None) == "nothing"
    handle = DiTHandle()
    assert checks.check_handle("dit", handle, DiTHandle, "x", "y") is handle


# -- non-finite diagnosis
def test_float8_non_finite_counts():
    t = torch.tensor([1.0, float("nan"), 2.0])
    assert checks.non_finite_counts(t.to(torch.float8_e4m3fn)) == (1, 0)
    e5 = torch.tensor([1.0, float("nan"), float("inf"), float("-inf")]).to(torch.float8_e5m2)
    assert checks.non_finite_counts(e5) == (1, 2)
    assert checks.non_finite_counts(torch.arange(4)) == (0, 0)


def test_non_finite_weights_found_once_and_cached():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    assert checks.non_finite_weights(model) is None
    bad = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    with torch.no_grad():
        bad[1].weight[0, 0] = float("nan")
    assert checks.non_finite_weights(bad) == "1 tensor, e.g. 1.weight (1 NaN)"
    with torch.no_grad():
        bad[1].weight[0, 0] = 0.0
    assert checks.non_finite_weights(bad) == "1 tensor, e.g. 1.weight (1 NaN)"  # cached: weights never change


def test_explanations_in_order_of_likelihood():
    f32, f16 = torch.float32, torch.float16
    lora = [("x.safetensors", 1.0)]
    name, _, cause = checks.explain_non_finite(f16, "fp16", "m", None, lora, [("latent_image", "all 4 values are NaN")])
    assert name == "latent_image" and "all 4 values are NaN" in cause
    name, value, cause = checks.explain_non_finite(f16, "fp16", "m.safetensors", "1 tensor, e.g. a (1 NaN)", lora)
    assert (name, value) == ("dit", "m.safetensors") and "non-finite weights" in cause and "download" in cause
    name, value, cause = checks.explain_non_finite(f16, "auto", "m", None, lora)
    assert (name, value) == ("compute_dtype", "auto") and "bf16" in cause
    name, value, cause = checks.explain_non_finite(f32, "fp32", "m", None, [("a", 1.0), ("b", -8.0)])
    assert value == "m + LoRA b @ -8" and "extreme strength -8" in cause
    name, value, cause = checks.explain_non_finite(f32, "fp32", "m", None, [("a", 1.0), ("z", 0.0)])
    assert value == "m + 1 LoRA" and "'a' @ 1" in cause and "'z'" not in cause
    name, value, cause = checks.explain_non_finite(torch.bfloat16, "auto", "m", None)
    assert name == "compute_dtype" and "fp32" in cause and "no LoRA" in cause
    for args in ((f16, "fp16", "m", None), (f32, "fp32", "m", None, lora)):
        assert "\nFix: " in checks.explain_non_finite(*args)[2]


def test_sampler_message_from_a_handle():
    model = torch.nn.Linear(2, 2)
    dit = SimpleNamespace(model=model, name="d.safetensors", loras=((SimpleNamespace(path="/x/y/l.safetensors"), 6.0),))
    msg = checks.non_finite_message(0, 4, torch.float32, "fp32", dit, {"latent_image": torch.zeros(1, 16, 2, 2)})
    assert msg.startswith("dit 'd.safetensors + LoRA l.safetensors @ 6': sampling produced NaN/inf at step 1 of 4")
    assert "(computing in float32)" in msg and "\nFix: lower its strength" in msg and "/x/y" not in msg
    msg = checks.non_finite_message(1, 4, torch.float16, "fp16", dit, {"latent_image": torch.full((2,), float("nan"))})
    assert msg.startswith("latent_image 'non-finite'") and "all 2 values are NaN" in msg


# -- paths
ROOTS = {
    "/srv/comfy/models/loras": "models/loras",
    "/srv/comfy/models": "models",
    "/data/extra dir/unet": "models/diffusion_models",
}


@pytest.mark.parametrize(
    "text, want",
    [
        (
            "/srv/comfy/models/loras/a/b.safetensors: file is truncated",
            "models/loras/a/b.safetensors: file is truncated",
        ),
        ("/srv/comfy/models/vae/v.safetensors: bad", "models/vae/v.safetensors: bad"),
        ("'/data/extra dir/unet/x.safetensors' is bad", "'models/diffusion_models/x.safetensors' is bad"),
        ("no such file: /home/me/secret/tokenizer/", "no such file: tokenizer"),
        ("see /opt/a.txt.", "see a.txt."),
        (r"C:\Users\me\ComfyUI\models\x.safetensors: bad", "x.safetensors: bad"),
        ("[Errno 2] No such file or directory: '/tmp/q/w.bin'", "[Errno 2] No such file or directory: 'w.bin'"),
        (
            "fp8/bf16, 1/2, [1, 16]/2, https://huggingface.co/Qwen/x and a/b",
            "fp8/bf16, 1/2, [1, 16]/2, https://huggingface.co/Qwen/x and a/b",
        ),
        ("/srv/comfy/modelsX/y", "y"),
    ],
)
def test_scrub_paths(text, want):
    assert checks.scrub_paths(text, ROOTS) == want


# -- LoRA factors checked at load (core)
@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    cfg = W.tiny_config()
    path = write_lora(tmp_path_factory.mktemp("lora") / "good.safetensors", cfg, "lightx2v", rank=4, alpha=4.0)
    return path, [m for m, _ in lora_modules(cfg)]


KEY = "diffusion_model.img_in"


def _parse_changed(lora_file, tmp_path, change, metadata=None):
    path, modules = lora_file
    sd = load_file(str(path))
    change(sd)
    out = tmp_path / "bad_lora.safetensors"
    save_file(sd, str(out), metadata=metadata)
    with pytest.raises(CheckpointError) as info:
        parse_lora(open_checkpoint(out), modules)
    msg = str(info.value)
    assert str(out) in msg, msg
    return msg


def _set(key, value):
    return lambda sd: sd.__setitem__(key, value)


@pytest.mark.parametrize(
    "change, fragments",
    [
        (
            _set(f"{KEY}.lora_down.weight", torch.full((4, 16), float("nan"))),
            ("lora_down.weight holds non-finite", "64 NaN of 64"),
        ),
        (_set(f"{KEY}.lora_up.weight", torch.full((32, 4), float("inf"))), ("lora_up.weight", "128 infinite")),
        (_set(f"{KEY}.alpha", torch.tensor(float("nan"))), (f"{KEY}.alpha holds non-finite",)),
        (_set(f"{KEY}.alpha", torch.tensor([4.0, 4.0])), (f"alpha {KEY}.alpha is [2]; an alpha is one number",)),
        (_set(f"{KEY}.alpha", torch.tensor([True])), ("is bool, not a number",)),
        (
            lambda sd: sd.update(
                {f"{KEY}.lora_down.weight": torch.zeros(0, 16), f"{KEY}.lora_up.weight": torch.zeros(32, 0)}
            ),
            ("lora_down.weight is [0, 16] (rank 0)",),
        ),
        (_set(f"{KEY}.lora_up.weight", torch.zeros(0, 4)), ("lora_up.weight is [0, 4] (no features)",)),
        (_set(f"{KEY}.lora_down.weight", torch.zeros(4, 16, 1, 1)), ("is [4, 16, 1, 1], not a matrix",)),
        (_set(f"{KEY}.lora_down.weight", torch.zeros(4, 16, dtype=torch.int8)), ("is int8, not floating point",)),
        (_set(f"{KEY}.lora_down.weight", torch.zeros(3, 16)), ("disagree on the rank", "lora_down.weight is [3, 16]")),
    ],
    ids=[
        "nan_down",
        "inf_up",
        "nan_alpha",
        "alpha_2",
        "alpha_bool",
        "rank_0",
        "empty_up",
        "conv",
        "int",
        "rank_mismatch",
    ],
)
def test_bad_lora_factors_name_file_key_and_defect(lora_file, tmp_path, change, fragments):
    msg = _parse_changed(lora_file, tmp_path, change)
    for f in fragments:
        assert f in msg, f"{f!r} not in: {msg}"


@pytest.mark.parametrize(
    "meta, fragment",
    [
        ({"r": 4, "lora_alpha": 4, "rank_pattern": {"img_in": 0}}, "rank r = 0 for img_in"),
        ({"r": 4, "lora_alpha": float("nan")}, "lora_alpha = nan"),
        ("{not json", "not valid JSON"),
        ([1, 2], "not a JSON object"),
    ],
    ids=["r0", "alpha_nan", "json", "list"],
)
def test_bad_peft_metadata(tmp_path_factory, tmp_path, meta, fragment):
    cfg = W.tiny_config()
    path = write_lora(tmp_path_factory.mktemp("peft") / "p.safetensors", cfg, "peft")
    raw = meta if isinstance(meta, str) else json.dumps(meta)
    msg = _parse_changed(
        (path, [m for m, _ in lora_modules(cfg)]), tmp_path, lambda sd: None, {"lora_adapter_metadata": raw}
    )
    assert fragment in msg, msg


# -- the edit canvas
def test_canvas_follows_the_chosen_reference():
    portrait, square = torch.rand(1216, 832, 3), torch.rand(64, 64, 3)
    last = prepare_references([portrait, square], "edit_plus", "official")  # diffusers: the last image
    assert (last.width, last.height) == (1024, 1024)
    first = prepare_references([portrait, square], "edit_plus", "official", canvas="first")
    assert (first.width, first.height) == calculate_dimensions(1024 * 1024, 832 / 1216, 32)
    keep = prepare_references([portrait, square], "edit_plus", "keep", canvas="first")
    assert (keep.width, keep.height) == (832, 1216)
    with pytest.raises(ValueError, match="unknown canvas"):
        prepare_references([square], canvas="middle")
