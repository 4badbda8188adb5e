"""Bad inputs through the real ComfyUI server, round 2 (issue 18 part B): every non-finite value is refused where it
enters, naming the input; no raw Python error and no absolute server path reaches the client; the edit canvas
follows Picture 1. Each bad case is followed by a good prompt that succeeds.

Covered: LoRA files with NaN/inf factors, rank 0, a 2-element alpha, huge factors; NaN numbers sent through the API
and non-finite numbers through links; shift 0; NaN/inf/all-NaN images; non-finite, malformed and mis-sized
conditioning; a DiT file with NaN weights; a NaN img2img latent; handles of the wrong kind through an any-type socket
in every node that takes one; tiling values; a 4th edit image; shapes that do not fit; lone UTF-16 surrogates.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from graphs import TEXT_DIM, cond, latent, sampler_node, sink
from graphs import fails as _fails
from qwen_image_core.prompts import calculate_dimensions
from tools.checkpoints.smoke import write_smoke

pytestmark = pytest.mark.e2e
DIT, TE, LORA = "qp_b2_dit.safetensors", "qp_b2_te.safetensors", "qp_b2_lora.safetensors"
NAN_DIT, HUGE_LORA = "qp_b2_nan_dit.safetensors", "qp_b2_lora_huge.safetensors"
SALT = itertools.count(1)
BASE: list[str] = []  # the server's base directory, which no message may contain
KEY = "diffusion_model.img_in"  # a module of the smoke LoRA (lightx2v naming)


@pytest.fixture(scope="module")
def files(comfy, tiny_comfy_vae):
    m = comfy.models_dir
    BASE[:] = [str(comfy.base_dir)]
    dit = write_smoke("diffusion_models", m / "diffusion_models" / DIT)
    write_smoke("text_encoders", m / "text_encoders" / TE)
    lora = write_smoke("loras", m / "loras" / LORA)
    sd = load_file(str(lora))
    bad = {
        "nan": {f"{KEY}.lora_down.weight": _with_nan(sd[f"{KEY}.lora_down.weight"])},
        "inf_alpha": {f"{KEY}.alpha": torch.tensor(float("inf"))},
        "alpha2": {f"{KEY}.alpha": torch.tensor([4.0, 4.0])},
        "rank0": {f"{KEY}.lora_down.weight": torch.zeros(0, 64), f"{KEY}.lora_up.weight": torch.zeros(64, 0)},
        "huge": {k: v.float() * 1e19 for k, v in sd.items() if not k.endswith(".alpha")},
    }
    for name, change in bad.items():
        save_file({**sd, **change}, str(m / "loras" / f"qp_b2_lora_{name}.safetensors"))
    with safe_open(str(dit), "pt") as f:  # the DiT's config rides in the metadata
        weights, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    weights["proj_out.weight"] = _with_nan(weights["proj_out.weight"])
    save_file(weights, str(m / "diffusion_models" / NAN_DIT), metadata=metadata)
    return {"vae": tiny_comfy_vae}


def _with_nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[:3] = float("nan")
    return t


# -- graphs
def dit_loader(name=DIT, dtype="fp32"):
    return {"class_type": "QwenPixDiTLoader", "inputs": {"dit_name": name, "compute_dtype": dtype}}


def lora_node(name=LORA, strength=1.0, dit=("dit", 0)):
    return {"class_type": "QwenPixLoraLoader", "inputs": {"dit": list(dit), "lora_name": name, "strength": strength}}


def bad(kind, dim=TEXT_DIM):
    return {"class_type": "QwenPixTestBad", "inputs": {"kind": kind, "dim": dim, "salt": next(SALT)}}


def through_any(src):
    """`src` passed on by an any-type socket, so ComfyUI's type check no longer applies."""
    return {"class_type": "QwenPixTestFault", "inputs": {"value": list(src), "fault": "none", "call": 1, "salt": 0}}


def loaders(files):
    return {
        "dit": dit_loader(),
        "te": {"class_type": "QwenPixTextEncoderLoader", "inputs": {"text_encoder_name": TE}},
        "vae": {"class_type": "QwenPixVAELoader", "inputs": {"vae_name": files["vae"]}},
    }


