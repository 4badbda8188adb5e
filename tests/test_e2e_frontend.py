"""The example workflows and the pack's web extension in ComfyUI's real frontend, in a headless Chromium.

One Node script (tests/frontend/drive_frontend.mjs, playwright-core driving Debian's chromium) opens the test
server's editor and: loads the text-to-image workflow, sets 2 steps and a small custom size in its widgets and
queues it from the page (`app.queuePrompt`); queues it again with a native BasicScheduler into the sampler's
`sigmas` (the sampler then warns that its own steps and schedule are unused), waits for the extension's toast
with that warning and checks the fallback banner for frontends without toasts; loads every UI workflow, lists
node types the frontend does not know and converts the graph to an API prompt (`app.graphToPrompt`); and
changes the aspect preset of a new Empty Latent node; opens the template browser and reads the pack's cards
(title, thumbnail); loads workflows saved by the previous release (tests/fixtures/previous_release/); reloads
the editor in English and Chinese and reads node titles and input labels (locales/). The tests below check its
report against the API twins in workflows/api/ and the server's /history.

The browser comes from tools/setup_browser.sh (run by this module if it has not been run); the tests skip only
when that script could not install it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from tools.comfy_harness import PACK_NAME, ComfyClient
from tools.make_workflows import THUMB_SIZE, title_of, widget_default

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent
UI = sorted((ROOT / "example_workflows").glob("*.json"))
API_DIR = ROOT / "workflows" / "api"
TWIN = {title_of(p.stem): p.stem for p in API_DIR.glob("*.json")}  # example title -> its API twin's name
PREVIOUS = ROOT / "tests" / "fixtures" / "previous_release"  # UI + API files as the previous release shipped them
OLD = sorted(p for p in PREVIOUS.glob("*.json") if not p.name.endswith(".api.json"))
LOCALE_TYPES = ["QwenPixDiTLoader", "QwenPixSampler", "QwenPixEditEncode", "QwenPixTextEncode"]
SCRIPT = ROOT / "tests" / "frontend" / "drive_frontend.mjs"
BROWSER_DIR = ROOT / ".comfyui" / "browser"  # playwright-core, installed by tools/setup_browser.sh
CHROMIUM = Path(os.environ.get("QWENPIX_CHROMIUM", "/usr/bin/chromium"))
RUN_WORKFLOW = "qwen_image_t2i"
RUN_FILE = ROOT / "example_workflows" / f"{title_of(RUN_WORKFLOW)}.json"
RUN_PREFIX = "test/frontend_page_run"
# widget edits made in the page before queueing (in order): 2 steps and a small custom size, to fit CI on a CPU
RUN_WIDGETS = {
    "QwenPixSampler": {"steps": 2},
    "QwenPixEmptyLatent": {"aspect": "custom", "width": 256, "height": 192},
    "SaveImage": {"filename_prefix": RUN_PREFIX},
}
PRESET = "16:9 (1664x928)"
WARNING_PREFIX = "test/frontend_page_warning"
WARNING_WIDGETS = {**RUN_WIDGETS, "SaveImage": {"filename_prefix": WARNING_PREFIX}}
EDIT_WORKFLOW, EDIT_PREFIX = "qwen_image_edit_2509_two_images", "test/frontend_page_edit6"
EDIT_WIDGETS = {  # 2 steps, the references' own (small) size, to fit CI on a CPU
    "QwenPixSampler": {"steps": 2},
    "QwenPixEditEncode": {"resize": "keep size (no shift/zoom)"},
    "SaveImage": {"filename_prefix": EDIT_PREFIX},
}
EDIT_MORE = [f"qwenpix_example_{i % 3 + 1}.png" for i in range(2, 6)]  # Picture 3..6 on top of the example's two
WARNING_SCHEDULER = {"scheduler": "simple", "steps": 2, "denoise": 1.0}  # the BasicScheduler's widgets


def _browser_missing() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is not installed"
    if not (BROWSER_DIR / "node_modules" / "playwright-core" / "package.json").exists():
        return f"playwright-core is not installed in {BROWSER_DIR}"
    if shutil.which("node") is None:
        return "node is not installed"
    return None


@pytest.fixture(scope="module")
def node_bin() -> str:
    """Node.js, once Chromium and playwright-core are installed (tools/setup_browser.sh, idempotent); skips with
    the installer's reason only if they cannot be installed on this machine."""
    if _browser_missing():
        subprocess.run(["bash", str(ROOT / "tools" / "setup_browser.sh")], check=False, timeout=900)
    missing = _browser_missing()
    if missing:
        reason = BROWSER_DIR / "UNAVAILABLE"
        pytest.skip(
            f"browser tests need Chromium + playwright-core: {missing}"
            + (f" ({reason.read_text().strip()})" if reason.exists() else "")
        )
    return shutil.which("node")


