"""Qwen-Image-2.1 through a real ComfyUI server (issue 17, part D): its loaders, Encode (prompt + references),
Sampler and Decode run a text-to-image graph and an edit graph with 2 references (one RGBA), each equal to
the core pipeline (`QwenImage21Pipeline.generate` / `edit`) on the same tiny files; wrong inputs are named."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from graphs import fails
from native_graphs import node
from oracles import TOKENIZER
from qwen_image_core.formats.vae21 import load_vae21
from qwen_image_core.qwen21 import QwenImage21Pipeline, load_dit21, load_qwen3_vl
from tools.checkpoints import dit as WD1
from tools.checkpoints import dit21 as WD
from tools.checkpoints import qwen3_vl as WQ
from tools.checkpoints import vae21 as WV

pytestmark = pytest.mark.e2e

DIT, V1_DIT = "qwen_image_2.1_e2e.safetensors", "qwen_image_v1_for_21_e2e.safetensors"
TE, VAE = "qwen_3_vl_e2e.safetensors", "qwen_image_2.1_vae_e2e.safetensors"
TOL = 1e-5  # max |graph - core| over the image
PROMPT, NEGATIVE = "a red fox in the snow", "blurry"
EDIT_PROMPT = "put the cat of <image2> into <image1>"
REFS = (("rgb", 270, 250, 11), ("rgba", 250, 262, 12))  # (kind, width, height, seed): not multiples of 32


def write_models21(models_dir, tmp, names=(DIT, V1_DIT, TE, VAE), dit_dtype=torch.bfloat16) -> QwenImage21Pipeline:
    """Tiny 2.1 DiT, Qwen3-VL, 2.1 VAE and a v1 DiT (for the refusals) written under `names` into the server's
    models folder; returns the core pipeline on the same files."""
    dit_name, v1_name, te_name, vae_name = names
    te = WQ.reference_model(seed=0)
    WQ.write_single(models_dir / "text_encoders" / te_name, te, layout="comfy")  # Comfy-Org's names, as the VAE's
    cfg = WD.tiny_config(text_dim=te.config.text_config.hidden_size)
    WD.write_comfy(models_dir / "diffusion_models" / dit_name, cfg, dtype=dit_dtype)
    WD1.write_comfy(models_dir / "diffusion_models" / v1_name, WD1.tiny_config())
    shutil.copyfile(WV.write_vae21(tmp, "comfy"), models_dir / "vae" / vae_name)
    dit = load_dit21(models_dir / "diffusion_models" / dit_name)
    encoder = load_qwen3_vl(models_dir / "text_encoders" / te_name, tokenizer=TOKENIZER)
    return QwenImage21Pipeline(dit, load_vae21(models_dir / "vae" / vae_name), encoder)


@pytest.fixture(scope="module")
def models21(comfy, tmp_path_factory):
    return write_models21(comfy.models_dir, tmp_path_factory.mktemp("qwen21_e2e"))


def test_image(kind, width, height, seed) -> torch.Tensor:
    """QwenPixTestImage's picture [H, W, C], regenerated here."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, height, width, 4 if kind == "rgba" else 3, generator=g)[0]


test_image.__test__ = False  # a helper, not a test


def graph(prompt=PROMPT, refs=(), dit=DIT, loader="QwenPix21DiTLoader", steps=2, cfg=2.0, seed=7):
    g = {
        "dit": node(loader, dit_name=dit, compute_dtype="fp32"),
        "te": node("QwenPix21TextEncoderLoader", text_encoder_name=TE),
        "vae": node("QwenPix21VAELoader", vae_name=VAE),
        "enc": node(
            "QwenPix21Encode",
            text_encoder=["te", 0],
            vae=["vae", 0],
            prompt=prompt,
            negative_prompt=NEGATIVE,
            width=64,
            height=96,
            resize="pad",
            resolution=1024,
            rgba=False,
        ),
        "sample": node(
            "QwenPix21Sampler",
            dit=["dit", 0],
            conditioning=["enc", 0],
            latent=["enc", 1],
            seed=seed,
            steps=steps,
            cfg=cfg,
            schedule="dynamic",
        ),
        "decode": node("QwenPix21Decode", vae=["vae", 0], samples=["sample", 0]),
        "dump": node("QwenPixTestDumpImage", images=["decode", 0], name="qwen21_image"),
        "mask": node("MaskToImage", mask=["decode", 1]),
        "dump_mask": node("QwenPixTestDumpImage", images=["mask", 0], name="qwen21_mask"),
    }
    for i, (kind, w, h, s) in enumerate(refs, 1):
        g[f"img{i}"] = node("QwenPixTestImage", kind=kind, width=w, height=h, seed=s)
        g["enc"]["inputs"][f"image{i}"] = [f"img{i}", 0]
    return g


def run_and_load(comfy, client, prompt, said: list | None = None):
    res = client.run(prompt, timeout=300)
    assert res.status == "success", (res.error() or {}).get("exception_message")
    if said is not None:
        said += [e["data"]["message"] for e in res.events if e["type"] == "qwenpix.warning"]
    out = comfy.output_dir
    return np.load(out / "qwen21_image.npy"), np.load(out / "qwen21_mask.npy")[..., 0]


def assert_same(image, mask, core: torch.Tensor):
    want = core[0].permute(1, 2, 0).numpy()  # [H, W, 4]
    assert image.shape == (1, *want.shape[:2], 3)
    err = float(np.abs(image[0] - want[..., :3]).max())
    print(f"\nmax |graph - core| = {err:.3g}")
    assert err <= TOL
    np.testing.assert_allclose(mask[0], 1.0 - want[..., 3], atol=TOL)


