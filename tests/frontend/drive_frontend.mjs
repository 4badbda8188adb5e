// Drives ComfyUI's own frontend in a headless Debian Chromium (playwright-core) for tests/test_e2e_frontend.py.
// It queues the "run" workflow from the page first (the caller waits for it in /history), then queues the "warning"
// graph and waits for the extension to show the backend's qwenpix.warning as a toast (and checks the fallback
// banner), then loads and converts each workflow, then checks the extension's aspect sync on a new Empty Latent node.
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
//   "warning": {"workflow": "path", "widgets": {...}, "scheduler": {widget: value}, "timeout_ms": N}  the workflow
//          with a BasicScheduler from its QwenPixDiTLoader into its QwenPixSampler's sigmas (the sampler warns that
//          steps/schedule/... are unused), queued from the page; the toast it shows is recorded
//   "templates": {"module": "qwenpix", "names": [...]}  open the template browser (Comfy.BrowseTemplates) and record
//          each named card of that pack: its title, description and thumbnail (src, loaded size)
//   "locales": {"langs": ["en", "zh"], "types": [node types]}  reload the page in each language (the Comfy.Locale
//          setting, restored afterwards) and record each type's node title and input labels
//   "edit": {"workflow": "path", "widgets": {nodeType: {widget: value}}, "images": [file names]}  an edit workflow
//          whose encode nodes get one more LoadImage per extra file, linked to their next free imageN input
//          (widgets set on every node of each type), queued from the page
//   "screenshot": "path.png" (optional)       the editor after queueing, for debugging
//   "result": "path.json" (optional)          where to write the result (default: stdout)
// }
// The result is one JSON object:
//   {"extensions": [registered frontend extension names],
//    "workflows": {name: {"nodes", "loaded_nodes", "missing", "overlaps", "output"}},
//    "run": {"prompt_id", "status", "response", "output"}, "aspect": [{"step", "aspect", "width", ...}],
//    "warning": {"prompt_id", "status", "response", "sampler": {"id", "title"}, "events": [qwenpix.warning data],
//                "toasts": [{"summary", "detail", "severity"}], "marked": [the sampler's qwenpix_warnings],
//                "fallback": {"banner": [texts]}},
//    "templates": {"listed": /api/workflow_templates, "cards": {name: {"title", "description", "src", "width",
//                  "height"}}, "fetched": {URL path of each pack file the page fetched: HTTP status}},
//    "locales": {lang: {type: {"title", "inputs": {name: label}, "widgets": {name: label}}}},
//    "edit": {"prompt_id", "status", "response", "output", "slots": [each encoder's image inputs after linking],
//             "freshSlots": [the image inputs of a new Edit Encode node], "slots21": [a new Qwen-Image-2.1
//             Encode's image inputs, then after linking image1 and image2]},
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
    const sizes = Object.fromEntries(nodes.map((n) => [name(n), [...n.pos, ...n.size]]));
    return { nodes: fileTypes.length, loaded_nodes: graphTypes.length, missing, overlaps, sizes, output };
  }, workflow);
}

