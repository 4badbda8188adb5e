"""Progress bars through the real ComfyUI server: the text encoder (per layer), the VAE (per tile, or per decoder stage
untiled) and the loaders (per tensor read) send ComfyUI "progress" messages of their own node to the websocket,
and an interrupt during each stops it there: no further progress, the prompt ends as interrupted.

Interrupts are raised deterministically inside the server: QwenPixTestCallCounter at the k-th layer / tile forward,
QwenPixTestInterruptAtProgress at the k-th progress report of the loader linked after it.
"""

from __future__ import annotations

import itertools

import pytest

from tools.checkpoints import qwen_vl as Q
from tools.checkpoints.vae import write_vae

pytestmark = pytest.mark.e2e
TE = "qp_progress_te.safetensors"  # 8 text layers, loaded only by this module
LAYERS = 8
VAE = "qp_progress_a/qwen_image_vae.safetensors"  # loaded only by this module
VAE_LOAD_STOPPED = "qp_progress_b/qwen_image_vae.safetensors"  # its first load is interrupted
SALT = itertools.count(1)


@pytest.fixture(scope="module")
def files(comfy):
    sd = Q.legacy_state_dict(Q.reference_model(seed=0, text={"num_hidden_layers": LAYERS}))
    Q.write_comfy_single(comfy.models_dir / "text_encoders" / TE, sd, lm_head=False)
    for name in (VAE, VAE_LOAD_STOPPED):
        write_vae(comfy.models_dir / "vae" / name.split("/")[0], "comfy", base_dim=16)


def progress(res, node: str) -> list[tuple[int, int]]:
    """(value, max) of the "progress" messages of `node` in this prompt, in order."""
    return [
        (e["data"]["value"], e["data"]["max"])
        for e in res.events
        if e.get("type") == "progress" and e["data"].get("node") == node
    ]


def runs(total: int) -> list[tuple[int, int]]:
    return [(i, total) for i in range(1, total + 1)]


def run(client, prompt, status):
    res = client.run(prompt, timeout=300)
    assert res.status == status, res.error()
    return res


def sink(value):
    return {"class_type": "QwenPixTestSink", "inputs": {"value": list(value), "salt": next(SALT)}}


def counter(value, target, at, mode="interrupt_at"):
    inputs = {"value": list(value), "target": target, "mode": mode, "at": at, "salt": next(SALT)}
    return {"class_type": "QwenPixTestCallCounter", "inputs": inputs}


def te_loader(name=TE):
    return {"class_type": "QwenPixTextEncoderLoader", "inputs": {"text_encoder_name": name}}


def vae_loader(name=VAE):
    return {"class_type": "QwenPixVAELoader", "inputs": {"vae_name": name}}


def text_encode(src):
    prompt = f"a quiet lake {next(SALT)}"  # a new prompt each time: the embedding cache would skip the layers
    return {"class_type": "QwenPixTextEncode", "inputs": {"text_encoder": list(src), "prompt": prompt}}


def decode(src, tiling):  # 256 px in 128 px tiles overlapping by 32: 3 x 3 tiles; untiled: 4 decoder stages
    lat = {"class_type": "QwenPixTestLatent", "inputs": {"seed": next(SALT), "width": 256, "height": 256}}
    dec = {"vae": list(src), "samples": ["lat", 0], "tiling": tiling, "tile_size": 128, "overlap": 32}
    return {"lat": lat, "dec": {"class_type": "QwenPixDecode", "inputs": dec}, "out": sink(("dec", 0))}


def assert_load_progress(steps: list[tuple[int, int]]) -> None:
    assert steps, "the loader sent no progress"
    total = steps[0][1]
    assert all(t == total for _, t in steps) and len(steps) <= 101
    values = [v for v, _ in steps]
    assert values == sorted(set(values)) and 0 < values[-1] <= total


def test_progress_of_load_text_encode_and_vae(comfy, client, files):
    res = run(client, {"te": te_loader(), "enc": text_encode(("te", 0)), "out": sink(("enc", 0))}, "success")
    assert_load_progress(progress(res, "te"))  # the text encoder's load, per tensor read
    assert progress(res, "enc") == runs(LAYERS)  # one report per text layer
    res = run(client, {"vae": vae_loader(), **decode(("vae", 0), "on")}, "success")
    assert_load_progress(progress(res, "vae"))
    assert progress(res, "dec") == runs(9)  # one report per tile; the stages inside tiles are not reported
    res = run(client, {"vae": vae_loader(), **decode(("vae", 0), "off")}, "success")
    assert progress(res, "vae") == []  # loaded already (ComfyUI's cache): no load
    assert progress(res, "dec") == runs(4)  # untiled: per decoder stage


def test_interrupt_stops_text_encode_vae_tiles_and_load(comfy, client, files):
    prompt = {"te": te_loader(), "c": counter(("te", 0), "text_layers", 3), "enc": text_encode(("c", 0))}
    res = run(client, {**prompt, "out": sink(("enc", 0))}, "interrupted")
    assert progress(res, "enc") == runs(LAYERS)[:2]  # interrupted in layer 3: its report is not sent, no more
    run(client, {"te": te_loader(), "r": counter(("te", 0), "text_layers", 1, "report")}, "success")  # unhook

    prompt = {"vae": vae_loader(), "c": counter(("vae", 0), "vae_decoder", 2), **decode(("c", 0), "on")}
    res = run(client, prompt, "interrupted")
    assert progress(res, "dec") == runs(9)[:1]  # interrupted in tile 2
    run(client, {"vae": vae_loader(), "r": counter(("vae", 0), "vae_decoder", 1, "report")}, "success")

    arm = {"class_type": "QwenPixTestInterruptAtProgress", "inputs": {"value": VAE_LOAD_STOPPED, "at": 3}}
    arm["inputs"]["salt"] = next(SALT)
    loader = {"class_type": "QwenPixVAELoader", "inputs": {"vae_name": ["arm", 0]}}
    res = run(client, {"arm": arm, "vae": loader, "out": sink(("vae", 0))}, "interrupted")
    steps = progress(res, "vae")
    total = steps[0][1]
    unit = -(-total // 100)  # tensors per report (at most 100 reports per file)
    assert steps == [(unit, total), (2 * unit, total)]  # interrupted at the 3rd report: not loaded further
    res = run(client, {"vae": vae_loader(VAE_LOAD_STOPPED), "out": sink(("vae", 0))}, "success")
    loaded = progress(res, "vae")  # nothing half-loaded was kept: the next prompt loads the whole file
    assert_load_progress(loaded)
    assert loaded[-1] == (total, total)