def test_text_to_image_equals_the_core(models21, comfy, client):
    said = []
    image, mask = run_and_load(comfy, client, graph(), said)
    assert said == []  # a plain graph says nothing
    core = models21.generate(PROMPT, NEGATIVE, width=64, height=96, steps=2, cfg_scale=2.0, seed=7)
    assert_same(image, mask, core)


def test_edit_with_two_references_equals_the_core(models21, comfy, client):
    image, mask = run_and_load(comfy, client, graph(EDIT_PROMPT, REFS))
    refs = [test_image(*r) for r in REFS]
    core = models21.edit(EDIT_PROMPT, refs, NEGATIVE, steps=2, cfg_scale=2.0, seed=7)
    assert core.shape[-2:] == (250, 270)  # image1's own size: padded to 288x256, cropped back
    assert_same(image, mask, core)


def test_official_resize_and_rgba_prompt_equal_the_core(models21, comfy, client):
    prompt = graph("remove the background of <image1>", REFS[1:])
    prompt["enc"]["inputs"].update(resize="official", resolution=256, rgba=True)
    image, mask = run_and_load(comfy, client, prompt)
    ref = test_image(*REFS[1])
    core = models21.edit("remove the background of <image1>", [ref], NEGATIVE, resize="official", resolution=256,
                         steps=2, cfg_scale=2.0, seed=7, rgba=True)  # fmt: skip
    assert core.shape[-2:] != ref.shape[:2]  # resampled, not cropped back
    assert_same(image, mask, core)


def test_eleven_references_are_refused(models21, client):
    prompt = graph(refs=[("rgb", 32, 32, i) for i in range(11)])
    fails(client, prompt, "enc", "image11", "at most 10 references")


def test_v1_dit_with_the_21_encoder_is_named(models21, client):
    prompt = graph(dit=V1_DIT, loader="QwenPixDiTLoader")
    prompt["dit"]["inputs"]["positions"] = "official (diffusers)"
    fails(client, prompt, "sample", "dit: a native MODEL", "not a Qwen-Image-2.1", "Load Qwen-Image-2.1 Diffusion")


def test_v1_vae_in_the_21_encode_is_named(models21, client, tiny_comfy_vae):
    prompt = graph()
    prompt["vae1"] = node("QwenPixVAELoader", vae_name=tiny_comfy_vae)
    prompt["enc"]["inputs"]["vae"] = ["vae1", 0]
    fails(client, prompt, "enc", "vae: a Qwen-Image v1 VAE", "Load Qwen-Image-2.1 VAE")


def test_21_dit_in_the_v1_loader_names_the_21_loader(models21, client):
    prompt = graph(loader="QwenPixDiTLoader")
    prompt["dit"]["inputs"]["positions"] = "official (diffusers)"
    fails(client, prompt, "dit", "Qwen-Image-2.1", "Load Qwen-Image-2.1 Diffusion Model")


def test_turbo_schedule_equals_the_core(models21, comfy, client):
    prompt = graph(steps=8, cfg=1.0)
    prompt["sample"]["inputs"]["schedule"] = "turbo"
    said = []
    image, mask = run_and_load(comfy, client, prompt, said)
    core = models21.generate(PROMPT, width=64, height=96, steps=8, cfg_scale=1.0, seed=7, schedule="turbo")
    assert_same(image, mask, core)
    assert any("negative_prompt: not used with cfg 1" in m for m in said), said  # said, not silently dropped


def test_turbo_with_other_steps_is_named(models21, client):
    prompt = graph(steps=5, cfg=1.0)
    prompt["sample"]["inputs"]["schedule"] = "turbo"
    fails(client, prompt, "sample", "schedule:", "8 steps", "steps to 8")


def test_a_batched_latent_is_named(models21, client):
    prompt = graph()
    prompt["batch"] = node("RepeatLatentBatch", samples=["enc", 1], amount=2)
    prompt["sample"]["inputs"]["latent"] = ["batch", 0]
    fails(client, prompt, "sample", "latent: a batch of 2", "one picture per run")


def test_example_workflows_use_declared_inputs(client):
    """tools/workflows/qwen21.py's graphs: every node exists and every input it sets is one the node declares."""
    from tools.workflows import qwen21 as workflow_qwen21  # noqa: PLC0415

    info = client.object_info()
    for name, (_note, g) in workflow_qwen21.graphs().items():
        for key, (cls, inputs, *_) in g.items():
            assert cls in info, f"{name}.{key}: no node {cls}"
            declared = {**info[cls]["input"].get("required", {}), **info[cls]["input"].get("optional", {})}
            assert set(inputs) <= set(declared), f"{name}.{key}: {sorted(set(inputs) - set(declared))}"
        assert name in workflow_qwen21.TITLES


def test_encode_and_decode_report_progress(models21, client):
    """ComfyUI's progress bar for the 2.1 Encode (vision blocks once for the pictures, then text layers per prompt)
    and Decode (per decoder stage), as for v1's nodes."""
    res = client.run(graph("a progress check with <image1>", REFS[:1], seed=8), timeout=300)
    assert res.status == "success", (res.error() or {}).get("exception_message")

    def progress(node_id):
        return [
            (e["data"]["value"], e["data"]["max"])
            for e in res.events
            if e.get("type") == "progress" and e["data"].get("node") == node_id
        ]

    def runs(total):
        return [(i, total) for i in range(1, total + 1)]

    vl = models21.encoder.model  # Qwen3VL: `.visual.blocks`, `.model.layers`
    # the picture through the vision tower once, then the prompt's and the negative prompt's rows
    assert progress("enc") == runs(len(vl.visual.blocks)) + runs(len(vl.model.layers)) * 2
    decode = progress("decode")
    assert decode == runs(decode[-1][1]) and decode[-1][1] >= 2  # untiled: one report per decoder stage
    assert progress("sample") == runs(2)
