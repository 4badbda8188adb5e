"""LoRA variants through the real server, on the full-width 1-block model, in one prompt: a file with a patch of
every kind (LoKr, LoHa, DoRA, diff / diff_b / norm deltas, plain LoRAs in every spelling) through our LoRA node
equals ComfyUI's LoraLoaderModelOnly, on our MODEL and on ComfyUI's own model; the same file with keys that cannot
be applied is refused (strict, the default) or applied with a warning naming the skipped keys (lenient)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from graphs import fails, sink
from native_graphs import TOL, add_case, close, common, differs, ksampler, load, models, node, run, twin
from tools.checkpoints import dit as D
from tools.checkpoints import lora as L

pytestmark = pytest.mark.e2e
BASE = "qp_lora_wide_bf16.safetensors"  # the same file (and seed) as test_e2e_native_lora's
EVERY, BAD = "qp_lk_every.safetensors", "qp_lk_every_bad.safetensors"
STRENGTH = 0.8
BAD_KEYS = {
    "diffusion_model.transformer_blocks.1.attn.to_q.lora_A.weight": torch.zeros(4, 3072),  # a block it has not
    "lora_unet_transformer_blocks_0_attn_to_qq.lora_down.weight": torch.zeros(4, 3072),
    "transformer_blocks.0.attn.to_q.lora_mid.weight": torch.zeros(4, 4),
}


@pytest.fixture(scope="module")
def files(comfy):
    cfg, base = D.config(num_layers=1), comfy.models_dir / "diffusion_models" / BASE
    if not base.exists():
        D.write_comfy(base, cfg, dtype=torch.bfloat16, seed=3)
    loras = comfy.models_dir / "loras"
    every = L.write_every_kind(loras / EVERY, cfg, seed=11, dtype=torch.bfloat16)
    save_file({**load_file(str(every)), **BAD_KEYS}, str(loras / BAD))
    return comfy


def ours(model, name=EVERY, **extra):
    return node("QwenPixLoraLoader", dit=[model, 0], lora_name=name, strength=STRENGTH, **extra)


def native(model, name=EVERY):
    return node("LoraLoaderModelOnly", model=[model, 0], lora_name=name, strength_model=STRENGTH)


def sampled(lora: dict) -> dict:
    return {
        "l": lora,
        "ms": node("ModelSamplingAuraFlow", model=["l", 0], shift=3.1),
        "k": ksampler("ms", steps=1, cfg=1.0),
    }


@pytest.fixture(scope="module")
def runs(files):
    graph = {**common(), **models(BASE)}
    graph["off_load"] = node("QwenPixDiTLoader", dit_name=BASE, compute_dtype="fp32", positions="official (diffusers)")
    twin(graph, "every", lambda side: sampled(ours("o_load") if side == "o" else native("n_load")))
    add_case(graph, "every_native_on_ours", sampled(native("o_load")))
    add_case(graph, "every_ours_on_native", sampled(ours("n_load")))
    add_case(graph, "every_beside", sampled(ours("off_load")))  # plain LoRAs beside the layer, the rest at the cast
    add_case(graph, "lenient", sampled(ours("o_load", BAD, unmatched_keys="skip with a warning")))
    add_case(graph, "plain", {"k": ksampler("o_ms", steps=1, cfg=1.0)})
    return files, run(files, graph)


def test_every_kind_equals_comfyuis_loader_on_its_own_model(runs):
    comfy, _ = runs
    assert close(comfy, "every") <= TOL
    differs(comfy, "every_o", "plain")  # the LoRA did something


def test_our_node_and_comfyuis_loader_agree_on_either_model(runs):
    comfy, _ = runs
    a, b = load(comfy, "every_o"), load(comfy, "every_native_on_ours")
    assert np.array_equal(a, b), float(np.abs(a - b).max())  # the same patches, applied the same way
    a, b = load(comfy, "every_ours_on_native"), load(comfy, "every_n")
    assert np.array_equal(a, b), float(np.abs(a - b).max())
    c = load(comfy, "every_beside")
    assert float(np.abs(c - a).max()) <= TOL * max(1.0, float(np.abs(a).max()))


def test_lenient_applies_the_rest_and_says_which_keys_it_skipped(runs):
    comfy, res = runs
    assert np.array_equal(load(comfy, "lenient"), load(comfy, "every_o"))  # ComfyUI skips them too
    said = [e["data"]["message"] for e in res.events if e["type"] == "qwenpix.warning"]
    assert any(f"LoRA {BAD}: skipped 3 keys" in m and all(k in m for k in BAD_KEYS) for m in said), said


def test_strict_refuses_a_partly_unusable_file_naming_the_keys(runs, client):
    prompt = {**models(BASE), "x": ours("o_load", BAD), "out": sink(("x", 0))}
    fails(client, prompt, "x", f"lora_name '{BAD}'", "3 of", "cannot be applied", *BAD_KEYS,
          "nearest: transformer_blocks.0.attn.to_q", "unmatched_keys to 'skip with a warning'")  # fmt: skip