def t2i(files, **sampler_kw) -> dict:
    """Sample one step at 32x32 and decode; `sampler_kw` overrides sampler inputs (values or links)."""
    nodes = {**loaders(files), "pos": cond(1), "neg": cond(2, 3), "lat": latent()}
    nodes["s"] = sampler_node(("dit", 0), ("lat", 0), seed=next(SALT))
    nodes["s"]["inputs"].update(sampler_kw)
    nodes["dec"] = decode(("s", 0))
    nodes["out"] = sink(("dec", 0))
    return nodes


def decode(samples, vae=("vae", 0), tiling="off", tile_size=512, overlap=64):
    inputs = {"vae": list(vae), "samples": list(samples), "tiling": tiling, "tile_size": tile_size, "overlap": overlap}
    return {"class_type": "QwenPixDecode", "inputs": inputs}


def encode_image(image, vae=("vae", 0), tiling="off", tile_size=512, overlap=64):
    inputs = {"vae": list(vae), "image": list(image), "tiling": tiling, "tile_size": tile_size, "overlap": overlap}
    return {"class_type": "QwenPixEncode", "inputs": inputs}


def edit_encode(image1=("img", 0), prompt="make it blue", resize="keep size (no shift/zoom)", te=("te", 0), **more):
    inputs = {"text_encoder": list(te), "vae": ["vae", 0], "prompt": prompt, "image1": list(image1)}
    inputs.update(variant="edit_plus (2509 / 2511)", resize=resize, **{k: list(v) for k, v in more.items()})
    return {"class_type": "QwenPixEditEncode", "inputs": inputs}


def rgb_image(width=64, height=48):
    return {"class_type": "QwenPixTestImage", "inputs": {"kind": "rgb", "width": width, "height": height, "seed": 0}}


def fails(client, prompt, node, *fragments) -> str:
    msg = _fails(client, prompt, node, "Fix:", *fragments)
    assert BASE[0] not in msg, msg
    return msg


def then_good(client, files) -> None:
    res = client.run(t2i(files), timeout=300)
    assert res.status == "success", res.error()


# -- LoRA files
@pytest.mark.parametrize(
    "name, fragments",
    [
        ("nan", (f"{KEY}.lora_down.weight holds non-finite values (3 NaN of",)),
        ("inf_alpha", (f"{KEY}.alpha holds non-finite values (1 infinite",)),
        ("alpha2", (f"alpha {KEY}.alpha is [2]; an alpha is one number",)),
        ("rank0", (f"{KEY}.lora_down.weight is [0, 64] (rank 0)",)),
    ],
)
def test_lora_files_with_bad_factors_are_refused_at_load(client, files, name, fragments):
    file = f"qp_b2_lora_{name}.safetensors"
    prompt = {"dit": dit_loader(), "x": lora_node(file), "out": sink(("x", 0), next(SALT))}
    fails(client, prompt, "x", f"lora_name '{file}'", f"models/loras/{file}: LoRA", *fragments)
    then_good(client, files)


# -- numbers
@pytest.mark.parametrize("name", ["cfg", "denoise", "shift", "rescale_strength"])
def test_nan_numbers_sent_through_the_api_are_refused(client, files, name):
    """ComfyUI's min/max validation lets NaN through (every comparison with NaN is false)."""
    fails(client, t2i(files, **{name: float("nan")}), "s", f"{name} 'nan': not a number (NaN)", f"set {name}")
    then_good(client, files)


def test_nan_lora_strength_is_refused(client, files):
    prompt = {"dit": dit_loader(), "x": lora_node(strength=float("nan")), "out": sink(("x", 0), next(SALT))}
    fails(client, prompt, "x", "strength 'nan': not a number", "set strength from -10 to 10")
    then_good(client, files)


