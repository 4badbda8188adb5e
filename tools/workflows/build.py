"""The format machinery of the example workflows: a graph described as data -> the UI file the frontend would save
(`to_ui`, with the layout and the note), its API twin (`to_api`, bypassed nodes left out), the node defaults
(`complete`, from a running ComfyUI's /object_info), the example input images and the template cards' thumbnails.

A node is `(class_type, inputs)` or `(class_type, inputs, ui)`; `ui` holds what only the UI file has:
`title` (the node's title), `mode` (BYPASS: a bypassed node, which the API twin leaves out as the frontend
does), `group` (the titled group around the node; bypass a group to switch a branch off) and `col` (the
layout column, default: its dependency depth). Links are (key, output slot).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from tools.comfy_paths import ROOT

OUT = ROOT / "workflows"  # api/ (API-format twins) and inputs/
EXAMPLES = ROOT / "example_workflows"  # UI workflows and thumbnails, as ComfyUI's template browser reads them
INPUTS = OUT / "inputs"  # example reference images; the main job copies them into ComfyUI's input folder
BYPASS = 4  # LiteGraph's node mode for "bypassed"
POSITIVE, NEGATIVE = {"title": "Positive Prompt"}, {"title": "Negative Prompt"}
EXAMPLE_IMAGES = ("qwenpix_example_1.png", "qwenpix_example_2.png", "qwenpix_example_3.png")
MASKED_IMAGE = "qwenpix_example_masked.png"  # example 1 with alpha 0 (Load Image's mask 1) over MASK_BOX
MASK_BOX = (170, 150, 220, 230)  # left, top, right, bottom: a door-sized area of the house front


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


def to_ui(graph: dict, info: dict, note_text: str, models: dict[str, tuple[str, str]] | None = None) -> dict:
    """The UI workflow: nodes laid out in columns, the note above them; `models` (file name -> (models
    sub-folder, download URL)) gives each loader the file's download entry, as the official workflows do."""
    models = models or {}
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
        downloads = [
            {"name": v, "url": models[v][1], "directory": models[v][0]}
            for v in inputs.values()
            if isinstance(v, str) and v in models
        ]
        if downloads:
            props["models"] = downloads
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
    with Image.open(INPUTS / EXAMPLE_IMAGES[0]) as first:
        masked = first.convert("RGBA")
    alpha = Image.new("L", masked.size, 255)
    ImageDraw.Draw(alpha).rectangle(MASK_BOX, fill=0)  # the pixels keep their colour; only the alpha marks them
    masked.putalpha(alpha)
    masked.save(INPUTS / MASKED_IMAGE, optimize=True)


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
    size = 30  # the largest size at which the title fits the card's width (never below 18)
    while size > 18 and d.textlength(title, font=ImageFont.load_default(size=size)) > w - 40:
        size -= 1
    d.text((20, 60), title, fill=(255, 255, 255), font=ImageFont.load_default(size=size))
    img.save(path, quality=88)
