"""The example workflows and the pack's web extension in ComfyUI's real frontend, in a headless Chromium.

One Node script (tests/frontend/drive_frontend.mjs, playwright-core driving Debian's chromium) opens the test
server's editor and: loads the text-to-image workflow, sets 2 steps and a small custom size in its widgets and
queues it from the page (`app.queuePrompt`); queues it again with a native BasicScheduler into the sampler's
`sigmas` (the sampler then warns that its own steps and schedule are unused), waits for the extension's toast
with that warning and checks the fallback banner for frontends without toasts; loads every UI workflow, lists
node types the frontend does not know and converts the graph to an API prompt (`app.graphToPrompt`); and
changes the aspect preset of a new Empty Latent node. The tests below check its report against the API twins
in workflows/api/ and the server's /history.

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

from tools.comfy_harness import ComfyClient

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent
UI = sorted((ROOT / "workflows").glob("*.json"))
API_DIR = ROOT / "workflows" / "api"
SCRIPT = ROOT / "tests" / "frontend" / "drive_frontend.mjs"
BROWSER_DIR = ROOT / ".comfyui" / "browser"  # playwright-core, installed by tools/setup_browser.sh
CHROMIUM = Path(os.environ.get("QWENPIX_CHROMIUM", "/usr/bin/chromium"))
RUN_WORKFLOW = "qwen_image_t2i"
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
        "workflows": {p.stem: str(p) for p in UI},
        "run": {"workflow": str(ROOT / "workflows" / f"{RUN_WORKFLOW}.json"), "widgets": RUN_WIDGETS},
        "warning": {
            "workflow": str(ROOT / "workflows" / f"{RUN_WORKFLOW}.json"),
            "widgets": WARNING_WIDGETS,
            "scheduler": WARNING_SCHEDULER,
            "timeout_ms": 240000,
        },
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


def test_every_ui_workflow_has_an_api_twin():
    assert UI, "no UI workflows in workflows/"
    assert [p.stem for p in UI] == sorted(p.stem for p in API_DIR.glob("*.json"))


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
    assert _ok(report["workflows"][path.stem])["overlaps"] == []


@pytest.mark.parametrize("path", UI, ids=[p.stem for p in UI])
def test_frontend_converts_ui_workflow_to_its_api_twin(report, path):
    record = _ok(report["workflows"][path.stem])
    got = _graph(record["output"])
    want = _graph(json.loads((API_DIR / path.name).read_text()))
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