// In the page: a helper that sets a widget the way a user's edit does (value, callback, onWidgetChanged), and a
// record of the qwenpix.warning events the websocket delivers.
function installHelpers() {
  window.__qwenpixEvents = []; // every qwenpix.warning the websocket delivers, as the extension receives it
  window.comfyAPI.api.api.addEventListener("qwenpix.warning", (e) => window.__qwenpixEvents.push(e.detail));
  window.__qwenpixDone = []; // prompts that finished (success, error or interrupted)
  for (const type of ["execution_success", "execution_error", "execution_interrupted"]) {
    window.comfyAPI.api.api.addEventListener(type, (e) => window.__qwenpixDone.push(e.detail?.prompt_id));
  }
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

// An edit graph with more reference images, built in the page as a user would (new LoadImage nodes linked to the
// encoders' next free image inputs), then queued.
async function editFromPage(page, edit) {
  const posted = page.waitForResponse(
    (r) => r.request().method() === "POST" && new URL(r.url()).pathname.endsWith("/prompt"),
    { timeout: 30000 },
  );
  const output = await page.evaluate(
    async ({ wf, widgets, images }) => {
      const app = window.app;
      await app.loadGraphData(wf, true, true, null);
      for (const [type, values] of Object.entries(widgets)) {
        for (const node of app.graph.nodes.filter((n) => n.type === type)) {
          for (const [name, value] of Object.entries(values)) window.__qwenpixSetWidget(node, name, value);
        }
      }
      const encoders = app.graph.nodes.filter((n) => n.type === "QwenPixEditEncode");
      for (const [i, file] of images.entries()) {
        const load = window.LiteGraph.createNode("LoadImage");
        load.pos = [40, 900 + 360 * i];
        app.graph.add(load);
        window.__qwenpixSetWidget(load, "image", file);
        for (const enc of encoders) {
          const free = enc.inputs.findIndex((inp) => /^image\d+$/.test(inp.name) && inp.link == null);
          if (free < 0) throw new Error(`no free image input on ${enc.type}#${enc.id}`);
          load.connect(0, enc, free);
          await new Promise((r) => setTimeout(r, 0)); // the extension shows the next input after a connection
        }
      }
      const slots = encoders.map((enc) => enc.inputs.map((inp) => inp.name).filter((n) => /^image\d+$/.test(n)));
      const fresh = window.LiteGraph.createNode("QwenPixEditEncode");
      app.graph.add(fresh);
      await new Promise((r) => setTimeout(r, 0));
      const freshSlots = fresh.inputs.map((inp) => inp.name).filter((n) => /^image\d+$/.test(n));
      app.graph.remove(fresh);
      // the Qwen-Image-2.1 Encode grows the same way: fresh, then with image1 and image2 linked
      const fresh21 = window.LiteGraph.createNode("QwenPix21Encode");
      app.graph.add(fresh21);
      await new Promise((r) => setTimeout(r, 0));
      const names21 = () => fresh21.inputs.map((inp) => inp.name).filter((n) => /^image\d+$/.test(n));
      const slots21 = [names21()];
      const source = app.graph.nodes.find((n) => n.type === "LoadImage");
      for (const name of ["image1", "image2"]) {
        source?.connect(0, fresh21, fresh21.inputs.findIndex((inp) => inp.name === name));
        await new Promise((r) => setTimeout(r, 0));
      }
      slots21.push(names21());
      app.graph.remove(fresh21);
      const { output } = await app.graphToPrompt();
      await app.queuePrompt(0, 1);
      return { output, slots, freshSlots, slots21 };
    },
    { wf: JSON.parse(readFileSync(edit.workflow, "utf8")), widgets: edit.widgets, images: edit.images },
  );
  const response = await posted;
  const body = await response.json();
  return { prompt_id: body.prompt_id ?? null, status: response.status(), response: body, ...output };
}

// Queue a graph whose sampler warns, then wait until the toast with the backend's message is on the page; then the
// same event with no toast API (an older frontend) must show the fallback banner.
async function warningFromPage(page, warning) {
  const posted = page.waitForResponse(
    (r) => r.request().method() === "POST" && new URL(r.url()).pathname.endsWith("/prompt"),
    { timeout: 30000 },
  );
  const sampler = await page.evaluate(
    async ({ wf, widgets, scheduler }) => {
      const app = window.app;
      await app.loadGraphData(wf, true, true, null);
      const byType = (type) => {
        const node = app.graph.nodes.find((n) => n.type === type);
        if (!node) throw new Error(`the workflow has no ${type} node`);
        return node;
      };
      for (const [type, values] of Object.entries(widgets)) {
        for (const [name, value] of Object.entries(values)) window.__qwenpixSetWidget(byType(type), name, value);
      }
      const loader = byType("QwenPixDiTLoader");
      const node = byType("QwenPixSampler");
      const sigmas = window.LiteGraph.createNode("BasicScheduler");
      sigmas.pos = [node.pos[0], node.pos[1] + node.size[1] + 80];
      app.graph.add(sigmas);
      for (const [name, value] of Object.entries(scheduler)) window.__qwenpixSetWidget(sigmas, name, value);
      loader.connect(0, sigmas, sigmas.findInputSlot("model"));
      sigmas.connect(0, node, node.findInputSlot("sigmas"));
      if (!node.inputs[node.findInputSlot("sigmas")]?.link) throw new Error("could not connect sigmas");
      await app.queuePrompt(0, 1);
      return { id: String(node.id), title: node.title };
    },
    { wf: JSON.parse(readFileSync(warning.workflow, "utf8")), widgets: warning.widgets, scheduler: warning.scheduler },
  );
  const response = await posted;
  const body = await response.json();
  const out = { prompt_id: body.prompt_id ?? null, status: response.status(), response: body, sampler };
  // the prompt runs to its end (its warnings come while it runs), then a toast for each of its warnings
  await page.waitForFunction((pid) => window.__qwenpixDone.includes(pid), out.prompt_id, {
    timeout: warning.timeout_ms ?? 120000,
    polling: 200,
  });
  await page
    .waitForFunction(
      (pid) => {
        const events = window.__qwenpixEvents.filter((e) => e.prompt_id === pid);
        const details = [...document.querySelectorAll(".p-toast-message .p-toast-detail")].map((d) => d.textContent);
        return events.length > 0 && events.every((e) => details.some((d) => d.includes(e.message)));
      },
      out.prompt_id,
      { timeout: 5000, polling: 100 },
    )
    .catch(() => {}); // what is there is reported either way
  Object.assign(
    out,
    await page.evaluate(
      ({ pid, id }) => ({
        events: window.__qwenpixEvents.filter((e) => e.prompt_id === pid),
        toasts: [...document.querySelectorAll(".p-toast-message")].map((m) => ({
          summary: m.querySelector(".p-toast-summary")?.textContent ?? null,
          detail: m.querySelector(".p-toast-detail")?.textContent ?? null,
          severity: [...m.classList].find((c) => /^p-toast-message-(warn|info|error|success)/.test(c)) ?? null,
        })),
        marked: [...(window.app.graph.getNodeById(Number(id))?.qwenpix_warnings ?? [])],
      }),
      { pid: out.prompt_id, id: sampler.id },
    ),
  );
  out.fallback = await page.evaluate(async (id) => {
    const app = window.app;
    const saved = app.extensionManager;
    app.extensionManager = {}; // as an older frontend: no toast store
    try {
      window.comfyAPI.api.api.dispatchCustomEvent("qwenpix.warning", {
        node: id,
        prompt_id: "fallback-check",
        message: "fallback check: no toast API",
      });
      await new Promise((r) => setTimeout(r, 50));
    } finally {
      app.extensionManager = saved;
    }
    const banner = document.getElementById("qwenpix-warnings");
    return { banner: banner ? [...banner.querySelectorAll(".qwenpix-warning-text")].map((e) => e.textContent) : [] };
  }, sampler.id);
  return out;
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

// The template browser: each card of the pack, with its title, description and thumbnail once loaded.
async function templateCards(page, templates) {
  const listed = await page.evaluate(async () => (await window.comfyAPI.api.api.fetchApi("/workflow_templates")).json());
  const fetched = {}; // thumbnail URL path -> HTTP status (the page shows them as blob: URLs)
  const onResponse = (r) => {
    const path = decodeURIComponent(new URL(r.url()).pathname);
    if (path.includes(`/workflow_templates/${templates.module}/`)) fetched[path] = r.status();
  };
  page.on("response", onResponse);
  await page.evaluate(() => window.app.extensionManager.command.execute("Comfy.BrowseTemplates"));
  await page.waitForSelector('[data-testid="template-workflows-content"]', { timeout: 30000 });
  // the pack's own category, under "Extensions" in the side bar (a collapsible group)
  const dialog = page.locator(".p-dialog").filter({ has: page.locator('[data-testid="template-workflows-content"]') });
  const group = dialog.getByText("Extensions", { exact: true }).first();
  await group.waitFor({ timeout: 60000 }); // the side bar lists the packs once the templates have loaded
  const item = dialog.getByText(templates.label ?? templates.module, { exact: true }).first();
  if (!(await item.isVisible())) await group.click(); // a collapsed group
  await item.waitFor({ timeout: 30000 });
  await item.click();
  await page.waitForTimeout(300);
  if (templates.screenshot) await page.screenshot({ path: templates.screenshot });
  const cards = {};
  for (const name of templates.names) {
    const card = page.locator(`[data-testid="template-workflow-${name}"]`).first();
    await card.waitFor({ timeout: 60000 });
    await card.scrollIntoViewIfNeeded();
    const img = card.locator("img").first();
    await img.waitFor({ timeout: 60000 });
    await page.waitForFunction((el) => el.complete && el.naturalWidth > 0, await img.elementHandle(), {
      timeout: 15000,
      polling: 100,
    }).catch(() => {}); // reported as loaded size 0
    cards[name] = await card.evaluate((el) => {
      const im = el.querySelector("img");
      return {
        title: el.querySelector("h3")?.textContent?.trim() ?? null,
        description: el.querySelector("p")?.textContent?.trim() ?? null,
        src: im?.getAttribute("src") ?? null,
        width: im?.naturalWidth ?? 0,
        height: im?.naturalHeight ?? 0,
      };
    });
  }
  await page.keyboard.press("Escape");
  page.off("response", onResponse);
  return { listed, cards, fetched };
}

// The editor in another language: set Comfy.Locale, reload, read the titles and labels of fresh nodes, restore.
async function localeLabels(page, locales) {
  const setLocale = (lang) => page.evaluate((l) => window.app.extensionManager.setting.set("Comfy.Locale", l), lang);
  const before = await page.evaluate(() => window.app.extensionManager.setting.get("Comfy.Locale"));
  const out = {};
  try {
    for (const lang of locales.langs) {
      await setLocale(lang);
      await page.reload({ waitUntil: "domcontentloaded" });
      // the editor is ready (its node definitions registered with the translations) once the canvas has a graph
      await page.waitForFunction(
        (type) => window.app?.vueAppReady && window.app.graph && window.LiteGraph?.registered_node_types?.[type],
        locales.types[0],
        { timeout: 60000 },
      );
      await page.waitForTimeout(1000);
      out[lang] = await readLabels(page, locales.types);
    }
  } finally {
    await setLocale(before ?? "en");
  }
  return out;
}

async function readLabels(page, types) {
  return page.evaluate((types) => {
      const out = {};
      for (const type of types) {
        const node = window.LiteGraph.createNode(type);
        out[type] = {
          title: node.title,
          inputs: Object.fromEntries(node.inputs.map((i) => [i.name, i.localized_name ?? i.label ?? i.name])),
          widgets: Object.fromEntries((node.widgets ?? []).map((w) => [w.name, w.label ?? w.name])),
        };
      }
      return out;
    }, types);
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
  if (job.warning) result.warning = await phase(() => warningFromPage(page, job.warning));
  if (job.edit) result.edit = await phase(() => editFromPage(page, job.edit));
  if (job.screenshot) await phase(() => page.screenshot({ path: job.screenshot }));
  for (const [name, path] of Object.entries(job.workflows ?? {})) {
    result.workflows[name] = await phase(() => loadAndConvert(page, JSON.parse(readFileSync(path, "utf8"))));
  }
  result.aspect = await phase(() => aspectSync(page));
  if (job.templates) result.templates = await phase(() => templateCards(page, job.templates));
  if (job.locales) result.locales = await phase(() => localeLabels(page, job.locales));
} finally {
  await browser.close();
}
if (job.result) writeFileSync(job.result, JSON.stringify(result, null, 2));
else process.stdout.write(JSON.stringify(result) + "\n");