@pytest.fixture(scope="module")
def report(node_bin, example_models, tmp_path_factory) -> dict:
    """The Node script's report for every UI workflow, the run from the page and the aspect check."""
    work = tmp_path_factory.mktemp("frontend")
    job = {
        "url": example_models.url,
        "browser_dir": str(BROWSER_DIR),
        "chromium": str(CHROMIUM),
        "workflows": {**{p.stem: str(p) for p in UI}, **{f"previous/{p.stem}": str(p) for p in OLD}},
        "run": {"workflow": str(RUN_FILE), "widgets": RUN_WIDGETS},
        "warning": {
            "workflow": str(RUN_FILE),
            "widgets": WARNING_WIDGETS,
            "scheduler": WARNING_SCHEDULER,
            "timeout_ms": 240000,
        },
        "edit": {
            "workflow": str(ROOT / "example_workflows" / f"{title_of(EDIT_WORKFLOW)}.json"),
            "widgets": EDIT_WIDGETS,
            "images": EDIT_MORE,
        },
        "templates": {
            "module": PACK_NAME,
            "label": "QwenPix",
            "names": [p.stem for p in UI],
            "screenshot": str(work / "templates.png"),
        },
        "locales": {"langs": ["en", "zh"], "types": LOCALE_TYPES},
        "screenshot": str(work / "after_queue.png"),
        "result": str(work / "report.json"),
    }
    (work / "job.json").write_text(json.dumps(job))
    proc = subprocess.run([node_bin, str(SCRIPT), str(work / "job.json")], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"{SCRIPT.name} exited with {proc.returncode}:\n{proc.stderr[-4000:]}")
    out = json.loads((work / "report.json").read_text())
    out["screenshot"] = job["screenshot"]
    return out


def _graph(prompt: dict) -> dict:
    """An API prompt without the frontend-only `_meta` (titles): node id -> (class_type, inputs)."""
    return {nid: (node["class_type"], node["inputs"]) for nid, node in prompt.items()}


def _ok(record: dict) -> dict:
    assert "error" not in record, record["error"]
    return record


def test_every_ui_workflow_has_an_api_twin_and_a_thumbnail():
    assert UI, "no UI workflows in example_workflows/"
    assert sorted(TWIN) == [p.stem for p in UI]
    assert not list((ROOT / "workflows").glob("*.json")), "UI files in workflows/ would be listed twice as templates"
    for path in UI:
        with Image.open(path.with_suffix(".jpg")) as im:  # the frontend asks for <name>.jpg
            assert (im.format, im.size) == ("JPEG", THUMB_SIZE)


def test_the_pack_extension_is_registered_without_page_errors(report):
    assert "qwenpix.core" in report["extensions"]
    ours = [e for e in report["page_errors"] if "qwenpix" in e.lower()]
    assert not ours, "\n\n".join(ours)


@pytest.mark.parametrize("path", UI, ids=[p.stem for p in UI])
def test_ui_workflow_loads_with_every_node_type_known(report, path):
    record = _ok(report["workflows"][path.stem])
    assert record["missing"] == []
    assert record["loaded_nodes"] == record["nodes"]


@pytest.mark.parametrize("path", UI, ids=[p.stem for p in UI])
def test_ui_workflow_nodes_do_not_overlap_once_sized_by_the_frontend(report, path):
    record = _ok(report["workflows"][path.stem])
    assert record["overlaps"] == [], json.dumps(record["sizes"])  # [x, y, width, height] of each node


