// QwenPix frontend extension.
// - Empty Latent (Qwen-Image): picking an aspect preset shows its size in the width/height widgets, which are
//   only used for "custom", and greys them out otherwise.
// - Loaders: the one-line placement/offload plan the backend reports (`ui.qwenpix_plan`) is shown on the node.
// - Warnings: the backend's `qwenpix.warning` websocket event ({node, prompt_id, message}, nodes/notices.py) is
//   shown as a toast naming the node (ComfyUI's new frontend), else as a small banner at the top right; the
//   node gets an amber outline until the next prompt starts. Every warning also goes to the console.
// - Edit Encode and Qwen-Image-2.1 Encode: of their optional image2..image10 inputs only the connected ones and
//   the next free one are shown; connecting the last shown one shows the next (inputs appear as you connect),
//   disconnecting hides the spare.
// - Translations: the pack's locales/<lang>/nodeDefs.json (node names, input labels, tooltips) for languages
//   other than English, applied to the pack's own nodes (see applyTranslations).
// User-provided or backend text is only ever set through textContent / widget values, never as HTML.
import { api } from "../../scripts/api.js";
import { app } from "../../scripts/app.js";

const PRESET = /\((\d+)x(\d+)\)\s*$/;

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function syncAspect(node) {
  const aspect = widget(node, "aspect");
  const width = widget(node, "width");
  const height = widget(node, "height");
  if (!aspect || !width || !height) return;
  const m = PRESET.exec(String(aspect.value));
  const custom = !m;
  if (m) {
    width.value = Number(m[1]);
    height.value = Number(m[2]);
  }
  for (const w of [width, height]) {
    w.disabled = !custom;
  }
  node.setDirtyCanvas?.(true, true);
}

function showPlan(node, text) {
  let w = widget(node, "qwenpix_plan");
  if (!w) {
    w = node.addWidget("text", "qwenpix_plan", "", () => {}, { serialize: false });
    w.disabled = true;
    w.serializeValue = () => undefined;
  }
  w.value = String(text ?? "");
  node.setDirtyCanvas?.(true, true);
}

const WARNING_EVENT = "qwenpix.warning";
const WARNING_LIFE_MS = 15000;
const WARNING_COLOR = "#f0a020";
const BANNER_ID = "qwenpix-warnings";
const warnedNodes = new Set(); // nodes outlined since the last prompt started

function findNode(id) {
  if (id === null || id === undefined) return null;
  const graph = app.rootGraph ?? app.graph;
  const key = String(id);
  return graph?.getNodeById?.(/^\d+$/.test(key) ? Number(key) : key) ?? null;
}

// The node's outline: drawn on top of the node while it has warnings (cleared when the next prompt starts).
function markNode(node, message) {
  node.qwenpix_warnings = [...(node.qwenpix_warnings ?? []), message];
  warnedNodes.add(node);
  if (!node.__qwenpixOutline) {
    node.__qwenpixOutline = true;
    const onDrawForeground = node.onDrawForeground;
    node.onDrawForeground = function (ctx, ...rest) {
      const r = onDrawForeground?.call(this, ctx, ...rest);
      if (this.qwenpix_warnings?.length && !this.flags?.collapsed) {
        const title = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
        ctx.save();
        ctx.strokeStyle = WARNING_COLOR;
        ctx.lineWidth = 3;
        ctx.strokeRect(-3, -title - 3, this.size[0] + 6, this.size[1] + title + 6);
        ctx.restore();
      }
      return r;
    };
  }
  node.setDirtyCanvas?.(true, true);
}

function clearMarks() {
  for (const node of warnedNodes) {
    node.qwenpix_warnings = [];
    node.setDirtyCanvas?.(true, true);
  }
  warnedNodes.clear();
}

// Without the new frontend's toasts: a non-blocking banner at the top right that closes itself.
function showBanner(text) {
  let box = document.getElementById(BANNER_ID);
  if (!box) {
    box = document.createElement("div");
    box.id = BANNER_ID;
    Object.assign(box.style, {
      position: "fixed",
      top: "12px",
      right: "12px",
      zIndex: "10000",
      maxWidth: "420px",
      display: "flex",
      flexDirection: "column",
      gap: "6px",
    });
    document.body.appendChild(box);
  }
  const item = document.createElement("div");
  item.className = "qwenpix-warning";
  Object.assign(item.style, {
    background: "#3a2a05",
    color: "#ffe2a8",
    border: `1px solid ${WARNING_COLOR}`,
    borderRadius: "6px",
    padding: "8px 28px 8px 10px",
    font: "13px sans-serif",
    position: "relative",
    boxShadow: "0 2px 8px rgba(0,0,0,.4)",
  });
  const title = document.createElement("strong");
  title.textContent = "QwenPix: ";
  const body = document.createElement("span");
  body.className = "qwenpix-warning-text";
  body.textContent = text;
  const close = document.createElement("button");
  close.textContent = "\u00d7";
  close.title = "Dismiss";
  Object.assign(close.style, {
    position: "absolute",
    top: "2px",
    right: "6px",
    background: "none",
    border: "none",
    color: "inherit",
    cursor: "pointer",
    fontSize: "16px",
  });
  close.onclick = () => item.remove();
  item.append(title, body, close);
  box.appendChild(item);
  setTimeout(() => item.remove(), WARNING_LIFE_MS);
}

function showWarning(data) {
  const message = String(data?.message ?? "");
  if (!message) return;
  const id = data?.node ?? null;
  const node = findNode(id);
  const where = node ? `${node.title || node.type} (#${node.id})` : id !== null ? `node #${id}` : null;
  const text = where ? `${where}: ${message}` : message;
  console.warn(`[QwenPix] ${text}`);
  if (node) markNode(node, message);
  const toast = app.extensionManager?.toast;
  if (typeof toast?.add === "function") {
    toast.add({ severity: "warn", summary: "QwenPix", detail: text, life: WARNING_LIFE_MS });
  } else {
    showBanner(text);
  }
}

