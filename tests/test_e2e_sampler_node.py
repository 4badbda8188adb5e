"""Our Qwen-Image Sampler through the real server: it is ComfyUI's sampling machinery (CFGGuider, every ComfyUI
sampler and scheduler, explicit sigmas, CFGNorm, cfg below 1, noise masks, combined conditioning) with the
official extras on top (dynamic and Lightning schedules, diffusers' per-token CFG rescale), so where a native node
graph expresses the same thing, it gives the same latents as KSampler on the same MODEL; where native has nothing
to compare, it runs and differs from a control. Warnings about things a graph asks for that a Qwen-Image model
does not do reach the websocket as `qwenpix.warning` events.

Runs on the tiny smoke DiT (official positions: cond and uncond batched with padding) so the sweep stays quick.
"""

from __future__ import annotations

import numpy as np
import pytest

from native_graphs import add_case, differs, load, node, run, same
from tools.checkpoints.smoke import write_smoke
from tools.comfy_harness import ComfyClient

pytestmark = pytest.mark.e2e
DIT = "qp_sampler_node_dit.safetensors"
DIM = 256  # the smoke DiT's text width


@pytest.fixture(scope="module")
def server(comfy):
    write_smoke("diffusion_models", comfy.models_dir / "diffusion_models" / DIT)
    return comfy


def ours(model="dit", pos="pos", neg="neg", lat="lat", sampler="euler", schedule="shift (ComfyUI workflows)",
         shift=3.1, cfg=4.0, rescale="none", steps=2, denoise=1.0, **optional):  # fmt: skip
    return node("QwenPixSampler", dit=[model, 0], positive=[pos, 0], negative=[neg, 0], latent_image=[lat, 0],
                seed=5, steps=steps, cfg=cfg, sampler_name=sampler, schedule=schedule, shift=shift,
                cfg_rescale=rescale, denoise=denoise, **optional)  # fmt: skip


def ks(model="ms", pos="pos", neg="neg", lat="lat", sampler="euler", scheduler="simple", cfg=4.0, steps=2,
       denoise=1.0):  # fmt: skip
    return node("KSampler", model=[model, 0], seed=5, steps=steps, cfg=cfg, sampler_name=sampler,
                scheduler=scheduler, positive=[pos, 0], negative=[neg, 0], latent_image=[lat, 0],
                denoise=denoise)  # fmt: skip


def base() -> dict:
    return {
        "dit": node("QwenPixDiTLoader", dit_name=DIT, compute_dtype="fp32"),
        "ms": node("ModelSamplingAuraFlow", model=["dit", 0], shift=3.1),
        "pos": node("QwenPixTestConditioning", seed=1, tokens=7, dim=DIM),
        "pos2": node("QwenPixTestConditioning", seed=3, tokens=5, dim=DIM),
        "neg": node("QwenPixTestConditioning", seed=2, tokens=3, dim=DIM),
        "lat": node("EmptySD3LatentImage", width=64, height=48, batch_size=1),
        "img": node("QwenPixTestLatent", seed=23, width=64, height=48),
        "mask": node("QwenPixTestMask", width=64, height=48),
    }


# (case: our node's graph, the native graph it must equal)
PAIRS = {
    "explicit_sigmas": (
        {"sig": node("BasicScheduler", model=["ms", 0], scheduler="karras", steps=3, denoise=1.0),
         "s": ours(sigmas=["sig", 0])},
        {"k": ks(scheduler="karras", steps=3)},
    ),
    "cfgnorm_strength": (
        {"s": ours(rescale="CFGNorm (ComfyUI)", rescale_strength=0.6)},
        {"m": node("CFGNorm", model=["ms", 0], strength=0.6), "k": ks(model="m")},
    ),
    "cfg_below_1": ({"s": ours(cfg=0.6)}, {"k": ks(cfg=0.6)}),
    "combine": (
        {"c": node("ConditioningCombine", conditioning_1=["pos", 0], conditioning_2=["pos2", 0]), "s": ours(pos="c")},
        {"c": node("ConditioningCombine", conditioning_1=["pos", 0], conditioning_2=["pos2", 0]), "k": ks(pos="c")},
    ),
    "timestep_range": (
        {"a": node("ConditioningSetTimestepRange", conditioning=["pos", 0], start=0.0, end=0.5),
         "b": node("ConditioningSetTimestepRange", conditioning=["pos2", 0], start=0.5, end=1.0),
         "c": node("ConditioningCombine", conditioning_1=["a", 0], conditioning_2=["b", 0]),
         "s": ours(pos="c", steps=4)},
        {"a": node("ConditioningSetTimestepRange", conditioning=["pos", 0], start=0.0, end=0.5),
         "b": node("ConditioningSetTimestepRange", conditioning=["pos2", 0], start=0.5, end=1.0),
         "c": node("ConditioningCombine", conditioning_1=["a", 0], conditioning_2=["b", 0]),
         "k": ks(pos="c", steps=4)},
    ),
    "noise_mask": (
        {"m": node("SetLatentNoiseMask", samples=["img", 0], mask=["mask", 0]), "s": ours(lat="m", denoise=0.7)},
        {"m": node("SetLatentNoiseMask", samples=["img", 0], mask=["mask", 0]), "k": ks(lat="m", denoise=0.7)},
    ),
    "upstream_shift_kept": (
        {"m": node("ModelSamplingAuraFlow", model=["dit", 0], shift=2.0), "s": ours(model="m", shift=0.0)},
        {"m": node("ModelSamplingAuraFlow", model=["dit", 0], shift=2.0), "k": ks(model="m")},
    ),
    "denoise": ({"s": ours(lat="img", denoise=0.5, steps=3)}, {"k": ks(lat="img", denoise=0.5, steps=3)}),
}  # fmt: skip
# (case: our node's graph, the control it must differ from)
CONTROLS = {
    "dynamic": ({"s": ours(schedule="dynamic (diffusers official)")}, "ksampler_euler"),
    "lightning": ({"s": ours(schedule="lightning (4/8-step LoRAs)")}, "ksampler_euler"),
    "token_norm": ({"s": ours(rescale="norm (diffusers)")}, "ksampler_euler"),
}


