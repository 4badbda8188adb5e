"""Model files through the real ComfyUI server: corrupt safetensors headers are named in every loader, and files that
change on disk between or during prompts never crash the server or leave stale weights in use.

The file-change cases run against models that ComfyUI caches across prompts (the same loader inputs each time; only
the dump node's name changes, so without change detection ComfyUI would answer from its cache): a truncation in
place, a same-size overwrite with other weights (with the old mtime put back), a replacement by rename, a deletion,
and a truncation of every model file while a long sampling run uses them. Each bad case is followed by a good prompt.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from graphs import fails, sampler_node
from tools.checkpoints import dit as D
from tools.checkpoints import lora as L
from tools.checkpoints import qwen_vl as Q
from tools.checkpoints import vae as V
from tools.checkpoints.smoke import dit_config
from tools.comfy_harness import PromptRejected

pytestmark = pytest.mark.e2e
DIT, TE, VAE, LORA = (f"qp_file_{k}.safetensors" for k in ("dit", "te", "vae", "lora"))
DUMP = itertools.count(1)
LOADERS = {  # kind -> (class, input, models folder)
    "dit": ("QwenPixDiTLoader", "dit_name", "diffusion_models"),
    "te": ("QwenPixTextEncoderLoader", "text_encoder_name", "text_encoders"),
    "vae": ("QwenPixVAELoader", "vae_name", "vae"),
    "lora": ("QwenPixLoraLoader", "lora_name", "loras"),
}


# -- files: version 0 (the smoke weights) and a same-size version 1 with other weights, per kind
def write(kind: str, path: Path, version: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "dit":
        return D.write_comfy(path, dit_config(), seed=version)
    if kind == "te":
        sd = Q.legacy_state_dict(Q.reference_model(seed=version))
        return Q.write_comfy_single(path, {k: v for k, v in sd.items() if not k.startswith("lm_head.")})
    if kind == "vae":
        return V.write_vae(path.parent / f".vae{version}", "comfy", base_dim=16, seed=version).rename(path)
    return L.write_lora(path, dit_config(), "lightx2v", rank=4, alpha=4.0, seed=version, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def files(comfy):
    m = comfy.models_dir
    paths = {k: write(k, m / LOADERS[k][2] / name) for k, name in zip(LOADERS, (DIT, TE, VAE, LORA), strict=True)}
    for k in LOADERS:  # pristine copies to restore from
        shutil.copyfile(paths[k], comfy.base_dir / f"pristine_{k}.safetensors")
    return paths


def restore(comfy, kind: str, path: Path) -> None:
    shutil.copyfile(comfy.base_dir / f"pristine_{kind}.safetensors", path)


# -- graphs
def t2i(dump: str, steps: int = 1, names: dict | None = None, text: str = "a red boat") -> dict:
    """DiT + LoRA + text encoder + VAE: `steps` at 32x32 and a decode, dumped exactly as `dump`.npy."""
    n = {"dit": DIT, "te": TE, "vae": VAE, "lora": LORA, **(names or {})}
    lora = {"dit": ["dit", 0], "lora_name": n["lora"], "strength": 1.0}
    latent = {"aspect": "custom", "width": 32, "height": 32, "batch_size": 1}
    return {
        "dit": {"class_type": "QwenPixDiTLoader", "inputs": {"dit_name": n["dit"], "compute_dtype": "fp32"}},
        "lora": {"class_type": "QwenPixLoraLoader", "inputs": lora},
        "te": {"class_type": "QwenPixTextEncoderLoader", "inputs": {"text_encoder_name": n["te"]}},
        "pos": {"class_type": "QwenPixTextEncode", "inputs": {"text_encoder": ["te", 0], "prompt": text}},
        "neg": {"class_type": "QwenPixTextEncode", "inputs": {"text_encoder": ["te", 0], "prompt": " "}},
        "lat": {"class_type": "QwenPixEmptyLatent", "inputs": latent},
        "s": sampler_node(("lora", 0), ("lat", 0), seed=7, steps=steps, cfg=2.5),
        "vae": {"class_type": "QwenPixVAELoader", "inputs": {"vae_name": n["vae"]}},
        "dec": {
            "class_type": "QwenPixDecode",
            "inputs": {"vae": ["vae", 0], "samples": ["s", 0], "tiling": "off", "tile_size": 512, "overlap": 64},
        },
        "dump": {"class_type": "QwenPixTestDumpImage", "inputs": {"images": ["dec", 0], "name": dump}},
    }  # fmt: skip


def image(comfy, client, names: dict | None = None, steps: int = 1) -> np.ndarray:
    name = f"qp_file_{next(DUMP)}"
    res = client.run(t2i(name, steps, names), timeout=300)
    assert res.status == "success", res.error()
    return np.load(comfy.output_dir / f"{name}.npy")


def logged(comfy, pattern: str) -> int:
    return len(re.findall(pattern, comfy.log_path.read_text(errors="replace")))


# -- corrupt headers, in every loader
def rewrite_header(src: Path, dst: Path, defect: str) -> str:
    """dst = src with one structural defect in its JSON header (the data bytes unchanged); returns the tensor hit."""
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    spans = sorted(
        (v["data_offsets"], k)
        for k, v in header.items()
        if k != "__metadata__" and v["shape"] and v["data_offsets"][1] > v["data_offsets"][0]
    )
    (a_off, a), (b_off, b) = spans[0], spans[1]
    if defect == "header_list":
        header = [v for k, v in header.items() if k != "__metadata__"]
    elif defect == "entry_list":
        header[a] = header[a]["data_offsets"]
    elif defect == "no_offsets":
        del header[a]["data_offsets"]
    elif defect == "reversed":
        header[a]["data_offsets"] = a_off[::-1]
    elif defect == "byte_count":
        header[a]["shape"] = [header[a]["shape"][0] + 1, *header[a]["shape"][1:]]
    elif defect == "overlap":  # b moved onto a, same byte count
        header[b]["data_offsets"] = [a_off[0], a_off[0] + b_off[1] - b_off[0]]
    elif defect == "metadata_list":
        header["__metadata__"] = ["format", "pt"]
    elif defect == "dtype_number":
        header[a]["dtype"] = 16
    text = json.dumps(header).encode()
    dst.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return a if defect != "overlap" else b


DEFECTS = {  # defect -> what the message must say besides the file, the input and the fix
    "header_list": ("the header is a list, not an object of tensors",),
    "entry_list": ("is a list, expected an object with dtype, shape, data_offsets",),
    "no_offsets": ("has no data_offsets",),
    "reversed": ("are reversed",),
    "byte_count": ("bytes, but",),
    "overlap": ("overlap",),
    "metadata_list": ("__metadata__ is a list, expected an object of string -> string",),
    "dtype_number": ("dtype is the number 16, expected a string",),
}


def loader_prompt(kind: str, name: str) -> dict:
    cls, inp, _ = LOADERS[kind]
    inputs = {inp: name, **({"compute_dtype": "fp32"} if kind == "dit" else {})}
    nodes = {"x": {"class_type": cls, "inputs": inputs}}
    if kind == "lora":
        nodes["dit"] = {"class_type": "QwenPixDiTLoader", "inputs": {"dit_name": DIT, "compute_dtype": "fp32"}}
        nodes["x"]["inputs"].update(dit=["dit", 0], strength=1.0)
    nodes["out"] = {"class_type": "QwenPixTestSink", "inputs": {"value": ["x", 0], "salt": next(DUMP)}}
    return nodes


@pytest.mark.parametrize("kind", list(LOADERS))
def test_corrupt_headers_are_named_in_every_loader(comfy, client, files, kind):
    _, inp, folder = LOADERS[kind]
    for defect, fragments in DEFECTS.items():
        name = f"qp_file_bad_{defect}.safetensors"
        tensor = rewrite_header(files[kind], comfy.models_dir / folder / name, defect)
        msg = fails(client, loader_prompt(kind, name), "x", f"{inp} '{name}'", "corrupt safetensors header", *fragments)
        assert "Fix:" in msg and (defect in ("header_list", "metadata_list") or f"'{tensor}'" in msg), msg
        res = client.run(loader_prompt(kind, files[kind].name), timeout=300)  # the same loader, a good file
        assert res.status == "success", res.error()
    image(comfy, client)


# -- files that change between prompts
def test_changed_dit_file_between_prompts(comfy, client, files):
    path = files["dit"]
    before = image(comfy, client)
    assert np.array_equal(image(comfy, client), before)  # ComfyUI's cache answers: loaded once
    other = write("dit", comfy.models_dir / "diffusion_models" / "qp_file_dit_v1.safetensors", version=1)
    expected = image(comfy, client, {"dit": other.name})  # what the other weights give
    assert not np.array_equal(expected, before)

    # same-size overwrite in place, old mtime put back (as `cp -p` would): ctime still tells
    st = path.stat()
    data = other.read_bytes()
    assert len(data) == st.st_size
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    changed = logged(comfy, rf"QwenPix: DiT .*{DIT} changed on disk")
    assert np.array_equal(image(comfy, client), expected)  # reloaded: the new weights, never the stale ones
    assert logged(comfy, rf"QwenPix: DiT .*{DIT} changed on disk") == changed + 1

    # truncated in place: refused with the reader's message
    with open(path, "r+b") as f:
        f.truncate(st.st_size // 2)
    fails(client, t2i("qp_file_cut"), "dit", f"dit_name '{DIT}'", "truncated", "download it again", "Fix:")
    image(comfy, client, {"dit": other.name})

    # replaced by rename (a finished download moved over it)
    restore(comfy, "dit", comfy.models_dir / "diffusion_models" / "qp_file_dit.partial")
    os.replace(comfy.models_dir / "diffusion_models" / "qp_file_dit.partial", path)
    assert np.array_equal(image(comfy, client), before)

    # deleted: ComfyUI's list no longer offers it, or (if queued before the list refreshed) the loader says so
    os.remove(path)
    try:
        fails(client, t2i("qp_file_gone"), "dit", f"dit_name '{DIT}'", "no such file")
    except PromptRejected as e:
        errors = e.body["node_errors"]["dit"]["errors"]
        assert any(DIT in f"{x['message']} {x['details']}" and "not in" in x["details"] for x in errors), errors
    restore(comfy, "dit", path)
    assert np.array_equal(image(comfy, client), before)


@pytest.mark.parametrize("kind", ["te", "vae", "lora"])
def test_changed_files_of_the_other_loaders(comfy, client, files, kind):
    path = files[kind]
    before = image(comfy, client)
    other = write(kind, comfy.models_dir / LOADERS[kind][2] / f"qp_file_{kind}_v1.safetensors", version=1)
    expected = image(comfy, client, {kind: other.name})
    assert not np.array_equal(expected, before)
    assert other.stat().st_size == path.stat().st_size
    with open(path, "r+b") as f:  # same size, in place
        f.write(other.read_bytes())
    assert np.array_equal(image(comfy, client), expected)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1000)
    node = "lora" if kind == "lora" else kind
    fails(client, t2i(f"qp_file_cut_{kind}"), node, f"{LOADERS[kind][1]} '{path.name}'", "truncated", "Fix:")
    restore(comfy, kind, path)
    assert np.array_equal(image(comfy, client), before)


def test_files_truncated_while_a_prompt_uses_them(comfy, client, files):
    """Weights live in process memory: a run in progress finishes with them (the old mmap design died of SIGBUS
    here); the next prompt sees the damage and says so; with the files restored it computes the same image."""
    steps = 30
    prompt_id = client.queue(t2i("qp_file_during", steps))  # a graph not run before: nothing of it is cached
    progress = lambda: [e for e in client.events_for(prompt_id) if e["type"] == "progress" and e["data"]["node"] == "s"]
    deadline = time.monotonic() + 120
    while not progress() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert progress(), "the sampler never reported a step"
    for path in files.values():
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 3)
    cut_at = max(e["data"]["value"] for e in progress())
    res = client.wait(prompt_id, timeout=300)
    assert res.status == "success", res.error()
    assert cut_at < steps and max(e["data"]["value"] for e in progress()) == steps  # cut while it ran
    assert client.get("/system_stats")  # the server is alive
    during = np.load(comfy.output_dir / "qp_file_during.npy")
    res = client.run(t2i("qp_file_after_cut", steps), timeout=300)
    assert res.status == "error" and "truncated" in res.error()["exception_message"], res.error()
    assert res.error()["node_id"] in LOADERS, res.error()
    for kind, path in files.items():
        restore(comfy, kind, path)
    assert np.array_equal(image(comfy, client, steps=steps), during)  # it used the weights it started with
