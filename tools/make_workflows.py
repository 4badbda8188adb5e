"""Write the example workflows: each graph once, as UI format and API format.

    python -m tools.make_workflows

Where they go (ComfyUI's custom-node template browser reads `example_workflows/*.json` and a same-name `.jpg`
thumbnail, and shows the file name as the card's title; ComfyUI 0.3.75's server also lists `workflows/*.json`,
so no UI file is kept there, which would show every example twice):
- `example_workflows/<title>.json` + `<title>.jpg`: the UI workflow under its human title (TITLES) and its card;
- `workflows/api/<name>.json`: its API-format twin under the stable snake-case name (the main job, the tests).

The graphs are described below as data; the node specs (which inputs are widgets, their order, their
defaults, the socket types: MODEL for the diffusion model, the pack's own types for the text encoder and
VAE) come from a running ComfyUI's /object_info, so the UI files are what the frontend itself would save.
Widgets a description leaves out (optional ones such as the loader's `positions`) get the node's default
in both formats, as the frontend sends them. The end-to-end tests check that the frontend turns each UI
file back into its API twin.

A node is `(class_type, inputs)` or `(class_type, inputs, ui)`; `ui` holds what only the UI file has:
`title` (the node's title), `mode` (BYPASS: a bypassed node, which the API twin leaves out as the frontend
does), `group` (the titled group around the node; bypass a group to switch a branch off) and `col` (the
layout column, default: its dependency depth). To add an example: a builder returning such a graph, one
entry in `graphs()` and one in TITLES.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from tools.comfy_harness import ComfyClient, ComfyServer
from tools.comfy_paths import ROOT

OUT = ROOT / "workflows"  # api/ (API-format twins) and inputs/
EXAMPLES = ROOT / "example_workflows"  # UI workflows and thumbnails, as ComfyUI's template browser reads them
INPUTS = OUT / "inputs"  # example reference images; the main job copies them into ComfyUI's input folder
BYPASS = 4  # LiteGraph's node mode for "bypassed"
# name -> the title the template browser shows (the UI file's name); a name without one gets a title from its name
TITLES = {
    "qwen_image_t2i": "Qwen-Image Text to Image",
    "qwen_image_lightning_8step": "Qwen-Image Lightning 8 Steps",
    "qwen_image_edit": "Qwen-Image-Edit One Image",
    "qwen_image_edit_2509_two_images": "Qwen-Image-Edit-2509 Two Images",
    "qwen_image_edit_2511_three_images": "Qwen-Image-Edit-2511 Three Images Keep Size",
    "qwen_image_native_ksampler": "QwenPix Loaders with Native KSampler",
    "qwen_image_layered": "Qwen-Image-Layered Decompose into RGBA Layers",  # tools/workflow_layered.py
}
POSITIVE, NEGATIVE = {"title": "Positive Prompt"}, {"title": "Negative Prompt"}
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


def title_of(name: str) -> str:
    """The example's title: the UI file's name, which the template browser shows on its card."""
    return TITLES.get(name) or name.replace("_", " ").title()


def _sampler(
    model: str, latent: tuple, steps: int, cfg: float, schedule: str, shift: float, rescale: str, ui: dict | None = None
) -> tuple:
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
        *([ui] if ui else []),
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
    g["pos"] = ("QwenPixEditEncode", {**common, "prompt": prompt}, POSITIVE)
    g["neg"] = ("QwenPixEditEncode", {**common, "prompt": " "}, NEGATIVE)
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
        POSITIVE,
    )
    t2i["neg"] = ("QwenPixTextEncode", {"text_encoder": ("te", 0), "prompt": " "}, NEGATIVE)
    # the official template's size, steps, CFG, shift; no rescale (its graph has no CFGNorm)
    t2i["latent"] = (
        "QwenPixEmptyLatent",
        {"aspect": "1:1 (1328x1328)", "width": 1328, "height": 1328, "batch_size": 1},
    )
    lightning = _lightning_switch(dict(t2i))
    t2i["sampler"] = _sampler("dit", ("latent", 0), 20, 4.0, "shift (ComfyUI workflows)", 3.1, "none")

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
    official = (
        "Text to image at 1328x1328, 20 steps, true CFG 4, shift 3.1, no CFG rescale: the settings of the "
        "official ComfyUI workflow. The seed is randomised after each run (set 'control after generate' to "
        "fixed to repeat an image)."
    )
    return {
        "qwen_image_t2i": (note(t2i, official), t2i),
        "qwen_image_lightning_8step": (
            note(lightning, LIGHTNING_USAGE),
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


LIGHTNING_USAGE = """\
Lightning LoRA on/off, as the official workflow's switch: two groups, one of them bypassed.

- **Lightning (on)**: the Lightning LoRA and a sampler with 8 steps, CFG 1 (the official Lightning settings).
- **Standard (off)**: a sampler with 20 steps, CFG 4, the settings without the LoRA.