// ComfyUI serves every pack's locales at /i18n and frontend 1.32 merges them at start-up, but it loads a
// non-English language's own messages afterwards with setLocaleMessage, which replaces the merged ones: the pack's
// Chinese names would never show. So for a non-English locale the extension reads the pack's entries itself and
// puts them on its node definitions (names, descriptions, tooltips) and on each new node (input/widget labels).
let translations = null; // node id -> {display_name, description, inputs: {name: {name, tooltip}}, outputs}

async function loadTranslations() {
  const lang = app.extensionManager?.setting?.get?.("Comfy.Locale") ?? "en";
  if (!lang || lang === "en") return;
  try {
    const all = await (await api.fetchApi("/i18n")).json();
    const defs = all?.[lang]?.nodeDefs ?? {};
    translations = Object.fromEntries(Object.entries(defs).filter(([id]) => id.startsWith("QwenPix")));
  } catch (e) {
    console.warn("[QwenPix] translations not loaded:", e);
  }
}

function translateDef(nodeData) {
  const t = translations?.[nodeData.name];
  if (!t) return;
  if (t.display_name) nodeData.display_name = t.display_name;
  if (t.description) nodeData.description = t.description;
  for (const group of ["required", "optional"]) {
    for (const [name, spec] of Object.entries(nodeData.input?.[group] ?? {})) {
      const tip = t.inputs?.[name]?.tooltip;
      if (tip && Array.isArray(spec)) spec[1] = { ...(spec[1] ?? {}), tooltip: tip };
    }
  }
  const tips = nodeData.output_tooltips;
  if (Array.isArray(tips)) tips.forEach((_, i) => (tips[i] = t.outputs?.[i]?.tooltip ?? tips[i]));
}

function translateNode(node) {
  const t = translations?.[node.comfyClass];
  if (!t) return;
  for (const w of node.widgets ?? []) w.label = t.inputs?.[w.name]?.name ?? w.label;
  for (const slot of node.inputs ?? []) slot.localized_name = t.inputs?.[slot.name]?.name ?? slot.localized_name;
  (node.outputs ?? []).forEach((slot, i) => (slot.localized_name = t.outputs?.[i]?.name ?? slot.localized_name));
}

const EDIT_IMAGE = /^image(\d+)$/;
const EDIT_MAX_IMAGES = 10; // nodes/conditioning.py MAX_IMAGES, qwen_image_core/qwen21/layout.py MAX_REFERENCES
const EDIT_NODES = new Set(["QwenPixEditEncode", "QwenPix21Encode"]); // nodes with image1..image10 inputs

// Show image1, every connected imageN, and one free slot after the last connected one (up to image10).
function syncEditImages(node) {
  const slots = () => (node.inputs ?? []).map((inp, i) => ({ inp, i, n: Number(EDIT_IMAGE.exec(inp.name)?.[1]) }));
  const images = slots().filter((s) => s.n);
  const last = Math.max(1, ...images.filter((s) => s.inp.link != null).map((s) => s.n));
  const want = Math.min(EDIT_MAX_IMAGES, last + 1);
  for (const s of slots().reverse()) {
    if (s.n > want && s.inp.link == null) node.removeInput(s.i);
  }
  const have = new Set(slots().filter((s) => s.n).map((s) => s.n));
  for (let n = 2; n <= want; n++) {
    if (!have.has(n)) {
      const name = `image${n}`;
      node.addInput(name, "IMAGE", { shape: window.LiteGraph?.SlotShape?.HollowCircle });
      const added = node.inputs[node.inputs.length - 1];
      const label = translations?.[node.comfyClass]?.inputs?.[name]?.name;
      if (label) added.localized_name = label;
    }
  }
  node.setSize?.([node.size[0], node.computeSize()[1]]);
  node.setDirtyCanvas?.(true, true);
}

function dynamicEditImages(node) {
  const onConnectionsChange = node.onConnectionsChange;
  node.onConnectionsChange = function (...args) {
    const r = onConnectionsChange?.apply(this, args);
    queueMicrotask(() => syncEditImages(node));
    return r;
  };
  const onConfigure = node.onConfigure;
  node.onConfigure = function (...args) {
    const r = onConfigure?.apply(this, args);
    queueMicrotask(() => syncEditImages(node));
    return r;
  };
  queueMicrotask(() => syncEditImages(node));
}

api.addEventListener(WARNING_EVENT, (event) => showWarning(event.detail));
api.addEventListener("execution_start", clearMarks);

app.registerExtension({
  name: "qwenpix.core",
  async init() {
    await loadTranslations();
  },
  beforeRegisterNodeDef(nodeType, nodeData) {
    translateDef(nodeData);
  },
  nodeCreated(node) {
    translateNode(node);
    if (EDIT_NODES.has(node.comfyClass)) dynamicEditImages(node);
    if (node.comfyClass === "QwenPixEmptyLatent") {
      const aspect = widget(node, "aspect");
      if (aspect) {
        const previous = aspect.callback;
        aspect.callback = function (...args) {
          const r = previous?.apply(this, args);
          syncAspect(node);
          return r;
        };
        queueMicrotask(() => syncAspect(node));
      }
    }
    if (String(node.comfyClass).startsWith("QwenPix") && String(node.comfyClass).endsWith("Loader")) {
      const onExecuted = node.onExecuted;
      node.onExecuted = function (output) {
        onExecuted?.apply(this, arguments);
        if (output?.qwenpix_plan) showPlan(node, output.qwenpix_plan.join(" "));
      };
    }
  },
});
