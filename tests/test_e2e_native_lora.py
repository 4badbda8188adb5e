"""Weights and positions on the native MODEL, through the real server, against ComfyUI's own Qwen-Image model:

* LoraLoaderModelOnly (ComfyUI's LoRA loader) chained, and our Qwen-Image LoRA node, on bf16 and float8 bases:
  the LoRAs are applied at the weight cast in float32, never merged into (or re-quantised in) the stored weights,
  so our result equals ComfyUI's CPU model (which upcasts the base to float32 and merges there) and the stored
  weights are unchanged afterwards;
* positions: on odd token grids and with references larger than the target, "ComfyUI native" equals ComfyUI's
  model and "official" does not (the two conventions differ there, and only there);
* reference_latents_method "index_timestep_zero" (newer ComfyUI's Edit-2511 method) equals the 2511 checkpoint
  marker, and differs from "index";
* TorchCompileModel on our MODEL gives the uncompiled result.
"""

from __future__ import annotations

import pytest
import torch

from native_graphs import TOL, add_case, close, common, differs, ksampler, load, models, node, run, twin
from tools.checkpoints import dit as D
from tools.checkpoints import lora as L

pytestmark = pytest.mark.e2e
BF16, FP8 = "qp_lora_wide_bf16.safetensors", "qp_lora_wide_fp8.safetensors"
POS, POS_2511 = "qp_pos_wide_bf16.safetensors", "qp_pos_wide_2511_bf16.safetensors"  # bf16 keeps the disk small
LORAS = ("qp_native_lora_kohya.safetensors", "qp_native_lora_lightx2v.safetensors")


@pytest.fixture(scope="module")
def files(comfy):
    d, cfg = comfy.models_dir / "diffusion_models", D.config(num_layers=1)
    D.write_comfy(d / BF16, cfg, dtype=torch.bfloat16, seed=3)
    D.write_fp8(d / FP8, cfg, seed=3)
    D.write_comfy(d / POS, cfg, dtype=torch.bfloat16, seed=4)  # both sides compute in float32 (exact upcast)
    D.write_comfy(d / POS_2511, cfg, dtype=torch.bfloat16, seed=4, zero_cond_t=True)
    for seed, (name, fmt) in enumerate(zip(LORAS, ("kohya", "lightx2v"), strict=True)):
        L.write_lora(comfy.models_dir / "loras" / name, cfg, fmt, rank=4, alpha=8.0, seed=seed + 1)
    return comfy


def lora_chain(loader: str, model: str, strengths=(0.8, -0.5)) -> dict:
    """Two LoRAs in a chain behind `model`, with ComfyUI's loader or ours; the last node is 'l1'."""
    out, prev = {}, model
    for i, (name, strength) in enumerate(zip(LORAS, strengths, strict=True)):
        if loader == "native":
            out[f"l{i}"] = node("LoraLoaderModelOnly", model=[prev, 0], lora_name=name, strength_model=strength)
        else:
            out[f"l{i}"] = node("QwenPixLoraLoader", dit=[prev, 0], lora_name=name, strength=strength)
        prev = f"l{i}"
    return out


@pytest.fixture(scope="module")
def lora_runs(files):
    graph = {**common()}
    for base in (BF16, FP8):
        tag = "bf16" if base == BF16 else "fp8"
        graph.update(models(base, prefix=f"{tag}_"))
        for loader in ("native", "ours"):

            def build(side, tag=tag, loader=loader):
                chain = lora_chain(loader if side == "o" else "native", f"{tag}_{side}_load")
                return {**chain, "ms": node("ModelSamplingAuraFlow", model=["l1", 0], shift=3.1),
                        "k": ksampler("ms")}  # fmt: skip

            twin(graph, f"{tag}_{loader}_loras", build)
        twin(graph, f"{tag}_plain", lambda side, tag=tag: {"k": ksampler(f"{tag}_{side}_ms")})
        graph[f"{tag}_state_before"] = node("QwenPixTestModelState", model=[f"{tag}_o_load", 0], salt=1)
    run(files, graph)
    # afterwards: the stored weights of both bases are what the files hold
    state = {f"{t}_state": node("QwenPixTestModelState", model=[f"{t}_o_load", 0], salt=2) for t in ("bf16", "fp8")}
    after = run(
        files,
        {f"{t}_o_load": models(b, prefix=f"{t}_")[f"{t}_o_load"] for t, b in (("bf16", BF16), ("fp8", FP8))} | state,
    )
    return files, after