To switch, bypass the group you do not want and un-bypass the other (right-click the group > Bypass Group
Nodes, or select it and press Ctrl+B). Exactly one group should be active: a bypassed sampler passes its
latent through. Both use shift 3.1 as the official workflow does (the sampler's 'lightning' schedule is the
LoRA authors' plain shift 3). Use the 4-step LoRA with steps 4."""

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


def _lightning_switch(g: dict) -> dict:
    """The text-to-image graph with a Lightning on/off switch (the bypass pattern): the standard sampler (bypassed)
    feeds its latent input through to the Lightning sampler, which samples with the LoRA; bypassing the Lightning
    group instead passes the standard sampler's result through."""
    lora = {"dit": ("dit", 0), "lora_name": "Qwen-Image-Lightning-8steps-V1.0.safetensors", "strength": 1.0}
    on, off = "Lightning (on): 8 steps, CFG 1", "Standard (off): 20 steps, CFG 4"
    schedule = "shift (ComfyUI workflows)"
    g["standard"] = _sampler(
        "dit",
        ("latent", 0),
        20,
        4.0,
        schedule,
        3.1,
        "none",
        {"title": "Sampler (standard)", "mode": BYPASS, "group": off},
    )
    g["lora"] = ("QwenPixLoraLoader", lora, {"title": "Lightning LoRA", "group": on, "col": 3})
    g["sampler"] = _sampler(
        "lora", ("standard", 0), 8, 1.0, schedule, 3.1, "none", {"title": "Sampler (Lightning)", "group": on}
    )
    return g


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
    files = sorted({v for entry in graph.values() for v in entry[1].values() if isinstance(v, str) and v in MODELS})
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


def widget_default(spec: list):
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
    for key, (cls, inputs, ui) in _entries(graph):
        full = dict(inputs)
        for group in ("required", "optional"):
            for name, spec in info[cls]["input"].get(group, {}).items():
                if _is_widget(spec) and name not in full:
                    full[name] = widget_default(spec)
        out[key] = (cls, full, ui)
    return out


def _entries(graph: dict):
    """(key, (class_type, inputs, ui)) for each node, `ui` {} where the description has none."""
    for key, entry in graph.items():
        yield key, (entry[0], entry[1], entry[2] if len(entry) > 2 else {})


def _through_bypassed(graph: dict, link: tuple, info: dict) -> tuple | None:
    """Where a link really comes from once bypassed nodes are left out: a bypassed node passes on its first
    linked input of the output's type (the frontend's rule), else the link is dropped (None)."""
    while link is not None and len(graph[link[0]]) > 2 and graph[link[0]][2].get("mode") == BYPASS:
        cls, inputs = graph[link[0]][0], graph[link[0]][1]
        want = _output_type(cls, link[1], info)
        link = next((v for n, v in inputs.items() if isinstance(v, tuple) and _input_type(cls, n, info) == want), None)
    return link


def _output_type(cls: str, slot: int, info: dict) -> str:
    return info[cls]["output"][slot]


def _input_type(cls: str, name: str, info: dict) -> str | None:
    spec = {**info[cls]["input"].get("required", {}), **info[cls]["input"].get("optional", {})}.get(name)
    return spec[0] if spec and isinstance(spec[0], str) else None


# -- serialisation
# layout: one column per dependency depth, nodes stacked with at least the height the frontend gives them
# (its minimum is a title bar plus one row per slot and per widget; a multiline text box and an image preview
# need more). Rows in LiteGraph's units (ComfyUI frontend 1.32).
NODE_W, GAP_X, GAP_Y, TITLE_H = 340, 60, 50, 30
NOTE_W, NOTE_LINE_H = 760, 21  # the note above the graph, as tall as its text
SLOT_H, WIDGET_H, MARGIN_H, MULTILINE_H, PREVIEW_H = 20, 24, 14, 110, 200
GROUP_TOP, GROUP_PAD, GROUP_TITLE_H = 120, 10, 34  # a grouped column starts lower, leaving room for the group title


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


def to_api(graph: dict, info: dict) -> dict:
    """The API prompt the frontend makes of the UI file: bypassed nodes left out, links routed through them."""
    ids = {key: str(i + 1) for i, key in enumerate(graph)}
    out = {}
    for key, (cls, inputs, ui) in _entries(graph):
        if ui.get("mode") == BYPASS:
            continue
        vals = {}
        for k, v in inputs.items():
            if isinstance(v, tuple):
                v = _through_bypassed(graph, v, info)
                if v is not None:
                    vals[k] = [ids[v[0]], v[1]]
            else:
                vals[k] = v
        out[ids[key]] = {"class_type": cls, "inputs": vals}
    return out


def to_ui(graph: dict, info: dict, note_text: str) -> dict:
    ids = {key: i + 1 for i, key in enumerate(graph)}
    links, nodes = [], []
    out_links: dict[tuple[int, int], list[int]] = {}
    for key, (_, inputs, _ui) in _entries(graph):
        for name, v in inputs.items():
            if isinstance(v, tuple):
                lid = len(links) + 1
                links.append([lid, ids[v[0]], v[1], ids[key], name])
                out_links.setdefault((ids[v[0]], v[1]), []).append(lid)
    link_by_target = {(link[3], link[4]): link for link in links}
    depths = _depths(graph)
    column_y: dict[int, int] = {}  # depth -> where the next node of that column starts
    groups: dict[str, list[dict]] = {}  # group title -> its nodes
    for order, (key, (cls, inputs, ui)) in enumerate(_entries(graph)):
        nid, spec = ids[key], info[cls]
        node_inputs, widgets = [], []
        for group in ("required", "optional"):
            for name, ispec in spec["input"].get(group, {}).items():
                if _is_widget(ispec):
                    if name in inputs:
                        widgets.append(inputs[name])
                        if name == "seed":
                            widgets.append("randomize")  # "control after generate", as the official workflows
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
        col = ui.get("col", depths[key])
        height = _height(cls, spec, len(widgets))
        y = column_y.get(col, GROUP_TOP if "group" in ui else 40)
        column_y[col] = y + height + TITLE_H + GAP_Y
        node = {
            "id": nid,
            "type": cls,
            "pos": [40 + (NODE_W + GAP_X) * col, y],
            "size": [NODE_W, height],
            "flags": {},
            "order": order,
            "mode": ui.get("mode", 0),
            "inputs": node_inputs,
            "outputs": outputs,
            "properties": props,
            "widgets_values": widgets,
        }
        if "title" in ui:
            node["title"] = ui["title"]
        nodes.append(node)
        if "group" in ui:
            groups.setdefault(ui["group"], []).append(node)
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
        "groups": [_group(i + 1, title, members) for i, (title, members) in enumerate(groups.items())],
        "config": {},
        "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
        "version": 0.4,
    }


