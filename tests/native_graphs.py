"""Graph builders and result checks shared by the native-MODEL end-to-end tests (API format; links are
[node id, slot]). Each case is built twice by `twin`: side "o" on our loader, side "n" on ComfyUI's UNETLoader;
the last node of each side is dumped to <case>_<side>.npy by a test node."""

from __future__ import annotations

import numpy as np

from tools.comfy_harness import ComfyClient

JOINT_DIM = 3584  # the text width ComfyUI's Qwen-Image DiT is built with
TOL = 1e-4


def node(class_type, **inputs):
    return {"class_type": class_type, "inputs": inputs}


def cond(seed, tokens):
    return node("QwenPixTestConditioning", seed=seed, tokens=tokens, dim=JOINT_DIM)


def ksampler(model, sampler="euler", scheduler="simple", steps=2, cfg=4.0, seed=5, denoise=1.0, pos="pos",
             neg="neg", lat="lat"):  # fmt: skip
    return node("KSampler", model=[model, 0], seed=seed, steps=steps, cfg=cfg, sampler_name=sampler,
                scheduler=scheduler, positive=[pos, 0], negative=[neg, 0], latent_image=[lat, 0],
                denoise=denoise)  # fmt: skip


def models(file, shift=3.1, positions="ComfyUI native", prefix=""):
    """Our loader and UNETLoader on one file, each behind ModelSamplingAuraFlow(shift): nodes <prefix>o_load,
    <prefix>n_load, <prefix>o_ms, <prefix>n_ms."""
    p = prefix
    return {
        f"{p}o_load": node("QwenPixDiTLoader", dit_name=file, compute_dtype="fp32", positions=positions),
        f"{p}n_load": node("UNETLoader", unet_name=file, weight_dtype="default"),
        f"{p}o_ms": node("ModelSamplingAuraFlow", model=[f"{p}o_load", 0], shift=shift),
        f"{p}n_ms": node("ModelSamplingAuraFlow", model=[f"{p}n_load", 0], shift=shift),
    }


def common(width=64, height=64):
    return {"pos": cond(1, 9), "neg": cond(2, 4), "lat": node("EmptySD3LatentImage", width=width, height=height,
                                                              batch_size=1)}  # fmt: skip


def add_case(graph: dict, name: str, nodes: dict) -> None:
    """Add `nodes` to the graph under the prefix `name_` (links between them follow), dumping the last as <name>."""
    for key, value in nodes.items():
        graph[f"{name}_{key}"] = _prefixed(value, f"{name}_", nodes)
    graph[f"{name}_dump"] = node("QwenPixTestDumpLatent", samples=[f"{name}_{list(nodes)[-1]}", 0], name=name)


def twin(graph: dict, name: str, build) -> None:
    """Add `build(side)` for both sides (side "o" = ours, "n" = native), dumped as <name>_o and <name>_n."""
    for side in ("o", "n"):
        add_case(graph, f"{name}_{side}", build(side))


def _prefixed(value: dict, prefix: str, local: dict) -> dict:
    """A node whose links to other nodes of the same build get the build's prefix."""
    inputs = {k: ([prefix + v[0], v[1]] if isinstance(v, list) and v and v[0] in local else v)
              for k, v in value["inputs"].items()}  # fmt: skip
    return {"class_type": value["class_type"], "inputs": inputs}


def load(comfy, name):
    return np.load(comfy.output_dir / f"{name}.npy")


def close(comfy, name) -> float:
    """Relative max difference of ours vs native for a case (asserted <= TOL)."""
    a, b = load(comfy, f"{name}_o"), load(comfy, f"{name}_n")
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.isfinite(a).all() and np.isfinite(b).all()
    err = float(np.abs(a - b).max() / max(1.0, float(np.abs(b).max())))
    print(f"\n{name}: ours vs native max rel diff {err:.2e}")
    return err


