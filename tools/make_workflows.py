"""Write the example workflows: each graph once, as UI format (workflows/) and API format (workflows/api/).

    python -m tools.make_workflows

The graphs are described below as data; the node specs (which inputs are widgets, their order, their
defaults, the socket types: MODEL for the diffusion model, the pack's own types for the text encoder and
VAE) come from a running ComfyUI's /object_info, so the UI files are what the frontend itself would save.
Widgets a description leaves out (optional ones such as the loader's `positions`) get the node's default
in both formats, as the frontend sends them. The end-to-end tests check that the frontend turns each UI
file back into its API twin.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from tools.comfy_harness import ComfyClient, ComfyServer
from tools.comfy_paths import ROOT

OUT = ROOT / "workflows"
INPUTS = OUT / "inputs"  # example reference images; the main job copies them into ComfyUI's input folder
HF = "https://huggingface.co"
REPO_T2I = f"{HF}/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files"
REPO_EDIT = f"{HF}/Comfy-Org/Qwen-Image-Edit_ComfyUI/resolve/main/split_files"
LIGHTNING = f"{HF}/lightx2v/Qwen-Image-Lightning/resolve/main"
# file name -> (models sub-folder, where the file is published)
SOURCES = {
    "qwen_image_fp8_e4m3fn.safetensors": ("diffusion_models", REPO_T2I + "/diffusion_models"),
    "qwen_image_edit_fp8_e4m3fn.safetensors": ("diffusion_models", REPO_EDIT + "/diffusion_models"),
    "qwen_image_edit_2509_fp8_e4m3fn.safetensors": ("diffusion_models", REPO_EDIT + "/diffusion_models"),
    "qwen_image_edit_2511_bf16.safetensors": ("diffusion_models", REPO_EDIT + "/diffusion_models"),
    "qwen_2.5_vl_7b_fp8_scaled.safetensors": ("text_encoders", REPO_T2I + "/text_encoders"),
    "qwen_image_vae.safetensors": ("vae", REPO_T2I + "/vae"),
    "Qwen-Image-Lightning-8steps-V1.0.safetensors": ("loras", LIGHTNING),
}
MODELS = {name: (folder, f"{base}/{name}") for name, (folder, base) in SOURCES.items()}
EXAMPLE_IMAGES = ("qwenpix_example_1.png", "qwenpix_example_2.png", "qwenpix_example_3.png")


def _loaders(dit: str) -> dict:
    return {
        "dit": ("QwenPixDiTLoader", {"dit_name": dit, "compute_dtype": "auto", "positions": "official (diffusers)"}),
        "te": ("QwenPixTextEncoderLoader", {"text_encoder_name": "qwen_2.5_vl_7b_fp8_scaled.safetensors"}),
        "vae": ("QwenPixVAELoader", {"vae_name": "qwen_image_vae.safetensors"}),
    }


def _sampler(model: str, latent: tuple, steps: int, cfg: float, schedule: str, shift: float, rescale: str) -> tuple:
    return (
        "QwenPixSampler",
        {
            "dit": (model, 0),
            "positive": ("pos", 0),
            "negative": ("neg", 0),
            "latent_image": latent,
            "seed": 42,
            "steps": steps,
            "cfg": cfg,
            "sampler_name": "euler",
            "schedule": schedule,
            "shift": shift,
            "cfg_rescale": rescale,
            "denoise": 1.0,
        },
    )


def _tail(prefix: str) -> dict:
    return {
        "decode": (
            "QwenPixDecode",
            {"vae": ("vae", 0), "samples": ("sampler", 0), "tiling": "auto", "tile_size": 512, "overlap": 64},
        ),
        "save": ("SaveImage", {"images": ("decode", 0), "filename_prefix": f"QwenPix/{prefix}"}),
    }


def _edit(dit: str, images: int, variant: str, resize: str, prompt: str, steps: int, cfg: float, shift: float) -> dict:
    g = _loaders(dit)
    refs = {}
    for i in range(images):
        g[f"img{i + 1}"] = ("LoadImage", {"image": EXAMPLE_IMAGES[i]})
        refs[f"image{i + 1}"] = (f"img{i + 1}", 0)
    common = {"text_encoder": ("te", 0), "vae": ("vae", 0), "variant": variant, "resize": resize, **refs}
    g["pos"] = ("QwenPixEditEncode", {**common, "prompt": prompt})
    g["neg"] = ("QwenPixEditEncode", {**common, "prompt": " "})
    g["sampler"] = _sampler("dit", ("pos", 1), steps, cfg, "shift (ComfyUI workflows)", shift, "CFGNorm (ComfyUI)")
    return g


def graphs() -> dict[str, tuple[str, dict]]:
    """name -> (note text, graph); a graph maps a key to (class_type, inputs); links are (key, output slot)."""
    t2i = _loaders("qwen_image_fp8_e4m3fn.safetensors")
    t2i["pos"] = (
        "QwenPixTextEncode",
        {
            "text_encoder": ("te", 0),
            "prompt": (
                'A cozy coffee shop at dusk, a chalkboard sign reading "QwenPix Coffee", '
                "warm light through the window, a cat asleep on the counter, Ultra HD, 4K, cinematic composition."
            ),
        },
    )
    t2i["neg"] = ("QwenPixTextEncode", {"text_encoder": ("te", 0), "prompt": " "})
    t2i["latent"] = ("QwenPixEmptyLatent", {"aspect": "16:9 (1664x928)", "width": 1664, "height": 928, "batch_size": 1})

    lightning = dict(t2i)
    lora = {"dit": ("dit", 0), "lora_name": "Qwen-Image-Lightning-8steps-V1.0.safetensors", "strength": 1.0}
    lightning["lora"] = ("QwenPixLoraLoader", lora)
    lightning["latent"] = (
        "QwenPixEmptyLatent",
        {"aspect": "1:1 (1328x1328)", "width": 1328, "height": 1328, "batch_size": 1},
    )

    t2i["sampler"] = _sampler("dit", ("latent", 0), 20, 4.0, "shift (ComfyUI workflows)", 3.1, "norm (diffusers)")
    lightning["sampler"] = _sampler(
        "lora", ("latent", 0), 8, 1.0, "lightning (4/8-step LoRAs)", 3.0, "norm (diffusers)"
    )

    edit = _edit(
        "qwen_image_edit_fp8_e4m3fn.safetensors",
        1,
        "edit (original Qwen-Image-Edit)",
        "official (~1 MP)",
        "Change the sky to a starry night and add a full moon.",
        20,
        2.5,
        3.0,
    )
    e2509 = _edit(
        "qwen_image_edit_2509_fp8_e4m3fn.safetensors",
        2,
        "edit_plus (2509 / 2511)",
        "official (~1 MP)",
        "Put the object from Picture 2 on the table in Picture 1.",
        20,
        4.0,
        3.0,
    )
    e2511 = _edit(
        "qwen_image_edit_2511_bf16.safetensors",
        3,
        "edit_plus (2509 / 2511)",
        "keep size (no shift/zoom)",
        "Paint the house in Picture 1 with the colours of Picture 2 and the texture of Picture 3.",
        40,
        4.0,
        3.1,
    )
    native = _native_ksampler(t2i)
    for g, prefix in (
        (t2i, "t2i"),
        (lightning, "lightning"),
        (edit, "edit"),
        (e2509, "edit_2509"),
        (e2511, "edit_2511"),
        (native, "native_ksampler"),
    ):
        g.update(_tail(prefix))
    official = "Text to image, 20 steps, true CFG 4, shift 3.1 (the official ComfyUI settings)."
    return {
        "qwen_image_t2i": (note(t2i, official), t2i),
        "qwen_image_lightning_8step": (
            note(lightning, "Lightning LoRA: 8 steps, CFG 1, shift-3 schedule. Use the 4-step LoRA with steps 4."),
            lightning,
        ),
        "qwen_image_edit": (
            note(
                edit,
                "Qwen-Image-Edit, one reference. 'keep size' on the encoders keeps the "
                "image's own pixels and avoids shifted/zoomed results.",
            ),
            edit,
        ),
        "qwen_image_edit_2509_two_images": (
            note(e2509, "Edit-2509 with two references (Picture 1, Picture 2)."),
            e2509,
        ),
        "qwen_image_edit_2511_three_images": (
            note(e2511, "Edit-2511 with three references, keeping the first image's size (the canvas is Picture 1)."),
            e2511,
        ),
        "qwen_image_native_ksampler": (note(native, NATIVE_USAGE), native),
    }


NATIVE_USAGE = """\
The QwenPix loaders driving ComfyUI's own KSampler: ModelSamplingAuraFlow shift 3.1, euler / simple, 20 steps,
cfg 4, 1328x1328 (the settings of the Comfy-Org Qwen-Image workflow).