@pytest.mark.parametrize(
    "name, kind, fragment",
    [
        ("cfg", "float_inf", "cfg 'inf': infinite"),
        ("denoise", "float_nan", "denoise 'nan': not a number"),
        ("shift", "float_inf", "shift 'inf': infinite"),
        ("rescale_strength", "float_nan", "rescale_strength 'nan'"),
    ],
)
def test_non_finite_numbers_through_links_are_refused(client, files, name, kind, fragment):
    """Linked values skip ComfyUI's min/max validation entirely."""
    prompt = {**t2i(files, **{name: ["num", 0]}), "num": bad(kind)}
    fails(client, prompt, "s", fragment)
    then_good(client, files)


def test_shift_zero_works(client, files):
    """The widget allows shift 0: it keeps the model's own sampling (it used to make every sigma 0 or NaN)."""
    for shift in (0.0, ["num", 0]):  # typed, and through a link
        prompt = {**t2i(files, shift=shift), "num": bad("float_zero")}
        prompt["out"] = sink(("s", 0), next(SALT))
        res = client.run(prompt, timeout=300)
        assert res.status == "success", res.error()
        assert res.outputs["out"]["sink"][0]["finite"]


# -- images
IMAGES = [
    ("image_some_nan", "12 of 3072 values are NaN"),
    ("image_all_nan", "all 3072 values are NaN"),
    ("image_inf", "3 of 3072 values are infinite"),
]


@pytest.mark.parametrize("kind, fragment", IMAGES)
@pytest.mark.parametrize("target", ["image1", "image2", "vae_encode"])
def test_non_finite_images_are_refused_by_the_receiving_node(client, files, kind, fragment, target):
    nodes = {**loaders(files), "img": rgb_image(), "bad": bad(kind)}
    if target == "vae_encode":
        nodes.update(x=encode_image(("bad", 0)), out=sink(("x", 0), next(SALT)))
        name = "image"
    else:
        images = {"image1": ("bad", 0)} if target == "image1" else {"image1": ("img", 0), "image2": ("bad", 0)}
        nodes.update(x=edit_encode(**images), out=sink(("x", 1), next(SALT)))
        name = target
    fails(client, nodes, "x", f"{name}: {fragment}", "float16")
    then_good(client, files)


# -- conditioning
CONDITIONING = [
    ("cond_nan", "the embeddings [1, 5, 256] hold NaN/inf: 3 of 1280 values are NaN"),
    (
        "cond_mask_too_long",
        "attention_mask is [1, 9], the embeddings are [1, 5, 256]: the mask needs one entry per token",
    ),
    ("cond_mask_text", "attention_mask is the text 'all', expected a tensor [batch, tokens]"),
    ("cond_refs_4_channels", "reference_latents[0] is [1, 4, 1, 4, 4], expected a 16-channel Qwen-Image latent"),
    ("cond_refs_tensor", "reference_latents is a tensor [1, 16, 1, 4, 4], expected a list of latents"),
    ("cond_refs_nan", "reference_latents[0]: all 256 values are NaN"),
    ("cond_not_pairs", "expected an [embeddings tensor, options dict] pair, got a MASK or tensor [1, 5, 256]"),
    ("cond_as_text", "expected a CONDITIONING (a list of [embeddings, options]), got the text 'a cat'"),
]


@pytest.mark.parametrize("kind, fragment", CONDITIONING, ids=[c[0] for c in CONDITIONING])
@pytest.mark.parametrize("socket", ["positive", "negative"])
def test_bad_conditioning_is_refused_naming_the_input_and_key(client, files, kind, fragment, socket):
    fails(client, {**t2i(files, **{socket: ["c", 0]}), "c": bad(kind)}, "s", f"{socket}: {fragment}")
    then_good(client, files)


# -- why sampling went non-finite
def test_nan_explanations_name_the_likeliest_cause(client, files):
    prompt = {**t2i(files), "dit": dit_loader(NAN_DIT)}
    fails(client, prompt, "s", f"dit '{NAN_DIT}'", "non-finite weights", "proj_out.weight (3 NaN)", "download")
    then_good(client, files)
    for strength, fragment in (
        (10.0, f"the LoRA '{HUGE_LORA}' at the extreme strength 10"),
        (1.0, f"a LoRA ('{HUGE_LORA}' @ 1)"),
    ):
        prompt = {**t2i(files, dit=["x", 0]), "x": lora_node(HUGE_LORA, strength)}
        fails(client, prompt, "s", f"dit '{DIT} + ", "sampling produced NaN/inf at step 1 of 1", fragment)
        then_good(client, files)
    prompt = {**t2i(files, latent_image=["lat", 0], denoise=0.5), "lat": bad("latent_nan")}
    fails(client, prompt, "s", "latent_image 'non-finite'", "latent_image holds NaN/inf (all 256 values are NaN)")
    then_good(client, files)