def same(comfy, a, b) -> float:
    """Max difference of two cases' outputs, asserted <= 1e-5 relative to max(1, max |b|)."""
    x, y = load(comfy, a), load(comfy, b)
    assert x.shape == y.shape and np.isfinite(x).all()
    d = float(np.abs(x - y).max())
    assert d <= 1e-5 * max(1.0, float(np.abs(y).max())), f"{a} vs {b}: {d:.3g}"
    return d


def differs(comfy, a, b, at_least=1e-3) -> float:
    x, y = load(comfy, a), load(comfy, b)
    d = float(np.abs(x - y).max())
    assert d > at_least, f"{a} and {b} should differ, max diff {d:.2e}"
    return d


def run(comfy, prompt):
    """Run a prompt on a client of its own (module fixtures cannot use the per-test `client`)."""
    client = ComfyClient(comfy.url).connect()
    try:
        prompt_id, errors = client.queue_checked(prompt)
        assert not errors, f"ComfyUI refused part of the graph (it would run the rest): {errors}"
        res = client.wait(prompt_id, timeout=1500)
    finally:
        client.close()
    assert res.status == "success", res.error()
    return res


def format_cases(file: str, text_dim: int, lora: str) -> dict[str, dict]:
    """One DiT file through our sampler, KSampler and both LoRA loaders (tiny, 2 steps): {case: nodes}."""
    load_ = {"dit": node("QwenPixDiTLoader", dit_name=file, compute_dtype="fp32")}
    inputs = {
        "pos": node("QwenPixTestConditioning", seed=1, tokens=7, dim=text_dim),
        "neg": node("QwenPixTestConditioning", seed=2, tokens=3, dim=text_dim),
        "lat": node("EmptySD3LatentImage", width=64, height=48, batch_size=1),
    }
    ours = node("QwenPixSampler", dit=["dit", 0], positive=["pos", 0], negative=["neg", 0], latent_image=["lat", 0],
                seed=5, steps=2, cfg=4.0, sampler_name="euler", schedule="shift (ComfyUI workflows)", shift=3.1,
                cfg_rescale="none", denoise=1.0)  # fmt: skip

    def shifted_ksampler(model):
        return {"ms": node("ModelSamplingAuraFlow", model=[model, 0], shift=3.1), "k": ksampler("ms", lat="lat")}

    return {
        "sampler": {**load_, **inputs, "s": ours},
        "ksampler": {**load_, **inputs, **shifted_ksampler("dit")},
        "our_lora": {**load_, **inputs, "l": node("QwenPixLoraLoader", dit=["dit", 0], lora_name=lora, strength=0.8),
                     **shifted_ksampler("l")},
        "native_lora": {**load_, **inputs, "l": node("LoraLoaderModelOnly", model=["dit", 0], lora_name=lora,
                                                     strength_model=0.8), **shifted_ksampler("l")},
    }  # fmt: skip


def packed_equals_its_twin(comfy, tag: str, packed: str, twin: str, text_dim: int, lora: str):
    """Run `format_cases` on a packed file and on its float32 twin (the same weights dequantised): every case
    equal within 1e-5; our sampler = KSampler; the LoRA does something; both LoRA loaders agree. Returns the
    prompt's result (for the loader's UI line)."""
    graph = {}
    for side, file in (("packed", packed), ("twin", twin)):
        for name, nodes in format_cases(file, text_dim, lora).items():
            add_case(graph, f"{tag}_{name}_{side}", nodes)
    res = run(comfy, graph)
    outs = {}
    for name in format_cases(packed, text_dim, lora):
        diff = same(comfy, f"{tag}_{name}_packed", f"{tag}_{name}_twin")
        print(f"\n{tag} {name}: packed vs its float32 twin, max diff {diff:.3g}")
        outs[name] = load(comfy, f"{tag}_{name}_packed")
    assert np.abs(outs["sampler"] - outs["ksampler"]).max() <= 1e-5  # our sampler = KSampler on the shift schedule
    assert np.abs(outs["our_lora"] - outs["ksampler"]).max() > 1e-3  # the LoRA does something
    assert np.abs(outs["our_lora"] - outs["native_lora"]).max() <= 1e-5  # both LoRA loaders agree
    return res