@pytest.fixture(scope="module")
def sweep(server):
    client = ComfyClient(server.url).connect()
    try:
        info = client.object_info()
    finally:
        client.close()
    samplers = info["KSampler"]["input"]["required"]["sampler_name"][0]
    schedulers = info["KSampler"]["input"]["required"]["scheduler"][0]
    graph = base()
    for s in samplers:
        add_case(graph, f"ours_{s}", {"s": ours(sampler=s)})
        add_case(graph, f"ksampler_{s}", {"k": ks(sampler=s)})
    for sch in schedulers:
        add_case(graph, f"ours_sch_{sch}", {"s": ours(schedule=sch)})
        add_case(graph, f"ksampler_sch_{sch}", {"k": ks(scheduler=sch)})
    for name, (mine, native) in PAIRS.items():
        add_case(graph, f"{name}_ours", mine)
        add_case(graph, f"{name}_native", native)
    for name, (mine, _) in CONTROLS.items():
        add_case(graph, name, mine)
    run(server, graph)
    return server, samplers, schedulers, info


def test_offers_every_comfyui_sampler_and_scheduler(sweep):
    _, samplers, schedulers, info = sweep
    req = info["QwenPixSampler"]["input"]["required"]
    assert req["sampler_name"][0] == samplers
    assert set(schedulers) <= set(req["schedule"][0])
    assert req["cfg"][1]["min"] == 0.0
    assert {"sigmas", "rescale_strength"} <= set(info["QwenPixSampler"]["input"]["optional"])


def test_every_sampler_is_comfyuis(sweep):
    comfy, samplers, _, _ = sweep
    for s in samplers:
        same(comfy, f"ours_{s}", f"ksampler_{s}")
    differs(comfy, "ours_euler", "ours_euler_ancestral")


def test_every_scheduler_is_comfyuis(sweep):
    comfy, _, schedulers, _ = sweep
    for sch in schedulers:
        same(comfy, f"ours_sch_{sch}", f"ksampler_sch_{sch}")
    differs(comfy, "ours_sch_simple", "ours_sch_karras")


@pytest.mark.parametrize("case", list(PAIRS))
def test_equals_the_native_graph(sweep, case):
    same(sweep[0], f"{case}_ours", f"{case}_native")


@pytest.mark.parametrize("case", list(CONTROLS))
def test_official_extras_change_the_result(sweep, case):
    differs(sweep[0], case, CONTROLS[case][1])


def warnings(res) -> list[str]:
    return [e["data"]["message"] for e in res.events if e["type"] == "qwenpix.warning"]


@pytest.mark.parametrize(
    "case, nodes, fragment",
    [
        ("flux_guidance", {"g": node("FluxGuidance", conditioning=["pos", 0], guidance=3.5), "s": ours(pos="g")},
         "'guidance'"),
        ("pag", {"m": node("PerturbedAttentionGuidance", model=["dit", 0], scale=2.0), "s": ours(model="m")},
         "attn1"),
        ("sigmas", {"sig": node("BasicScheduler", model=["ms", 0], scheduler="simple", steps=2, denoise=1.0),
                    "s": ours(sigmas=["sig", 0])}, "sigmas connected"),
        ("shift_replaced", {"s": ours(model="ms", shift=2.5)}, "set shift to 0"),
        ("inpaint_conditioning", {"c": node("QwenPixTestSetCondKey", conditioning=["pos", 0], key="concat_mask",
                                            value="1", as_float=True), "s": ours(pos="c")}, "'concat_mask'"),
    ],
)  # fmt: skip
def test_what_is_not_honoured_is_said(server, client, case, nodes, fragment):
    graph = base()
    add_case(graph, f"warn_{case}", nodes)
    res = client.run(graph, timeout=600)
    assert res.status == "success", res.error()
    said = warnings(res)
    assert any(fragment in m for m in said), said
    quiet = client.run({**base(), **{"q_s": ours(), "q_d": node("QwenPixTestDumpLatent", samples=["q_s", 0],
                                                                       name="quiet")}}, timeout=600)  # fmt: skip
    assert quiet.status == "success" and warnings(quiet) == []  # a plain graph says nothing