# -- handles of the wrong kind through an any-type socket
DIT_FROM = "from 'Load Qwen-Image Diffusion Model', got "
TE_FROM = "text_encoder: expected a Qwen-Image text encoder from 'Load Qwen-Image Text Encoder', got "
VAE_FROM = "vae: expected a Qwen-Image VAE from 'Load Qwen-Image VAE', got "
WRONG_HANDLES = [  # (node taking the handle, input, what is passed instead, message fragment)
    ("sampler", "dit", "vae", DIT_FROM + "a Qwen-Image VAE"),
    ("lora", "dit", "te", DIT_FROM + "a Qwen-Image text encoder"),
    ("text_encode", "text_encoder", "dit", TE_FROM + "a Qwen-Image diffusion model"),
    ("edit_encode", "text_encoder", "vae", TE_FROM + "a Qwen-Image VAE"),
    ("edit_encode", "vae", "te", VAE_FROM + "a Qwen-Image text encoder"),
    ("decode", "vae", "dit", VAE_FROM + "a Qwen-Image diffusion model"),
    ("encode", "vae", "img", VAE_FROM + "an IMAGE [1, 48, 64, 3]"),
]


def wrong_handle_graph(files, node: str, socket: str, source: str) -> dict:
    nodes = {**loaders(files), "img": rgb_image(), "lat": latent(), "any": through_any((source, 0))}
    nodes["any"]["inputs"]["salt"] = next(SALT)
    if node == "sampler":
        return {**nodes, **t2i(files, dit=["any", 0])}
    x = {
        "lora": lambda: lora_node(),
        "text_encode": lambda: {
            "class_type": "QwenPixTextEncode",
            "inputs": {"text_encoder": ["te", 0], "prompt": "a"},
        },
        "edit_encode": lambda: edit_encode(),
        "decode": lambda: decode(("lat", 0)),
        "encode": lambda: encode_image(("img", 0)),
    }[node]()
    x["inputs"][socket] = ["any", 0]
    return {**nodes, "x": x, "out": sink(("x", 0))}


@pytest.mark.parametrize("node, socket, source, fragment", WRONG_HANDLES, ids=[f"{c[0]}-{c[1]}" for c in WRONG_HANDLES])
def test_a_handle_of_the_wrong_kind_is_named(client, files, node, socket, source, fragment):
    prompt = wrong_handle_graph(files, node, socket, source)
    fails(client, prompt, "s" if node == "sampler" else "x", fragment, "Fix: connect the output of")
    then_good(client, files)


# -- tiling, a 4th image, shapes, text
@pytest.mark.parametrize(
    "tile_size, overlap, fragment",
    [
        (
            128,
            512,
            "overlap '512': at most half of tile_size '128'\nFix: lower overlap to 64 or less, or raise tile_size",
        ),
        (
            130,
            64,
            "tile_size '130': tiles are cut in latent pixels, so tile_size must be a multiple of 8 of at least 128",
        ),
        (512, 12, "overlap '12': tiles are cut in latent pixels, so overlap must be a multiple of 8 (0 or more)"),
    ],
)
@pytest.mark.parametrize("node", ["decode", "encode"])
def test_tiling_errors_use_the_node_inputs(client, files, tile_size, overlap, fragment, node):
    nodes = {**loaders(files), "lat": latent(), "img": rgb_image()}
    make = decode if node == "decode" else encode_image
    nodes.update(x=make(("lat" if node == "decode" else "img", 0), tiling="on", tile_size=tile_size, overlap=overlap))
    nodes["out"] = sink(("x", 0), next(SALT))
    msg = fails(client, nodes, "x", fragment)
    assert "Tiling(" not in msg
    then_good(client, files)