@pytest.mark.parametrize("path", UI, ids=[p.stem for p in UI])
def test_frontend_converts_ui_workflow_to_its_api_twin(report, path):
    record = _ok(report["workflows"][path.stem])
    got = _graph(record["output"])
    want = _graph(json.loads((API_DIR / f"{TWIN[path.stem]}.json").read_text()))
    assert sorted(got) == sorted(want), "node ids differ"
    diffs = {nid: {"frontend": got[nid], "api file": want[nid]} for nid in want if got[nid] != want[nid]}
    assert not diffs, json.dumps(diffs, indent=1)


def test_workflow_queued_from_the_page_runs_and_saves_an_image(report, example_models):
    run = _ok(report["run"])
    assert run["status"] == 200 and run["response"]["node_errors"] == {}, run["response"]
    # the page's prompt is the shipped API twin with exactly the widget edits made in the page
    want = _graph(json.loads((API_DIR / f"{RUN_WORKFLOW}.json").read_text()))
    for cls, inputs in want.values():
        inputs.update(RUN_WIDGETS.get(cls, {}))
    assert _graph(run["output"]) == want
    res = ComfyClient(example_models.url).wait(run["prompt_id"], timeout=300)
    assert res.status == "success", res.error()
    (img,) = res.images()
    assert f"{img['subfolder']}/{img['filename']}".startswith(RUN_PREFIX)
    with Image.open(example_models.output_dir / img["subfolder"] / img["filename"]) as im:
        assert im.size == (256, 192)


def test_backend_warning_is_shown_as_a_toast_naming_the_node(report, example_models):
    warning = _ok(report["warning"])
    assert warning["status"] == 200 and warning["response"]["node_errors"] == {}, warning["response"]
    res = ComfyClient(example_models.url).wait(warning["prompt_id"], timeout=300)
    assert res.status == "success", res.error()
    sampler = warning["sampler"]
    # the websocket event, as nodes/notices.py sends it: the sampler's node id and the sigmas message
    (event,) = [e for e in warning["events"] if "sigmas" in e["message"]]
    assert event["node"] == sampler["id"] and "2-step" in event["message"], event
    # the toast: severity warn, summary QwenPix, the node's title and id, then the message
    want = f"{sampler['title']} (#{sampler['id']}): {event['message']}"
    toast = next((t for t in warning["toasts"] if t["detail"] == want), None)
    assert toast, warning["toasts"]
    assert toast["summary"] == "QwenPix" and toast["severity"].startswith("p-toast-message-warn")
    # the node is marked (outlined) with its warnings until the next prompt starts
    assert event["message"] in warning["marked"]
    # without the toast API (older frontends): the banner, with the same text
    assert warning["fallback"]["banner"] == [f"{sampler['title']} (#{sampler['id']}): fallback check: no toast API"]


def test_aspect_preset_sets_width_and_height(report):
    aspect = report["aspect"]
    assert isinstance(aspect, list), aspect["error"]
    steps = {s["step"]: s for s in aspect}
    created, custom, preset, again = (steps[k] for k in ("created", "custom 512x384", PRESET, "custom again"))
    # a new node shows its default preset's size, greyed out
    size = re.search(r"\((\d+)x(\d+)\)$", created["aspect"])
    assert size, created
    assert (created["width"], created["height"], created["width_disabled"]) == (*map(int, size.groups()), True)
    # custom: the user's own size, editable
    assert (custom["width"], custom["height"], custom["width_disabled"], custom["height_disabled"]) == (
        512,
        384,
        False,
        False,
    )
    # picking the 16:9 preset writes its size into the widgets (and the prompt), greyed out
    assert (preset["width"], preset["height"], preset["width_disabled"], preset["height_disabled"]) == (
        1664,
        928,
        True,
        True,
    )
    assert preset["prompt_inputs"] == {"aspect": PRESET, "width": 1664, "height": 928, "batch_size": 1}
    # back to custom: editable again, starting from the preset's size
    assert (again["width"], again["height"], again["width_disabled"]) == (1664, 928, False)


def test_template_browser_shows_each_example_with_its_title_and_thumbnail(report):
    templates = _ok(report["templates"])
    assert sorted(templates["listed"][PACK_NAME]) == [p.stem for p in UI]  # listed once each
    for path in UI:
        card = templates["cards"][path.stem]
        assert card["title"] == path.stem, card
        # the page fetched the same-name thumbnail and shows it (a blob: URL) at its own size
        assert templates["fetched"].get(f"/api/workflow_templates/{PACK_NAME}/{path.stem}.jpg") == 200, templates
        assert (card["width"], card["height"]) == THUMB_SIZE, card


