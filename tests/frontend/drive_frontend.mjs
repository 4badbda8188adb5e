// Drives ComfyUI's own frontend in a headless Debian Chromium (playwright-core) for tests/test_e2e_frontend.py.
// It queues the "run" workflow from the page first (the caller waits for it in /history), then loads and converts
// each workflow, then checks the extension's aspect sync on a new Empty Latent node.
//
//   node tests/frontend/drive_frontend.mjs JOB.json
//
// JOB.json: {
//   "url": "http://127.0.0.1:PORT",           the ComfyUI server (its user dir skips the first-run dialog)
//   "browser_dir": ".../.comfyui/browser",    where tools/setup_browser.sh installed playwright-core
//   "chromium": "/usr/bin/chromium",          the Debian browser binary (no browser is ever downloaded)
//   "workflows": {"name": "path/to/ui.json"}, UI-format workflows to load and convert
//   "run": {"workflow": "path", "widgets": {nodeType: {widget: value}}},  one workflow queued from the page after
//          setting those widgets (in order) on the first node of each type
//   "screenshot": "path.png" (optional)       the editor after queueing, for debugging
//   "result": "path.json" (optional)          where to write the result (default: stdout)
// }
// The result is one JSON object:
//   {"extensions": [registered frontend extension names],
//    "workflows": {name: {"nodes", "loaded_nodes", "missing", "overlaps", "output"}},
//    "run": {"prompt_id", "status", "response", "output"}, "aspect": [{"step", "aspect", "width", ...}],
//    "console_errors": [...], "page_errors": [uncaught exceptions with their stacks]}
// Each phase that fails records {"error": message} in its place instead of aborting the others.
import { readFileSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { join } from "node:path";

const job = JSON.parse(readFileSync(process.argv[2], "utf8"));
const require = createRequire(join(job.browser_dir, "package.json"));
const { chromium } = require("playwright-core");

const CHROMIUM_ARGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-dev-shm-usage",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--no-first-run",
];
const PRESET_16_9 = "16:9 (1664x928)";

async function phase(fn) {
  try {
    return await fn();
  } catch (e) {
    return { error: String(e?.stack ?? e) };
  }
}

// In the page: load a UI workflow, report node types the frontend does not know, convert it to an API prompt.
async function loadAndConvert(page, workflow) {
  return page.evaluate(async (wf) => {
    const registered = window.LiteGraph.registered_node_types;
    await window.app.loadGraphData(wf, true, true, null);
    const fileTypes = wf.nodes.map((n) => n.type);
    const graphTypes = window.app.graph.nodes.map((n) => n.type);
    const missing = [...new Set([...fileTypes, ...graphTypes])].filter((t) => !(t in registered));
    const { output } = await window.app.graphToPrompt();
    // nodes drawn on top of each other (title bar included), after the frontend grew them to their minimum size
    const overlaps = [];
    const nodes = window.app.graph.nodes;
    const title = window.LiteGraph.NODE_TITLE_HEIGHT;
    const rect = (n) => [n.pos[0], n.pos[1] - title, n.size[0], n.size[1] + title];
    const name = (n) => `${n.type}#${n.id}`;
    nodes.forEach((a, i) => {
      const [ax, ay, aw, ah] = rect(a);
      for (const b of nodes.slice(i + 1)) {
        const [bx, by, bw, bh] = rect(b);
        if (ax < bx + bw && bx < ax + aw && ay < by + bh && by < ay + ah) overlaps.push([name(a), name(b)]);
      }
    });
    return { nodes: fileTypes.length, loaded_nodes: graphTypes.length, missing, overlaps, output };
  }, workflow);
}

// In the page: a helper that sets a widget the way a user's edit does (value, callback, onWidgetChanged).
function installHelpers() {
  window.__qwenpixSetWidget = (node, name, value) => {
    const w = node.widgets.find((x) => x.name === name);
    if (!w) throw new Error(`${node.type} has no widget ${name}`);
    if (w.setValue) w.setValue(value, { node, canvas: window.app.canvas });
    else {
      w.value = value;
      w.callback?.(value, window.app.canvas, node);
    }
  };
}

