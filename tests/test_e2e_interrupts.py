"""Interrupts inside a node through the real ComfyUI server: the text encoder stops between layers (and vision blocks),
the VAE between tiles and decoder / encoder stages, so an interrupt does not wait for the node to finish.

QwenPixTestCallCounter counts the forward calls of the layers (or tiles) and raises ComfyUI's interrupt flag at
the k-th; the interrupted prompt must stop at exactly k calls of the n the node would run, and afterwards the
model is unchanged (same weights, no hooks left) and a good prompt succeeds.
"""

from __future__ import annotations

import itertools

import pytest

from tools.checkpoints import qwen_vl as Q

pytestmark = pytest.mark.e2e
TE = "qp_int_te.safetensors"  # 8 text layers, 8 vision blocks
SALT = itertools.count(1)


@pytest.fixture(scope="module")
def files(comfy, tiny_comfy_vae):
    sd = Q.legacy_state_dict(Q.reference_model(seed=0, text={"num_hidden_layers": 8}))
    Q.write_comfy_single(comfy.models_dir / "text_encoders" / TE, sd, lm_head=False)
    return {"vae": tiny_comfy_vae}


def counter(value, target, mode="interrupt_at", at=1):
    inputs = {"value": list(value), "target": target, "mode": mode, "at": at, "salt": next(SALT)}
    return {"class_type": "QwenPixTestCallCounter", "inputs": inputs}


def te_loader():
    return {"class_type": "QwenPixTextEncoderLoader", "inputs": {"text_encoder_name": TE}}


def vae_loader(files):
    return {"class_type": "QwenPixVAELoader", "inputs": {"vae_name": files["vae"]}}


def report(client, loader: dict, target: str) -> dict:
    """The calls counted since the counter was set on `target`; removes its hooks; adds the weights' checksum."""
    res = client.run({"m": loader, "r": counter(("m", 0), target, "report")}, timeout=300)
    assert res.status == "success", res.error()
    return res.outputs["r"]["counter"][0]


def run(client, prompt, status):
    res = client.run(prompt, timeout=300)
    assert res.status == status, res.error()
    return res


def text_encode(text, src=("te", 0)):
    return {"class_type": "QwenPixTextEncode", "inputs": {"text_encoder": list(src), "prompt": text}}


def edit_encode(src=("te", 0), images=1):
    inputs = {"text_encoder": list(src), "vae": ["vae", 0], "prompt": f"make it blue {next(SALT)}"}
    inputs.update(variant="edit_plus (2509 / 2511)", resize="keep size (no shift/zoom)")
    inputs.update({f"image{i}": ["img", 0] for i in range(1, images + 1)})
    return {"class_type": "QwenPixEditEncode", "inputs": inputs}


def image_node(width=112, height=112):
    return {"class_type": "QwenPixTestImage", "inputs": {"kind": "rgb", "width": width, "height": height, "seed": 1}}


def test_interrupt_between_text_encoder_layers(comfy, client, files):
    base = report(client, te_loader(), "text_layers")
    prompt = {
        "te": te_loader(),
        "c": counter(("te", 0), "text_layers", at=3),
        "enc": text_encode("a quiet lake", ("c", 0)),
    }
    run(client, {**prompt, "out": sink(("enc", 0))}, "interrupted")
    after = report(client, te_loader(), "text_layers")
    assert after["calls"] == 3  # of 8: stopped before the 4th layer, not at the end of the node
    assert after["hooks"] == 0 and after["weights_sum"] == base["weights_sum"]
    good = run(client, {"te": te_loader(), "enc": text_encode("a quiet lake"), "out": sink(("enc", 0))}, "success")
    assert good.outputs["out"]["sink"][0]["finite"]


def test_interrupt_between_vision_blocks_and_in_the_edit_vae_encodes(comfy, client, files):
    base = report(client, te_loader(), "vision_blocks")
    nodes = {"te": te_loader(), "vae": vae_loader(files), "img": image_node()}
    # vision: interrupted at block 2 of 8, the language model never runs
    c = {"cv": counter(("te", 0), "vision_blocks", at=2), "ct": counter(("cv", 0), "text_layers", at=10000)}
    run(client, {**nodes, **c, "enc": edit_encode(("ct", 0)), "out": sink(("enc", 0))}, "interrupted")
    assert report(client, te_loader(), "vision_blocks")["calls"] == 2
    assert report(client, te_loader(), "text_layers")["calls"] == 0
    # the references' VAE encodes: interrupted in the first of three
    c = {"cvae": counter(("vae", 0), "vae_encoder", at=1)}
    enc = edit_encode(images=3)
    enc["inputs"]["vae"] = ["cvae", 0]
    run(client, {**nodes, **c, "enc": enc, "out": sink(("enc", 1))}, "interrupted")
    assert report(client, vae_loader(files), "vae_encoder")["calls"] == 1
    assert report(client, te_loader(), "vision_blocks")["weights_sum"] == base["weights_sum"]
    good = run(client, {**nodes, "enc": edit_encode(images=3), "out": sink(("enc", 1))}, "success")
    assert good.outputs["out"]["sink"][0]["shape"] == [1, 16, 1, 14, 14]


def decode(files, tiling, counted=None, width=256):
    lat = {"aspect": "custom", "width": width, "height": width, "batch_size": 1}
    src = ["c", 0] if counted else ["vae", 0]
    nodes = {
        "vae": vae_loader(files),
        "lat": {"class_type": "QwenPixEmptyLatent", "inputs": lat},
        "dec": {
            "class_type": "QwenPixDecode",
            "inputs": {"vae": src, "samples": ["lat", 0], "tiling": tiling, "tile_size": 128, "overlap": 32},
        },
        "out": sink(("dec", 0)),
    }
    if counted:
        nodes["c"] = counter(("vae", 0), counted[0], at=counted[1])
    return nodes


def test_interrupt_between_vae_tiles_and_stages(comfy, client, files):
    base = report(client, vae_loader(files), "vae_decoder")
    run(client, decode(files, "on", ("vae_decoder", 2)), "interrupted")
    assert report(client, vae_loader(files), "vae_decoder")["calls"] == 2  # of 9 tiles (256 px in 128 px tiles)
    run(client, decode(files, "off", ("vae_decoder_stages", 1)), "interrupted")
    assert report(client, vae_loader(files), "vae_decoder_stages")["calls"] == 1  # of 4 decoder stages
    img = {"img": image_node(256, 256)}
    enc = {"class_type": "QwenPixEncode", "inputs": {"vae": ["c", 0], "image": ["img", 0], "tiling": "on"}}
    enc["inputs"].update(tile_size=128, overlap=32)
    prompt = {"vae": vae_loader(files), **img, "c": counter(("vae", 0), "vae_encoder", at=1), "e": enc}
    run(client, {**prompt, "out": sink(("e", 0))}, "interrupted")
    assert report(client, vae_loader(files), "vae_encoder")["calls"] == 1  # of 9 tiles
    after = report(client, vae_loader(files), "vae_decoder")
    assert after["hooks"] == 0 and after["weights_sum"] == base["weights_sum"]
    good = run(client, decode(files, "on"), "success")
    assert good.outputs["out"]["sink"][0]["type"] == "Tensor"


def sink(value):
    return {"class_type": "QwenPixTestSink", "inputs": {"value": list(value), "salt": next(SALT)}}