def _group(gid: int, title: str, members: list[dict]) -> dict:
    """A titled group around its nodes (title bars included), as the frontend saves one."""
    x0 = min(n["pos"][0] for n in members) - GROUP_PAD
    y0 = min(n["pos"][1] for n in members) - TITLE_H - GROUP_TITLE_H - GROUP_PAD
    x1 = max(n["pos"][0] + n["size"][0] for n in members) + GROUP_PAD
    y1 = max(n["pos"][1] + n["size"][1] for n in members) + GROUP_PAD
    return {
        "id": gid,
        "title": title,
        "bounding": [x0, y0, x1 - x0, y1 - y0],
        "color": "#3f789e",
        "font_size": 24,
        "flags": {},
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


THUMB_SIZE = (512, 384)  # the template card's 4:3 thumbnail


def write_thumbnail(path: Path, title: str, graph: dict) -> None:
    """The template card: the title over the example's reference images (edits) or its prompt (text to image).
    Drawn, not rendered by the model: the examples ship without weights."""
    w, h = THUMB_SIZE
    img = Image.new("RGB", THUMB_SIZE, (28, 32, 48))
    d = ImageDraw.Draw(img)
    for y in range(h):  # a dusk gradient
        t = y / h
        d.line(((0, y), (w, y)), fill=(int(40 + 120 * t), int(50 + 40 * t), int(110 - 40 * t)))
    refs = [v for cls, inputs, _ in (e for _, e in _entries(graph)) if cls == "LoadImage" for v in [inputs["image"]]]
    if refs:
        tile = (w - 40 - 16 * (len(refs) - 1)) // len(refs)
        for i, name in enumerate(refs):
            with Image.open(INPUTS / name) as ref:
                ref = ref.convert("RGB")
                ref.thumbnail((tile, 170))
                img.paste(ref, (20 + i * (tile + 16), 150))
    else:
        prompt = next(e[1]["prompt"] for _, e in _entries(graph) if e[2].get("title") == POSITIVE["title"])
        d.rounded_rectangle((20, 140, w - 20, h - 60), 14, fill=(245, 240, 230))
        font = ImageFont.load_default(size=18)
        words, lines = prompt.split(), [""]
        for word in words:
            if d.textlength(f"{lines[-1]} {word}", font=font) > w - 70:
                lines.append("")
            lines[-1] = f"{lines[-1]} {word}".strip()
        d.multiline_text((36, 152), "\n".join(lines[:6]), fill=(40, 40, 40), font=font, spacing=6)
    d.text((20, 24), "QwenPix", fill=(255, 214, 120), font=ImageFont.load_default(size=22))
    d.text((20, 60), title, fill=(255, 255, 255), font=ImageFont.load_default(size=30 if len(title) < 30 else 24))
    img.save(path, quality=88)


def main() -> None:
    write_example_images()
    with tempfile.TemporaryDirectory() as tmp, ComfyServer(Path(tmp)) as server:
        info = ComfyClient(server.url).object_info()
    (OUT / "api").mkdir(parents=True, exist_ok=True)
    EXAMPLES.mkdir(exist_ok=True)
    for name, (text, graph) in graphs().items():
        graph, title = complete(graph, info), title_of(name)
        (OUT / "api" / f"{name}.json").write_text(json.dumps(to_api(graph, info), indent=2) + "\n")
        (EXAMPLES / f"{title}.json").write_text(json.dumps(to_ui(graph, info, text), indent=2) + "\n")
        write_thumbnail(EXAMPLES / f"{title}.jpg", title, graph)
        print(f"wrote example_workflows/{title}.json (+ .jpg) and workflows/api/{name}.json")


if __name__ == "__main__":
    main()
