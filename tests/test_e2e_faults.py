"""Faults through the real ComfyUI server: loaded models are shared between prompts (loaded once), and an
interrupt, out-of-memory or error at any stage leaves the shared model exactly as it was.

The test node QwenPixTestFault interrupts between nodes, or from a one-shot forward pre-hook at the DiT's k-th call
(the model's check between blocks then raises), or raises out-of-memory / an error inside a step. QwenPixTestSink
reports the model's identity, its hooks and a checksum of its weights. LoRA patches live on the layers while
their MODEL is the one ComfyUI has loaded (as ComfyUI's own patches do), so after every fault a plain run (no
LoRA) must give exactly what a plain run gave before any fault.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from conftest import TEST_PACK
from graphs import sampler_node, sink
from tools.checkpoints.smoke import write_smoke
from tools.comfy_harness import ComfyClient, ComfyServer

pytestmark = pytest.mark.e2e
DIT, TE, LORA = "qp_fault_dit.safetensors", "qp_fault_te.safetensors", "qp_fault_lora.safetensors"
VAE_A, OTHER_VAE = "qp_fault_vae_a.safetensors", "qp_fault_other_vae.safetensors"


@pytest.fixture(scope="module")
def files(comfy, tiny_comfy_vae):
    m = comfy.models_dir
    write_smoke("diffusion_models", m / "diffusion_models" / DIT)
    write_smoke("text_encoders", m / "text_encoders" / TE)
    write_smoke("loras", m / "loras" / LORA)
    write_smoke("vae", m / "vae" / OTHER_VAE)
    write_smoke("vae", m / "vae" / VAE_A)
    return {"vae": tiny_comfy_vae}


def dit_loader(dtype="fp32"):
    return {"class_type": "QwenPixDiTLoader", "inputs": {"dit_name": DIT, "compute_dtype": dtype}}


def run(client, prompt, status="success"):
    res = client.run(prompt, timeout=300)
    assert res.status == status, res.error()
    return res


def info(res, node="out"):
    return res.outputs[node]["sink"][0]


def loads_logged(server, kind: str, name: str, what: str = "loading") -> int:
    log = server.log_path.read_text(errors="replace")
    return len(re.findall(rf"QwenPix: {what} {kind} .*{re.escape(name)}", log))


def test_same_model_from_two_prompts_is_loaded_once(comfy, client, files):
    first = info(run(client, {"dit": dit_loader("fp32"), "out": sink(("dit", 0))}))
    # other loader inputs (so ComfyUI's own cache cannot answer), two loaders in one prompt
    res = run(client, {"a": dit_loader("auto"), "b": dit_loader("bf16"), "x": sink(("a", 0)), "y": sink(("b", 0))})
    assert info(res, "x")["model_id"] == info(res, "y")["model_id"] == first["model_id"]
    assert loads_logged(comfy, "DiT", DIT) == 1
    # a bounded cache: besides what ComfyUI still holds, one model per kind is kept (VAE A, A, B, A: A loaded twice)
    for i, name in enumerate((VAE_A, VAE_A, OTHER_VAE, VAE_A)):
        run(client, {"m": {"class_type": "QwenPixVAELoader", "inputs": {"vae_name": name}}, "out": sink(("m", 0), i)})
    assert (loads_logged(comfy, "VAE", VAE_A), loads_logged(comfy, "VAE", OTHER_VAE)) == (2, 1)


def test_with_comfy_cache_off_a_second_prompt_reuses_the_models(tmp_path):
    """With --cache-none ComfyUI runs every loader again for each prompt; the models are still loaded once."""
    server = ComfyServer(tmp_path / "nocache", extra_packs=(TEST_PACK,))
    server.prepare()
    write_smoke("diffusion_models", server.models_dir / "diffusion_models" / DIT)
    write_smoke("text_encoders", server.models_dir / "text_encoders" / TE)
    write_smoke("vae", server.models_dir / "vae" / VAE_A)
    server.start(extra_args=("--cache-none",))
    try:
        c = ComfyClient(server.url).connect()
        try:
            prompt = {
                "dit": dit_loader(),
                "te": {"class_type": "QwenPixTextEncoderLoader", "inputs": {"text_encoder_name": TE}},
                "vae": {"class_type": "QwenPixVAELoader", "inputs": {"vae_name": VAE_A}},
                **{f"x{n}": sink((n, 0)) for n in ("dit", "te", "vae")},
            }
            ids = [{n: info(run(c, prompt), f"x{n}")["model_id"] for n in ("dit", "te", "vae")} for _ in range(2)]
        finally:
            c.close()
        assert ids[0] == ids[1]
        for kind, name in (("DiT", DIT), ("text encoder", TE), ("VAE", VAE_A)):
            assert loads_logged(server, kind, name) == 1, kind
            assert loads_logged(server, kind, name, "reusing the loaded") >= 1, kind
    finally:
        server.stop()


def test_a_changed_file_is_loaded_again(comfy, client, files):
    path = comfy.models_dir / "diffusion_models" / "qp_fault_changing.safetensors"
    write_smoke("diffusion_models", path)

    def load(dtype, salt):  # another compute_dtype each time, so ComfyUI's own cache cannot answer
        loader = {"class_type": "QwenPixDiTLoader", "inputs": {"dit_name": path.name, "compute_dtype": dtype}}
        return info(run(client, {"dit": loader, "out": sink(("dit", 0), salt)}))

    one, two = load("fp32", 1), load("auto", 2)
    assert two["model_id"] == one["model_id"] and loads_logged(comfy, "DiT", path.name) == 1
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # as if replaced by a new download
    three = load("bf16", 3)
    assert loads_logged(comfy, "DiT", path.name) == 2 and three["weights_sum"] == one["weights_sum"]


def graph(fault_on: str, fault: str, call: int = 1, salt: int = 0, name: str = "fault_run") -> dict:
    """t2i with a LoRA, 3 steps at 32x32; a fault node on `fault_on` ('pos' encode, 'dit' steps, 's' decode)."""
    nodes = {
        "dit": dit_loader(),
        "lora": {"class_type": "QwenPixLoraLoader", "inputs": {"dit": ["dit", 0], "lora_name": LORA, "strength": 0.8}},
        "te": {"class_type": "QwenPixTextEncoderLoader", "inputs": {"text_encoder_name": TE}},
        "pos": {"class_type": "QwenPixTextEncode", "inputs": {"text_encoder": ["te", 0], "prompt": "a red boat"}},
        "neg": {"class_type": "QwenPixTextEncode", "inputs": {"text_encoder": ["te", 0], "prompt": " "}},
        "lat": {
            "class_type": "QwenPixEmptyLatent",
            "inputs": {"aspect": "custom", "width": 32, "height": 32, "batch_size": 1},
        },
        "vae": {"class_type": "QwenPixVAELoader", "inputs": {"vae_name": "qp_fault_other_vae.safetensors"}},
    }
    src = {"pos": ["pos", 0], "dit": ["lora", 0], "s": ["s", 0]}
    nodes["f"] = {
        "class_type": "QwenPixTestFault",
        "inputs": {"value": src[fault_on], "fault": fault, "call": call, "salt": salt},
    }
    wired = {k: (["f", 0] if k == fault_on else v) for k, v in src.items()}
    nodes["s"] = sampler_node(wired["dit"], ("lat", 0), wired["pos"], seed=5, steps=3, cfg=2.5)
    nodes["dec"] = {
        "class_type": "QwenPixDecode",
        "inputs": {"vae": ["vae", 0], "samples": wired["s"], "tiling": "off", "tile_size": 512, "overlap": 64},
    }
    nodes["dump"] = {"class_type": "QwenPixTestDumpImage", "inputs": {"images": ["dec", 0], "name": name}}
    nodes["inspect"] = sink(("dit", 0), salt)  # the shared model behind the loader, after the run
    return nodes


# (stage, fault node on, fault, call, expected status)
FAULTS = [
    ("after_encode", "pos", "interrupt_now", 1, "interrupted"),
    ("step_1", "dit", "interrupt_at_call", 1, "interrupted"),
    ("step_2", "dit", "interrupt_at_call", 2, "interrupted"),
    ("step_3", "dit", "interrupt_at_call", 3, "interrupted"),
    ("before_decode", "s", "interrupt_now", 1, "interrupted"),
    ("oom_in_step_2", "dit", "oom_at_call", 2, "error"),
    ("error_in_step_1", "dit", "error_at_call", 1, "error"),
]


def plain(salt: int, name: str) -> dict:
    """t2i without the LoRA, 2 steps: what the shared model gives when nothing is patched."""
    nodes = graph("pos", "none", salt=salt, name=name)
    nodes["s"]["inputs"]["dit"] = ["dit", 0]
    nodes["s"]["inputs"]["steps"] = 2
    del nodes["lora"]
    return nodes


def test_faults_at_every_stage_leave_the_model_as_it_was(comfy, client, files):
    reference = run(client, plain(0, "fault_plain_reference"))
    fresh = run(client, graph("pos", "none", name="fault_fresh"))
    base = info(fresh, "inspect")
    assert base["hooks"] == 0 and info(reference, "inspect")["weights_sum"] == base["weights_sum"]
    for salt, (stage, on, fault, call, status) in enumerate(FAULTS, start=1):
        res = run(client, graph(on, fault, call, salt), status)
        if status == "error":  # (an interrupt at step k stops before step k is reported)
            kind = "OutOfMemoryError" if fault.startswith("oom") else "RuntimeError"
            assert res.error()["exception_type"].endswith(kind), (stage, res.error())
        else:
            steps = [e["data"]["value"] for e in res.events if e["type"] == "progress" and e["data"]["node"] == "s"]
            expected = {"after_encode": [], "before_decode": [1, 2, 3]}.get(stage, list(range(1, call)))
            assert steps == expected, (stage, steps)
        after = info(run(client, {"dit": dit_loader(), "out": sink(("dit", 0), 1000 + salt)}))
        drop = lambda d: {k: v for k, v in d.items() if k != "lora_layers"}  # noqa: E731
        assert drop(after) == drop({**base, "handle_loras": 0}), (stage, after)  # same model, no hooks, same weights
        run(client, plain(salt, f"fault_plain_{salt}"))
        a, b = (np.load(comfy.output_dir / f"{n}.npy") for n in ("fault_plain_reference", f"fault_plain_{salt}"))
        assert np.array_equal(a, b), stage  # no patch of the LoRA run (or of its fault) leaks into a plain run
    run(client, graph("pos", "none", salt=999, name="fault_again"))
    a, b = (np.load(comfy.output_dir / f"{n}.npy") for n in ("fault_fresh", "fault_again"))
    assert np.array_equal(a, b)
