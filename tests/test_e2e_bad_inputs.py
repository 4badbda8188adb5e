"""Bad inputs through the real ComfyUI server: each fails with a message naming the input and the fix (ComfyUI adds
the node id and type), and the next good prompt succeeds.

Covered: truncated / corrupt / pickle files; files of other model families given to every loader; a LoRA made for
another model; sizes that are not multiples of 16, zero or huge; batches beyond memory; empty and very long
prompts; grayscale, gray+alpha, RGBA, float16, 16-bit PNG and 1x1 edit images; more references than the variant
takes; an fp16 run that overflows; model names outside ComfyUI's model folders.
"""

from __future__ import annotations

import itertools
import shutil
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from graphs import TEXT_DIM, cond, fails, latent, sampler_node, sink
from tools.checkpoints import dit as D
from tools.checkpoints import lora as L
from tools.checkpoints.smoke import dit_config, write_smoke
from tools.checkpoints.vae import write_vae
from tools.comfy_harness import PACK_NAME, PromptRejected

pytestmark = pytest.mark.e2e
DIT, TE, LORA = "qp_bad_good_dit.safetensors", "qp_bad_good_te.safetensors", "qp_bad_good_lora.safetensors"
SALT = itertools.count(1)


def _tiny(shape=(4, 4)) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.bfloat16)


# files of other families: just the keys that identify them (readers look at names and shapes first)
FOREIGN = {
    "flux": {
        "double_blocks.0.img_attn.qkv.weight": _tiny(),
        "img_in.weight": _tiny(),
        "txt_in.weight": _tiny(),
        "final_layer.linear.weight": _tiny(),
    },
    "sdxl": {
        "model.diffusion_model.input_blocks.0.0.weight": _tiny(),
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": _tiny(),
        "first_stage_model.decoder.conv_in.weight": _tiny(),
    },
    "wan_video": {
        "model.diffusion_model.blocks.0.self_attn.q.weight": _tiny(),
        "model.diffusion_model.patch_embedding.weight": _tiny(),
        "model.diffusion_model.head.head.weight": _tiny(),
    },
}
# what each loader's message must say the file is (lowercase fragments)
LOOKS_LIKE = {
    "flux": "flux",
    "sdxl": "stable diffusion",
    "wan_video": "wan",
    "lora": "lora",
    "vae": "vae",
    "dit": "dit",
}
LOADERS = {  # class -> (input, models folder)
    "QwenPixDiTLoader": ("dit_name", "diffusion_models"),
    "QwenPixTextEncoderLoader": ("text_encoder_name", "text_encoders"),
    "QwenPixVAELoader": ("vae_name", "vae"),
    "QwenPixLoraLoader": ("lora_name", "loras"),
}
# the file kinds each loader must refuse (never its own)
CASES = [
    (loader, kind)
    for loader in LOADERS
    for kind in ("flux", "sdxl", "wan_video", "lora", "vae", "dit")
    if (loader, kind) not in {("QwenPixLoraLoader", "lora"), ("QwenPixVAELoader", "vae"), ("QwenPixDiTLoader", "dit")}
]