@pytest.mark.parametrize("path", OLD, ids=[p.stem for p in OLD])
def test_workflow_saved_by_the_previous_release_loads_unchanged(report, path, example_models):
    record = _ok(report["workflows"][f"previous/{path.stem}"])
    assert record["missing"] == [] and record["loaded_nodes"] == record["nodes"]
    # the frontend still turns it into the prompt the previous release queued (node ids and input names are
    # stable), plus any widget added since at its default
    info = ComfyClient(example_models.url).object_info()
    want = _graph(json.loads(path.with_suffix(".api.json").read_text()))
    for nid, (cls, inputs) in _graph(record["output"]).items():
        assert nid in want and want[nid][0] == cls, nid
        old = want[nid][1]
        assert {k: inputs.get(k) for k in old} == old, (nid, cls)
        spec = {**info[cls]["input"]["required"], **info[cls]["input"].get("optional", {})}
        added = {k: v for k, v in inputs.items() if k not in old}
        assert added == {k: widget_default(spec[k]) for k in added}, (nid, cls, added)
    assert sorted(_graph(record["output"])) == sorted(want)


def test_examples_title_positive_and_negative_prompts_apart():
    for path in UI:
        nodes = json.loads(path.read_text())["nodes"]
        prompts = [n for n in nodes if n["type"] in ("QwenPixTextEncode", "QwenPixEditEncode")]
        titles = [n.get("title") for n in prompts]
        encode21 = [n for n in nodes if n["type"] == "QwenPix21Encode"]  # one node: prompt + negative_prompt widgets
        if encode21:  # Qwen-Image-2.1: the two prompts are that node's own two widgets, apart by construction
            assert not prompts and all(n.get("title") for n in encode21), path.stem
        else:
            assert "Negative Prompt" in titles and None not in titles and len(set(titles)) == len(titles), path.stem
        seeds = [n["widgets_values"] for n in nodes if n["type"].endswith(("Sampler", "KSampler"))]
        assert seeds and all("randomize" in w for w in seeds), path.stem


def test_locales_name_nodes_and_inputs_in_english_and_chinese(report):
    locales = _ok(report["locales"])
    en, zh = locales["en"], locales["zh"]
    assert en["QwenPixDiTLoader"]["title"] == "Load Qwen-Image Diffusion Model"
    assert en["QwenPixDiTLoader"]["widgets"]["dit_name"] == "unet_name"
    assert en["QwenPixSampler"]["widgets"]["cfg_rescale"] == "CFG rescale"
    assert zh["QwenPixDiTLoader"]["title"] == "加载 Qwen-Image 扩散模型"
    assert zh["QwenPixSampler"]["title"] == "Qwen-Image 采样器"
    assert zh["QwenPixEditEncode"]["inputs"]["image1"] == "图 1"
    for lang in (en, zh):  # every node title translated, no key left as its raw name
        for node_type, labels in lang.items():
            assert labels["title"] != node_type


def test_six_image_edit_built_in_the_page_runs(report, example_models):
    edit = _ok(report["edit"])
    assert edit["status"] == 200 and edit["response"]["node_errors"] == {}, edit["response"]
    encoders = [n["inputs"] for n in edit["output"].values() if n["class_type"] == "QwenPixEditEncode"]
    assert len(encoders) == 2 and all(
        sorted(k for k in e if k.startswith("image")) == [f"image{i}" for i in range(1, 7)] for e in encoders
    ), encoders
    # inputs appear as you connect: a new node shows image1 and image2; after six links, image7 is the free one
    assert edit["freshSlots"] == ["image1", "image2"]
    assert edit["slots"] == [[f"image{i}" for i in range(1, 8)]] * 2
    assert edit["slots21"] == [["image1", "image2"], ["image1", "image2", "image3"]]  # Qwen-Image-2.1 Encode too
    res = ComfyClient(example_models.url).wait(edit["prompt_id"], timeout=300)
    assert res.status == "success", res.error()
    (img,) = res.images()
    with Image.open(example_models.output_dir / img["subfolder"] / img["filename"]) as im:
        assert im.size == (384, 256)  # the canvas is Picture 1's own size (keep size)