@pytest.mark.parametrize("base", ["bf16", "fp8"])
@pytest.mark.parametrize("loader", ["native", "ours"])
def test_lora_stack_equals_comfyuis_float32_merge(lora_runs, base, loader):
    comfy, _ = lora_runs
    assert close(comfy, f"{base}_{loader}_loras") <= TOL
    differs(comfy, f"{base}_{loader}_loras_o", f"{base}_plain_o")  # the LoRAs did something


@pytest.mark.parametrize("base", ["bf16", "fp8"])
def test_base_weights_are_never_rewritten(lora_runs, base):
    comfy, after = lora_runs
    state = after.outputs[f"{base}_state"]["state"][0]
    from safetensors.torch import load_file

    sd = load_file(str(comfy.models_dir / "diffusion_models" / (BF16 if base == "bf16" else FP8)))
    expected = float(sum(t.double().sum() for k, t in sd.items() if not k.startswith("__")))
    assert state["weights_sum"] == expected  # float8 still float8, bf16 still bf16: no merge, no re-quantisation


# -- positions, the Edit-2511 method, torch.compile
def _odd(side):
    return {"lat": node("EmptySD3LatentImage", width=48, height=80, batch_size=1), "k": ksampler(f"{side}_ms")}


def _big_reference(method=None):
    def build(side):
        nodes = {"r": node("ReferenceLatent", conditioning=["pos", 0], latent=["big", 0])}
        last = "r"
        if method:
            nodes["m"] = node("QwenPixTestSetCondKey", conditioning=["r", 0], key="reference_latents_method",
                              value=method, as_float=False)  # fmt: skip
            last = "m"
        return {**nodes, "k": ksampler(f"{side}_ms", pos=last)}

    return build


@pytest.fixture(scope="module")
def position_runs(files):
    graph = {**common(), "big": node("QwenPixTestLatent", seed=31, width=96, height=80)}
    graph.update(models(POS))  # o_ms, n_ms: ComfyUI native positions and ComfyUI's own model
    graph["off_ms"] = node("ModelSamplingAuraFlow", model=["off_load", 0], shift=3.1)
    graph["off_load"] = node("QwenPixDiTLoader", dit_name=POS, compute_dtype="fp32", positions="official (diffusers)")
    graph["z_ms"] = node("ModelSamplingAuraFlow", model=["z_load", 0], shift=3.1)
    graph["z_load"] = node("QwenPixDiTLoader", dit_name=POS_2511, compute_dtype="fp32", positions="ComfyUI native")
    twin(graph, "odd", _odd)
    twin(graph, "bigref", _big_reference())
    add_case(graph, "odd_official", _odd("off"))
    add_case(graph, "bigref_official", _big_reference()("off"))
    add_case(graph, "zero_method", _big_reference("index_timestep_zero")("o"))
    add_case(graph, "zero_marker", _big_reference()("z"))
    add_case(graph, "index_method", _big_reference("index")("o"))
    run(files, graph)
    return files


def test_comfyui_positions_reproduce_native_where_the_conventions_differ(position_runs):
    assert close(position_runs, "odd") == 0.0  # 3x5 tokens: bit for bit
    assert close(position_runs, "bigref") == 0.0  # a reference larger than the target: text starts from the target
    differs(position_runs, "odd_official", "odd_o", at_least=1e-2)
    differs(position_runs, "bigref_official", "bigref_o", at_least=1e-2)


def test_index_timestep_zero_equals_the_2511_marker(position_runs):
    a, b = load(position_runs, "zero_method"), load(position_runs, "zero_marker")
    assert (a == b).all()
    differs(position_runs, "zero_method", "index_method", at_least=1e-3)


# -- ComfyUI's weight hooks: a LoRA on one conditioning entry only
@pytest.fixture(scope="module")
def hook_runs(files):
    graph = {**common(), **models(BF16, prefix="h_"),
             "hook": node("CreateHookLoraModelOnly", lora_name=LORAS[0], strength_model=0.9),
             "hooked": node("ConditioningSetProperties", cond_NEW=["pos", 0], strength=1.0, set_cond_area="default",
                            hooks=["hook", 0])}  # fmt: skip
    twin(graph, "hooked_lora", lambda side: {"k": ksampler(f"h_{side}_ms", pos="hooked")})
    twin(graph, "unhooked", lambda side: {"k": ksampler(f"h_{side}_ms")})
    run(files, graph)
    return files


def test_weight_hooks_equal_comfyuis(hook_runs):
    """CreateHookLoraModelOnly + ConditioningSetProperties: the LoRA applies to the hooked entry only, at the cast."""
    assert close(hook_runs, "hooked_lora") == 0.0
    differs(hook_runs, "hooked_lora_o", "unhooked_o")
    assert close(hook_runs, "unhooked") == 0.0  # and is gone again for a prompt without the hook