def test_torch_compile_model_applies(server):
    """TorchCompileModel (inductor) compiles our MODEL's diffusion model: KSampler gives the eager result
    (to inductor's reordering of float32 sums; on CPU the compile takes about half a minute)."""
    import shutil

    if shutil.which("g++") is None and shutil.which("gcc") is None:
        pytest.skip("inductor needs a C++ compiler on CPU")
    graph = base()
    graph["c"] = node("TorchCompileModel", model=["ms", 0], backend="inductor")
    add_case(graph, "compiled", {"k": ks(model="c")})
    add_case(graph, "eager", {"k": ks(model="ms")})
    run(server, graph)
    a, b = load(server, "compiled"), load(server, "eager")
    assert np.abs(a - b).max() <= 1e-4 * max(1.0, float(np.abs(b).max()))


def test_cond_and_uncond_run_as_one_pass(server, client):
    """With prompts of different lengths (7 and 3 tokens) and CFG, each step is one call of the DiT on both rows,
    through our sampler and through KSampler alike; cfg 1 runs the positive alone. Under the "ComfyUI native"
    positions the batching is ComfyUI's own (the rows of different lengths run apart), as on ComfyUI's model."""
    graph = base()
    graph["native_pos"] = node("QwenPixDiTLoader", dit_name=DIT, compute_dtype="fp32", positions="ComfyUI native")
    runs = {
        "ours_cfg": ("dit", lambda m: ours(model=m)),
        "ksampler_cfg": ("dit", lambda m: ks(model=m)),
        "ours_cfg1": ("dit", lambda m: ours(model=m, cfg=1.0)),
        "ours_native_positions": ("native_pos", lambda m: ours(model=m)),
    }
    for name, (model, sampler) in runs.items():
        graph[f"{name}_m"] = node("QwenPixTestCountCalls", model=[model, 0], name=name)
        if "ksampler" in name:
            graph[f"{name}_m2"] = node("ModelSamplingAuraFlow", model=[f"{name}_m", 0], shift=3.1)
            graph[f"{name}_s"] = sampler(f"{name}_m2")
        else:
            graph[f"{name}_s"] = sampler(f"{name}_m")
        graph[f"{name}_r"] = node("QwenPixTestReportCalls", samples=[f"{name}_s", 0], name=name)
    res = client.run(graph, timeout=600)
    assert res.status == "success", res.error()
    calls = {name: res.outputs[f"{name}_r"]["calls"][0] for name in runs}
    assert calls == {
        "ours_cfg": [2, 2],
        "ksampler_cfg": [2, 2],
        "ours_cfg1": [1, 1],
        "ours_native_positions": [1, 1, 1, 1],
    }, calls


def test_native_qwen_edit_encode_conditioning(server, tiny_comfy_vae):
    """TextEncodeQwenImageEditPlus (ComfyUI's own node; a stand-in CLIP gives the embeddings) with its VAE-encoded
    reference drives our MODEL through our sampler and KSampler alike, and the reference changes the result."""
    graph = base()
    graph.update({
        "clip": node("QwenPixTestFakeClip", dim=DIM),
        "vae": node("VAELoader", vae_name=tiny_comfy_vae),
        "image": node("QwenPixTestImage", kind="rgb", width=64, height=48, seed=9),
        "edit": node("TextEncodeQwenImageEditPlus", clip=["clip", 0], prompt="make it blue", vae=["vae", 0],
                     image1=["image", 0]),
        "plain": node("TextEncodeQwenImageEditPlus", clip=["clip", 0], prompt="make it blue"),
    })  # fmt: skip
    add_case(graph, "edit_ours", {"s": ours(pos="edit")})
    add_case(graph, "edit_ksampler", {"k": ks(pos="edit")})
    add_case(graph, "edit_without_reference", {"s": ours(pos="plain")})
    run(server, graph)
    same(server, "edit_ours", "edit_ksampler")
    differs(server, "edit_ours", "edit_without_reference")


def test_foreign_conditioning_in_ksampler_is_named(server, client):
    """A conditioning of another width reaching our MODEL through KSampler: a clear error, then a good prompt."""
    graph = base()
    graph["wide"] = node("QwenPixTestConditioning", seed=4, tokens=5, dim=DIM + 8)
    add_case(graph, "foreign", {"k": ks(pos="wide")})
    res = client.run(graph, timeout=600)
    assert res.status == "error"
    assert f"takes [B, tokens, {DIM}]" in res.error()["exception_message"], res.error()
    graph = base()
    add_case(graph, "after_foreign", {"k": ks()})
    assert client.run(graph, timeout=600).status == "success"