def test_an_eleventh_edit_image_is_refused(client, files):
    prompt = {**loaders(files), "img": rgb_image(), "x": edit_encode(image2=("img", 0), image11=("img", 0))}
    prompt["out"] = sink(("x", 1), next(SALT))
    fails(
        client,
        prompt,
        "x",
        "image11: not an input of this node, which takes at most 10 reference images",
        "remove image11",
    )
    then_good(client, files)


@pytest.mark.parametrize(
    "node, kind, fragment",
    [
        (
            "decode",
            "latent_4_channels",
            "samples: expected a 16-channel Qwen-Image latent [batch, 16, (1,) h, w], got [1, 4, 1, 4, 4]",
        ),
        ("decode", "image_some_nan", "samples: expected a LATENT (a dict with 'samples'), got an IMAGE [1, 32, 32, 3]"),
        ("decode", "latent_nan", "samples: the latent [1, 16, 1, 4, 4] holds NaN/inf: all 256 values are NaN"),
        (
            "encode",
            "image_5_channels",
            "image: expected an IMAGE [batch, height, width, channels] with 1-4 channels, got [1, 32, 32, 5]",
        ),
        (
            "edit",
            "mask",
            "image1: expected an IMAGE [batch, height, width, channels] with 1-4 channels, got [1, 32, 32]",
        ),
        (
            "edit",
            "latent_nan",
            "image1: expected an IMAGE [batch, height, width, channels], got a LATENT [1, 16, 1, 4, 4]",
        ),
    ],
)
def test_shape_errors_name_the_input(client, files, node, kind, fragment):
    nodes = {**loaders(files), "bad": bad(kind)}
    nodes["x"] = {"decode": decode, "encode": encode_image, "edit": edit_encode}[node](("bad", 0))
    nodes["out"] = sink(("x", 0), next(SALT))
    fails(client, nodes, "x", fragment)
    then_good(client, files)


@pytest.mark.parametrize("node", ["text", "edit"])
def test_a_lone_surrogate_in_a_prompt_is_named(client, files, node):
    text = "a red \ud83d boat"
    if node == "text":
        x = {"class_type": "QwenPixTextEncode", "inputs": {"text_encoder": ["te", 0], "prompt": text}}
    else:
        x = edit_encode(prompt=text)
    prompt = {**loaders(files), "img": rgb_image(), "x": x, "out": sink(("x", 0), next(SALT))}
    fails(client, prompt, "x", "prompt: character 7 is a lone UTF-16 surrogate (U+D83D)", "remove or retype")
    then_good(client, files)


# -- the edit canvas follows Picture 1
@pytest.mark.parametrize("resize", ["official (~1 MP)", "keep size (no shift/zoom)"])
def test_edit_canvas_follows_picture_1(client, files, resize):
    prompt = {**loaders(files), "p1": rgb_image(832, 1216), "p2": rgb_image(64, 64)}
    prompt.update(x=edit_encode(("p1", 0), resize=resize, image2=("p2", 0)), out=sink(("x", 1), next(SALT)))
    res = client.run(prompt, timeout=300)
    assert res.status == "success", res.error()
    w, h = calculate_dimensions(1024 * 1024, 832 / 1216, 32) if resize.startswith("official") else (832, 1216)
    assert res.outputs["out"]["sink"][0]["shape"] == [1, 16, 1, h // 16 * 2, w // 16 * 2]
    assert h > w  # portrait, like Picture 1 (diffusers' rule would give the square of Picture 2)


# -- no server paths in what clients receive (runs last: covers every prompt of the session so far)
def test_no_error_sent_to_clients_contains_the_server_base_directory(client, files):
    errors = []
    for entry in client.get("/history").values():
        for kind, data in entry.get("status", {}).get("messages", []):
            if kind == "execution_error":
                errors.append(data)
    assert len(errors) >= 40, len(errors)
    for e in errors:
        assert BASE[0] not in e["exception_message"], e["exception_message"]
        assert BASE[0] not in str(e.get("current_inputs")), (e["node_type"], e["current_inputs"])
