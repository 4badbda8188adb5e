"""The pack inside a real ComfyUI server: registered nodes, served web extension, a graph that runs."""

from __future__ import annotations

import urllib.request

import pytest
from PIL import Image

from tools.comfy_harness import PACK_NAME

pytestmark = pytest.mark.e2e


def test_nodes_registered_with_tooltips(client):
    info = client.object_info()
    ours = {name: spec for name, spec in info.items() if spec["python_module"] == f"custom_nodes.{PACK_NAME}"}
    assert all(name.startswith("QwenPix") for name in ours)
    assert "QwenPixEmptyLatent" in ours
    for name, spec in ours.items():
        assert spec["category"].startswith("QwenPix"), name
        for group in ("required", "optional"):
            for inp, (_, *opts) in spec["input"].get(group, {}).items():
                assert opts and opts[0].get("tooltip"), f"{name}.{inp} has no tooltip"
    for name in ours:  # a help page per node, served where the frontend looks for it
        with urllib.request.urlopen(f"{client.url}/extensions/{PACK_NAME}/docs/{name}.md") as r:
            assert r.status == 200 and r.read().startswith(b"# ")
    # no clash with ComfyUI's own node ids
    assert not any(n.startswith("QwenPix") for n in info if info[n]["python_module"] in ("nodes", "comfy_extras"))


def test_web_extension_served(comfy, client):
    exts = client.get("/extensions")
    ours = [e for e in exts if e.startswith(f"/extensions/{PACK_NAME}/")]
    assert f"/extensions/{PACK_NAME}/qwenpix.js" in ours
    with urllib.request.urlopen(comfy.url + ours[0]) as r:
        assert r.status == 200 and b"registerExtension" in r.read()


def test_trivial_graph_writes_png(comfy, client, tiny_comfy_vae):
    prompt = {
        "1": {
            "class_type": "QwenPixEmptyLatent",
            "inputs": {"aspect": "custom", "width": 64, "height": 48, "batch_size": 1},
        },
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": tiny_comfy_vae}},
        "3": {"class_type": "VAEDecode", "inputs": {"samples": ["1", 0], "vae": ["2", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "foundation/trivial"}},
    }
    res = client.run(prompt, timeout=120)
    assert res.status == "success", res.error()
    (img,) = res.images()
    path = comfy.output_dir / img["subfolder"] / img["filename"]
    with Image.open(path) as im:
        assert im.size == (64, 48)
    kinds = [e["type"] for e in res.events]
    assert "executing" in kinds and "execution_success" in kinds