### Which sampler?

- **KSampler** (this workflow): the QwenPix diffusion model is a native MODEL, so KSampler, KSamplerAdvanced,
  SamplerCustomAdvanced and ComfyUI's other sampling nodes work on it, as do model patches (CFGNorm,
  EasyCache, LazyCache) and LoRA stacks (LoraLoaderModelOnly or Qwen-Image LoRA) between the loader and the
  sampler. Use it to combine QwenPix with the rest of a ComfyUI workflow.
- **Qwen-Image Sampler** (the other examples): the same ComfyUI samplers and schedulers, plus in one node the
  official resolution-dependent (dynamic) schedule, diffusers' per-token CFG rescale and the Lightning
  schedule.

Both samplers run cond and uncond as one batched pass on a QwenPix model, even when the prompts differ in
length (ComfyUI's own Qwen-Image model, from UNETLoader, runs them one after the other then).

### Seeds from native workflows

Set **positions** on the diffusion-model loader to "ComfyUI native" to reproduce an image of a native
ComfyUI Qwen-Image workflow from its seed: ComfyUI's model places odd token grids (1328 px = 83 tokens) and
edit text tokens differently from the official code, which the default "official (diffusers)" follows.
"ComfyUI native" also batches as ComfyUI does (prompts of different lengths in separate passes)."""


def _native_ksampler(t2i: dict) -> dict:
    """Our loaders and text encoders, ComfyUI's ModelSamplingAuraFlow + KSampler + EmptySD3LatentImage."""
    g = {key: t2i[key] for key in ("dit", "te", "vae", "pos", "neg")}
    g["shift"] = ("ModelSamplingAuraFlow", {"model": ("dit", 0), "shift": 3.1})
    g["latent"] = ("EmptySD3LatentImage", {"width": 1328, "height": 1328, "batch_size": 1})
    g["sampler"] = (
        "KSampler",
        {
            "model": ("shift", 0),
            "seed": 42,
            "steps": 20,
            "cfg": 4.0,
            "sampler_name": "euler",
            "scheduler": "simple",
            "positive": ("pos", 0),
            "negative": ("neg", 0),
            "latent_image": ("latent", 0),
            "denoise": 1.0,
        },
    )
    return g


def note(graph: dict, usage: str) -> str:
    files = sorted({v for _, inputs in graph.values() for v in inputs.values() if isinstance(v, str) and v in MODELS})
    lines = ["## Model files", "", "| file | put it in | download |", "| --- | --- | --- |"]
    lines += [f"| {f} | ComfyUI/models/{MODELS[f][0]}/ | [{f}]({MODELS[f][1]}) |" for f in files]
    lines += [
        "",
        "## Usage",
        "",
        usage,
        "",
        "Any Qwen-Image file format works in the loaders: bf16, fp8, scaled fp8, or a diffusers folder in "
        "models/diffusers/.",
    ]
    return "\n".join(lines)


def _default(spec: list):
    """The value the frontend gives a widget the workflow does not set."""
    kind, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    if "default" in opts:
        return opts["default"]
    if isinstance(kind, list):
        return kind[0]
    if kind == "COMBO":
        return opts["options"][0]
    return {"INT": opts.get("min", 0), "FLOAT": opts.get("min", 0.0), "STRING": "", "BOOLEAN": False}[kind]


def complete(graph: dict, info: dict) -> dict:
    """The graph with every widget input of each node: the description's values, else the node's default."""
    out = {}
    for key, (cls, inputs) in graph.items():
        full = dict(inputs)
        for group in ("required", "optional"):
            for name, spec in info[cls]["input"].get(group, {}).items():
                if _is_widget(spec) and name not in full:
                    full[name] = _default(spec)
        out[key] = (cls, full)
    return out


# -- serialisation
# layout: one column per dependency depth, nodes stacked with at least the height the frontend gives them
# (its minimum is a title bar plus one row per slot and per widget; a multiline text box and an image preview
# need more). Rows in LiteGraph's units (ComfyUI frontend 1.32).
NODE_W, GAP_X, GAP_Y, TITLE_H = 340, 60, 50, 30
NOTE_W, NOTE_LINE_H = 760, 21  # the note above the graph, as tall as its text
SLOT_H, WIDGET_H, MARGIN_H, MULTILINE_H, PREVIEW_H = 20, 24, 14, 110, 200


def _is_widget(spec: list) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def _height(cls: str, spec: dict, widgets: int) -> int:
    """A node's body height: enough for all its input/output slots, its widgets, text boxes and previews."""
    specs = [s for group in ("required", "optional") for s in spec["input"].get(group, {}).values()]
    slots = max(sum(not _is_widget(s) for s in specs), len(spec["output"]))
    multiline = sum(len(s) > 1 and isinstance(s[1], dict) and bool(s[1].get("multiline")) for s in specs)
    preview = PREVIEW_H if cls == "LoadImage" else 0
    return MARGIN_H + SLOT_H * slots + WIDGET_H * widgets + MULTILINE_H * multiline + preview


def _depths(graph: dict) -> dict[str, int]:
    """Key -> length of the longest chain of links leading to the node (0 for nodes without linked inputs)."""
    depth: dict[str, int] = {}

    def visit(key: str) -> int:
        if key not in depth:
            sources = [v[0] for v in graph[key][1].values() if isinstance(v, tuple)]
            depth[key] = 1 + max(map(visit, sources)) if sources else 0
        return depth[key]

    for key in graph:
        visit(key)
    return depth


def to_api(graph: dict) -> dict:
    ids = {key: str(i + 1) for i, key in enumerate(graph)}
    out = {}
    for key, (cls, inputs) in graph.items():
        vals = {k: ([ids[v[0]], v[1]] if isinstance(v, tuple) else v) for k, v in inputs.items()}
        out[ids[key]] = {"class_type": cls, "inputs": vals}
    return out


def to_ui(graph: dict, info: dict, note_text: str) -> dict:
    ids = {key: i + 1 for i, key in enumerate(graph)}
    links, nodes = [], []
    out_links: dict[tuple[int, int], list[int]] = {}
    for key, (_, inputs) in graph.items():
        for name, v in inputs.items():
            if isinstance(v, tuple):
                lid = len(links) + 1
                links.append([lid, ids[v[0]], v[1], ids[key], name])
                out_links.setdefault((ids[v[0]], v[1]), []).append(lid)
    link_by_target = {(link[3], link[4]): link for link in links}
    depths = _depths(graph)
    column_y: dict[int, int] = {}  # depth -> where the next node of that column starts
    for order, (key, (cls, inputs)) in enumerate(graph.items()):
        nid, spec = ids[key], info[cls]
        node_inputs, widgets = [], []
        for group in ("required", "optional"):
            for name, ispec in spec["input"].get(group, {}).items():
                if _is_widget(ispec):
                    if name in inputs:
                        widgets.append(inputs[name])
                        if name == "seed":
                            widgets.append("fixed")  # the frontend's "control after generate" value
                        if cls == "LoadImage" and name == "image":
                            widgets.append("image")  # the upload widget
                elif name in inputs or group == "required":
                    link = link_by_target.get((nid, name))
                    node_inputs.append({"name": name, "type": ispec[0], "link": link[0] if link else None})
        outputs = [
            {"name": n, "type": t, "links": out_links.get((nid, i), []), "slot_index": i}
            for i, (t, n) in enumerate(zip(spec["output"], spec["output_name"], strict=True))
        ]
        props = {"Node name for S&R": cls}
        models = [
            {"name": v, "url": MODELS[v][1], "directory": MODELS[v][0]}
            for v in inputs.values()
            if isinstance(v, str) and v in MODELS
        ]
        if models:
            props["models"] = models
        col = depths[key]
        height = _height(cls, spec, len(widgets))
        y = column_y.get(col, 40)
        column_y[col] = y + height + TITLE_H + GAP_Y
        nodes.append(
            {
                "id": nid,
                "type": cls,
                "pos": [40 + (NODE_W + GAP_X) * col, y],
                "size": [NODE_W, height],
                "flags": {},
                "order": order,
                "mode": 0,
                "inputs": node_inputs,
                "outputs": outputs,
                "properties": props,
                "widgets_values": widgets,
            }
        )
    note_id = len(graph) + 1
    note_h = max(380, NOTE_LINE_H * (note_text.count("\n") + 1) + 60)
    nodes.append(
        {
            "id": note_id,
            "type": "MarkdownNote",
            "pos": [40, -note_h - 40],
            "size": [NOTE_W, note_h],
            "flags": {},
            "order": len(graph),
            "mode": 0,
            "inputs": [],
            "outputs": [],
            "properties": {},
            "widgets_values": [note_text],
            "title": "Model files",
        }
    )
    by_id = {n["id"]: n for n in nodes}
    ui_links = []
    for lid, src, slot, dst, name in links:
        dst_slot = [i["name"] for i in by_id[dst]["inputs"]].index(name)
        ui_links.append([lid, src, slot, dst, dst_slot, by_id[src]["outputs"][slot]["type"]])
    return {
        "last_node_id": note_id,
        "last_link_id": len(links),
        "nodes": nodes,
        "links": ui_links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
        "version": 0.4,
    }


def write_example_images() -> None:
    INPUTS.mkdir(parents=True, exist_ok=True)
    scenes = (
        ((90, 150, 220), (240, 230, 200), "house"),
        ((200, 60, 40), (250, 210, 60), "stripes"),
        ((40, 120, 70), (160, 200, 120), "dots"),
    )
    for name, (a, b, kind) in zip(EXAMPLE_IMAGES, scenes, strict=True):
        img = Image.new("RGB", (384, 256), a)
        d = ImageDraw.Draw(img)
        if kind == "house":
            d.rectangle((120, 110, 270, 230), fill=b)
            d.polygon(((110, 115), (195, 50), (280, 115)), fill=(150, 40, 40))
            d.rectangle((0, 230, 384, 256), fill=(60, 140, 60))
        elif kind == "stripes":
            for x in range(0, 384, 48):
                d.rectangle((x, 0, x + 24, 256), fill=b)
        else:
            for x in range(16, 384, 40):
                for y in range(16, 256, 40):
                    d.ellipse((x, y, x + 18, y + 18), fill=b)
        img.save(INPUTS / name, optimize=True)


def main() -> None:
    write_example_images()
    with tempfile.TemporaryDirectory() as tmp, ComfyServer(Path(tmp)) as server:
        info = ComfyClient(server.url).object_info()
    (OUT / "api").mkdir(parents=True, exist_ok=True)
    for name, (text, graph) in graphs().items():
        graph = complete(graph, info)
        (OUT / "api" / f"{name}.json").write_text(json.dumps(to_api(graph), indent=2) + "\n")
        (OUT / f"{name}.json").write_text(json.dumps(to_ui(graph, info, text), indent=2) + "\n")
        print(f"wrote workflows/{name}.json and workflows/api/{name}.json")


if __name__ == "__main__":
    main()