async function runFromPage(page, run) {
  const workflow = JSON.parse(readFileSync(run.workflow, "utf8"));
  const output = await page.evaluate(
    async ({ wf, widgets }) => {
      await window.app.loadGraphData(wf, true, true, null);
      for (const [type, values] of Object.entries(widgets)) {
        const node = window.app.graph.nodes.find((n) => n.type === type);
        if (!node) throw new Error(`the workflow has no ${type} node`);
        for (const [name, value] of Object.entries(values)) window.__qwenpixSetWidget(node, name, value);
      }
      return (await window.app.graphToPrompt()).output;
    },
    { wf: workflow, widgets: run.widgets },
  );
  const posted = page.waitForResponse(
    (r) => r.request().method() === "POST" && new URL(r.url()).pathname.endsWith("/prompt"),
    { timeout: 30000 },
  );
  await page.evaluate(() => window.app.queuePrompt(0, 1));
  const response = await posted;
  const body = await response.json();
  return { prompt_id: body.prompt_id ?? null, status: response.status(), response: body, output };
}

// In the page: a fresh Empty Latent node, then the aspect edits a user makes; the widgets after each one.
async function aspectSync(page) {
  return page.evaluate(
    async (preset) => {
      const set = window.__qwenpixSetWidget;
      const settle = () => new Promise((r) => setTimeout(r, 0)); // the extension syncs on a microtask at creation
      const graph = window.app.graph;
      graph.clear();
      const node = window.LiteGraph.createNode("QwenPixEmptyLatent");
      graph.add(node);
      await settle();
      const state = (step) => {
        const w = (name) => node.widgets.find((x) => x.name === name);
        return {
          step,
          aspect: w("aspect").value,
          width: w("width").value,
          height: w("height").value,
          width_disabled: !!w("width").disabled,
          height_disabled: !!w("height").disabled,
        };
      };
      const steps = [state("created")];
      set(node, "aspect", "custom");
      set(node, "width", 512);
      set(node, "height", 384);
      steps.push(state("custom 512x384"));
      set(node, "aspect", preset);
      steps.push(state(preset));
      const { output } = await window.app.graphToPrompt();
      steps[steps.length - 1].prompt_inputs = output[String(node.id)]?.inputs ?? null;
      set(node, "aspect", "custom");
      steps.push(state("custom again"));
      return steps;
    },
    PRESET_16_9,
  );
}

const browser = await chromium.launch({ executablePath: job.chromium, args: CHROMIUM_ARGS });
const result = { workflows: {}, console_errors: [], page_errors: [] };
try {
  const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
  page.on("console", (m) => m.type() === "error" && result.console_errors.push(m.text()));
  page.on("pageerror", (e) => result.page_errors.push(String(e?.stack ?? e)));
  // only the test server: the frontend's calls to api.comfy.org and the like fail at once instead of timing out
  const origin = new URL(job.url).origin;
  await page.route((url) => url.origin !== origin, (route) => route.abort("blockedbyclient"));
  await page.goto(job.url, { waitUntil: "domcontentloaded" });
  await page.waitForFunction(() => window.app && window.app.graph && window.LiteGraph, null, { timeout: 60000 });
  await page.evaluate(installHelpers);
  result.extensions = await page.evaluate(() => window.app.extensions.map((e) => e.name));
  // queue first: the server runs the prompt while the page converts the workflows
  if (job.run) result.run = await phase(() => runFromPage(page, job.run));
  if (job.screenshot) await phase(() => page.screenshot({ path: job.screenshot }));
  for (const [name, path] of Object.entries(job.workflows ?? {})) {
    result.workflows[name] = await phase(() => loadAndConvert(page, JSON.parse(readFileSync(path, "utf8"))));
  }
  result.aspect = await phase(() => aspectSync(page));
} finally {
  await browser.close();
}
if (job.result) writeFileSync(job.result, JSON.stringify(result, null, 2));
else process.stdout.write(JSON.stringify(result) + "\n");