@pytest.fixture(scope="module")
def files(comfy, tiny_comfy_vae, tmp_path_factory):
    m = comfy.models_dir
    good_dit = write_smoke("diffusion_models", m / "diffusion_models" / DIT)
    write_smoke("text_encoders", m / "text_encoders" / TE)
    write_smoke("loras", m / "loras" / LORA)
    tmp = tmp_path_factory.mktemp("bad")
    vae_file = write_vae(tmp / "vae", "comfy", base_dim=16)
    lora_file = write_smoke("loras", tmp / "lora.safetensors")
    for folder in LOADERS.values():
        d = m / folder[1]
        for kind, tensors in FOREIGN.items():
            save_file(tensors, str(d / f"qp_bad_{kind}.safetensors"))
        for kind, src in (("lora", lora_file), ("vae", vae_file), ("dit", good_dit)):
            if not (d / f"qp_bad_{kind}.safetensors").exists():
                shutil.copyfile(src, d / f"qp_bad_{kind}.safetensors")
    data = good_dit.read_bytes()
    (m / "diffusion_models" / "qp_bad_truncated.safetensors").write_bytes(data[: len(data) // 2])
    (m / "diffusion_models" / "qp_bad_corrupt.safetensors").write_bytes(
        struct.pack("<Q", 11) + b"{not json!}" + bytes(64)
    )
    torch.save({"img_in.weight": torch.zeros(2)}, m / "diffusion_models" / "qp_bad_pickle.ckpt")
    # a LoRA made for a wider DiT: same layer names, other shapes
    L.write_lora(m / "loras" / "qp_bad_other_model_lora.safetensors", D.tiny_config(num_heads=4), "lightx2v")
    # a DiT whose output projection overflows float16
    sd = load_file(str(good_dit))
    sd["proj_out.weight"] = (sd["proj_out.weight"].float() * 1e5).to(sd["proj_out.weight"].dtype)
    save_file(sd, str(m / "diffusion_models" / "qp_bad_overflow_dit.safetensors"), D.config_metadata(dit_config()))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 65535, (40, 56), dtype=np.uint16)).save(comfy.input_dir / "qp_16bit.png")
    return {"vae": tiny_comfy_vae}


# -- graphs
def sampler(dit=("dit", 0), lat=("lat", 0), pos=("pos", 0), neg=("neg", 0), seed=0, steps=1, cfg=2.0):
    return sampler_node(dit, lat, pos, neg, seed=seed, steps=steps, cfg=cfg)


def dit_loader(name=DIT, dtype="fp32"):
    return {"class_type": "QwenPixDiTLoader", "inputs": {"dit_name": name, "compute_dtype": dtype}}


def good_prompt(files) -> dict:
    """Load, sample one step and decode: fresh each time (a new seed), so ComfyUI's cache cannot answer it."""
    return {
        "dit": dit_loader(),
        "pos": cond(1),
        "neg": cond(2, 3),
        "lat": latent(),
        "s": sampler(seed=next(SALT)),
        "vae": {"class_type": "QwenPixVAELoader", "inputs": {"vae_name": files["vae"]}},
        "dec": {
            "class_type": "QwenPixDecode",
            "inputs": {"vae": ["vae", 0], "samples": ["s", 0], "tiling": "off", "tile_size": 512, "overlap": 64},
        },
        "out": sink(("dec", 0)),
    }


def rejected(client, prompt, node: str, *fragments: str) -> None:
    """A prompt ComfyUI must refuse before queueing, with the fragments in the node's errors."""
    with pytest.raises(PromptRejected) as info:
        client.queue(prompt)
    errors = info.value.body["node_errors"][node]["errors"]
    text = " ".join(f"{e['message']} {e['details']}" for e in errors)
    for f in fragments:
        assert f.lower() in text.lower(), f"{f!r} not in: {text}"


def then_good(client, files) -> None:
    res = client.run(good_prompt(files), timeout=300)
    assert res.status == "success", res.error()


# -- files
@pytest.mark.parametrize(
    "name, fragments",
    [
        ("qp_bad_truncated.safetensors", ("truncated", "download it again")),
        ("qp_bad_corrupt.safetensors", ("corrupt safetensors header",)),
        ("qp_bad_pickle.ckpt", ("pickle", "refused", ".safetensors version")),
    ],
    ids=["truncated", "corrupt", "pickle"],
)
def test_unreadable_dit_file(client, files, name, fragments):
    fails(client, {"dit": dit_loader(name), "out": sink(("dit", 0))}, "dit", f"dit_name '{name}'", "Fix:", *fragments)
    then_good(client, files)


