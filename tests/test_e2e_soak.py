"""Soak: 50 prompts queued over the HTTP API on tiny models (text-to-image with and without a LoRA, edits, some
interrupted, some invalid before or during execution). Every valid prompt completes, every invalid one fails
cleanly with its message, the server stays up, and its resident memory after the first 10 grows by less than 5%.
"""

from __future__ import annotations

import psutil
import pytest

from graphs import sampler_node
from tools.checkpoints.smoke import write_smoke
from tools.comfy_harness import PromptRejected

pytestmark = pytest.mark.e2e
DIT, TE, LORA = "qp_soak_dit.safetensors", "qp_soak_te.safetensors", "qp_soak_lora.safetensors"
BROKEN = "qp_soak_truncated.safetensors"
TOTAL, WARMUP = 50, 10


@pytest.fixture(scope="module")
def files(comfy, tiny_comfy_vae):
    m = comfy.models_dir
    dit = write_smoke("diffusion_models", m / "diffusion_models" / DIT)
    write_smoke("text_encoders", m / "text_encoders" / TE)
    write_smoke("loras", m / "loras" / LORA)
    data = dit.read_bytes()
    (m / "diffusion_models" / BROKEN).write_bytes(data[: len(data) // 3])
    return {"vae": tiny_comfy_vae}


def prompt_for(i: int, vae: str) -> tuple[str, dict]:
    """(kind, API prompt) of the i-th soak prompt; every prompt differs (seed, text) so each one really runs."""
    kind = {3: "rejected", 5: "interrupted", 7: "failing"}.get(i % 10, "generate" if i % 2 == 0 else "edit")
    width = {"rejected": 0, "failing": 40}.get(kind, 32)
    nodes = {
        "dit": {"class_type": "QwenPixDiTLoader", "inputs": {"dit_name": DIT, "compute_dtype": "fp32"}},
        "te": {"class_type": "QwenPixTextEncoderLoader", "inputs": {"text_encoder_name": TE}},
        "vae": {"class_type": "QwenPixVAELoader", "inputs": {"vae_name": vae}},
        "neg": {"class_type": "QwenPixTextEncode", "inputs": {"text_encoder": ["te", 0], "prompt": " "}},
        "lat": {
            "class_type": "QwenPixEmptyLatent",
            "inputs": {"aspect": "custom", "width": width, "height": 32, "batch_size": 1},
        },
    }
    model, positive, latent = ["dit", 0], ["pos", 0], ["lat", 0]
    if kind == "edit":
        nodes["img"] = {
            "class_type": "QwenPixTestImage",
            "inputs": {"kind": "rgb", "width": 48, "height": 32, "seed": i},
        }
        nodes["pos"] = {
            "class_type": "QwenPixEditEncode",
            "inputs": {
                "text_encoder": ["te", 0],
                "vae": ["vae", 0],
                "prompt": f"paint it blue, take {i}",
                "image1": ["img", 0],
                "variant": "edit_plus (2509 / 2511)",
                "resize": "keep size (no shift/zoom)",
            },
        }
        latent = ["pos", 1]
    else:
        nodes["pos"] = {
            "class_type": "QwenPixTextEncode",
            "inputs": {"text_encoder": ["te", 0], "prompt": f"a red boat number {i}"},
        }
    if kind in ("generate", "interrupted") and i % 4 == 0 or kind == "interrupted":
        nodes["lora"] = {
            "class_type": "QwenPixLoraLoader",
            "inputs": {"dit": ["dit", 0], "lora_name": LORA, "strength": 0.5},
        }
        model = ["lora", 0]
    if kind == "interrupted":
        nodes["f"] = {
            "class_type": "QwenPixTestFault",
            "inputs": {"value": model, "fault": "interrupt_at_call", "call": 2, "salt": i},
        }
        model = ["f", 0]
    nodes["s"] = sampler_node(model, latent, positive, seed=i, steps=2, cfg=2.0)
    nodes["dec"] = {
        "class_type": "QwenPixDecode",
        "inputs": {"vae": ["vae", 0], "samples": ["s", 0], "tiling": "off", "tile_size": 512, "overlap": 64},
    }
    nodes["save"] = {"class_type": "SaveImage", "inputs": {"images": ["dec", 0], "filename_prefix": f"soak/{i:02d}"}}
    return kind, nodes


def submit(client, i: int, vae: str, queued: dict, outcomes: dict) -> None:
    kind, prompt = prompt_for(i, vae)
    try:
        queued[client.queue(prompt)] = (i, kind)
    except PromptRejected as e:
        errors = e.body["node_errors"]["lat"]["errors"]
        outcomes[i] = (kind, "rejected", errors[0]["message"])


def finish(client, queued: dict, outcomes: dict) -> None:
    for pid, (i, kind) in list(queued.items()):
        res = client.wait(pid, timeout=300)
        err = res.error()
        outcomes[i] = (kind, res.status, err and f"{err['node_type']}: {err['exception_message']}")
        if kind in ("generate", "edit"):
            assert len(res.images()) == 1, (i, kind, res.status, err)
        del queued[pid]


def test_soak_fifty_prompts(comfy, client, files):
    server = psutil.Process(comfy.proc.pid)
    queued, outcomes = {}, {}
    for i in range(WARMUP):
        submit(client, i, files["vae"], queued, outcomes)
    finish(client, queued, outcomes)
    rss_warm = server.memory_info().rss
    for i in range(WARMUP, TOTAL):  # all queued at once, as a service would
        submit(client, i, files["vae"], queued, outcomes)
    finish(client, queued, outcomes)
    rss_end = server.memory_info().rss

    assert sorted(outcomes) == list(range(TOTAL))
    expected = {"generate": "success", "edit": "success", "interrupted": "interrupted", "failing": "error"}
    expected["rejected"] = "rejected"
    wrong = {i: o for i, o in outcomes.items() if o[1] != expected[o[0]]}
    assert not wrong, wrong
    for kind, _, message in outcomes.values():
        if kind == "failing":
            assert message.startswith("QwenPixEmptyLatent: width 40 is not a multiple of 16"), message
        if kind == "rejected":
            assert "smaller than min" in message.lower(), message
    counts = {k: sum(o[0] == k for o in outcomes.values()) for k in expected}
    assert counts == {"generate": 25, "edit": 10, "interrupted": 5, "failing": 5, "rejected": 5}
    assert comfy.proc.poll() is None and client.get("/system_stats")["system"]  # still up and answering
    growth = rss_end / rss_warm - 1
    print(
        f"\nserver RSS after {WARMUP}: {rss_warm / 2**20:.0f} MiB, after {TOTAL}: {rss_end / 2**20:.0f} MiB "
        f"({growth:+.2%})"
    )
    assert growth < 0.05