@pytest.mark.parametrize("loader, kind", CASES, ids=[f"{c[0].removeprefix('QwenPix')}-{c[1]}" for c in CASES])
def test_file_of_another_family(client, files, loader, kind):
    inp, _ = LOADERS[loader]
    name = f"qp_bad_{kind}.safetensors"
    inputs = {inp: name, **({"compute_dtype": "fp32"} if loader == "QwenPixDiTLoader" else {})}
    prompt = {"x": {"class_type": loader, "inputs": inputs}, "out": sink(("x", 0))}
    if loader == "QwenPixLoraLoader":
        prompt = {
            "dit": dit_loader(),
            "x": {"class_type": loader, "inputs": {"dit": ["dit", 0], inp: name, "strength": 1.0}},
            "out": sink(("x", 0)),
        }
    msg = fails(client, prompt, "x", f"{inp} '{name}'", "Fix:")
    assert LOOKS_LIKE[kind] in msg.lower(), msg
    then_good(client, files)


def test_lora_made_for_another_model(client, files):
    name = "qp_bad_other_model_lora.safetensors"
    lora = {"class_type": "QwenPixLoraLoader", "inputs": {"dit": ["dit", 0], "lora_name": name, "strength": 1.0}}
    prompt = {"dit": dit_loader(), "x": lora, "out": sink(("x", 0))}
    fails(client, prompt, "x", f"lora_name '{name}'", "made for another model", "Fix:")
    then_good(client, files)


def test_names_outside_the_model_folders_are_rejected(client, files):
    for name in ("../../../etc/passwd", "/etc/passwd", f"../text_encoders/{TE}"):
        rejected(client, {"dit": dit_loader(name), "out": sink(("dit", 0))}, "dit", "dit_name", "not in")
    then_good(client, files)


# -- sizes and memory
def test_width_not_a_multiple_of_16(client, files):
    fails(client, {"lat": latent(100, 64), "out": sink(("lat", 0))}, "lat", "width 100", "multiple of 16", "96 or 112")
    fails(client, {"lat": latent(64, 72), "out": sink(("lat", 0))}, "lat", "height 72", "64 or 80")
    then_good(client, files)


@pytest.mark.parametrize("width, height, fragment", [(0, 64, "smaller than min"), (64, 20000, "bigger than max")])
def test_zero_or_huge_size_rejected_before_queueing(client, files, width, height, fragment):
    rejected(client, {"lat": latent(width, height), "out": sink(("lat", 0))}, "lat", fragment)
    then_good(client, files)


def test_batch_beyond_memory_refused_before_allocating(client, files):
    prompt = {"dit": dit_loader(), "pos": cond(1), "neg": cond(2), "lat": latent(4096, 4096, 64), "s": sampler()}
    prompt["out"] = sink(("s", 0))
    fails(client, prompt, "s", "latent_image: batch 64 at 4096x4096", "GiB for sampling", "Fix: lower batch_size")
    then_good(client, files)


def test_conditioning_of_another_text_encoder(client, files):
    prompt = {"dit": dit_loader(), "pos": cond(1), "neg": {**cond(2), "inputs": {"seed": 2, "tokens": 3, "dim": 3584}}}
    prompt.update(lat=latent(), s=sampler(seed=next(SALT)), out=sink(("s", 0)))
    fails(client, prompt, "s", "negative: the conditioning is [1, 3, 3584]", f"[1, tokens, {TEXT_DIM}]", "text encoder")
    then_good(client, files)


def test_fp16_overflow_is_stopped_with_the_reason(client, files):
    prompt = {"dit": dit_loader("qp_bad_overflow_dit.safetensors", "fp16"), "pos": cond(1), "neg": cond(2)}
    prompt.update(lat=latent(), s=sampler(steps=2, seed=next(SALT)), out=sink(("s", 0)))
    fails(client, prompt, "s", "compute_dtype 'fp16'", "NaN/inf", "float16", "bf16")
    then_good(client, files)


# -- prompts
def encode(prompt_text: str) -> dict:
    te = {"class_type": "QwenPixTextEncoderLoader", "inputs": {"text_encoder_name": TE}}
    enc = {"class_type": "QwenPixTextEncode", "inputs": {"text_encoder": ["te", 0], "prompt": prompt_text}}
    return {"te": te, "enc": enc, "out": sink(("enc", 0), next(SALT))}


@pytest.mark.parametrize("text", ["", " " * 3, "word " * 4000], ids=["empty", "spaces", "very_long"])
def test_empty_and_very_long_prompts_encode(client, files, text):
    res = client.run(encode(text), timeout=300)
    assert res.status == "success", res.error()
    (info,) = res.outputs["out"]["sink"]
    assert info["finite"] and info["shape"][0] == 1 and info["shape"][2] == TEXT_DIM
    assert 1 <= info["shape"][1] <= 1024  # long prompts are cut to the reference's limit (with a warning)
    then_good(client, files)


# -- edit images
def edit(kind, width=64, height=48, variant="edit_plus (2509 / 2511)", resize="keep size (no shift/zoom)", extra=()):
    image = {"class_type": "QwenPixTestImage", "inputs": {"kind": kind, "width": width, "height": height, "seed": 0}}
    if kind == "png16":
        image = {"class_type": "LoadImage", "inputs": {"image": "qp_16bit.png"}}
    inputs = {"text_encoder": ["te", 0], "vae": ["vae", 0], "prompt": "make it blue", "image1": ["img", 0]}
    inputs.update(variant=variant, resize=resize, **{f"image{i}": ["img", 0] for i in extra})
    return {
        "te": {"class_type": "QwenPixTextEncoderLoader", "inputs": {"text_encoder_name": TE}},
        "img": image,
        "enc": {"class_type": "QwenPixEditEncode", "inputs": inputs},
        "out": sink(("enc", 1), next(SALT)),
    }


@pytest.mark.parametrize("kind", ["gray", "gray_alpha", "rgba", "float16", "float64", "batch3", "png16"])
def test_unusual_edit_images_are_accepted(client, files, kind):
    prompt = edit(kind)
    prompt["vae"] = {"class_type": "QwenPixVAELoader", "inputs": {"vae_name": files["vae"]}}
    res = client.run(prompt, timeout=300)
    assert res.status == "success", res.error()
    (info,) = res.outputs["out"]["sink"]
    w, h = (48, 32) if kind == "png16" else (64, 48)  # 'keep size': the image's own size, cut to multiples of 16
    assert info["shape"] == [1, 16, 1, h // 8, w // 8]
    then_good(client, files)


def test_one_pixel_edit_image(client, files):
    vae = {"class_type": "QwenPixVAELoader", "inputs": {"vae_name": files["vae"]}}
    prompt = {**edit("rgb", 1, 1), "vae": vae}
    fails(client, prompt, "enc", "image1 is 1x1 pixels", "'keep size'", "use the 'official' resize or a larger image")
    prompt = {**edit("rgb", 1, 1, resize="official (~1 MP)"), "vae": vae}
    res = client.run(prompt, timeout=300)
    assert res.status == "success", res.error()
    assert res.outputs["out"]["sink"][0]["shape"] == [1, 16, 1, 128, 128]  # official: about 1 MP at 1:1
    then_good(client, files)


def test_more_reference_images_than_the_variant_takes(client, files):
    vae = {"class_type": "QwenPixVAELoader", "inputs": {"vae_name": files["vae"]}}
    prompt = {**edit("rgb", variant="edit (original Qwen-Image-Edit)", extra=(2, 3)), "vae": vae}
    fails(client, prompt, "enc", "variant 'edit (original", "exactly one image, got 3", "Fix:", "edit_plus")
    then_good(client, files)


def test_web_extension_has_no_html_sinks(client):
    """User and backend text reaches the page only as text (textContent, widget values), never parsed as HTML."""
    scripts = [e for e in client.get("/extensions") if e.startswith(f"/extensions/{PACK_NAME}/") and e.endswith(".js")]
    assert scripts
    for path in scripts:
        source = client.get(path).decode()
        for sink_name in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "createContextualFragment"):
            assert sink_name not in source, (path, sink_name)
