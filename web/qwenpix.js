// QwenPix frontend extension.
// - Empty Latent (Qwen-Image): picking an aspect preset shows its size in the width/height widgets, which are
//   only used for "custom", and greys them out otherwise.
// - Loaders: the one-line placement/offload plan the backend reports (`ui.qwenpix_plan`) is shown on the node.
// User-provided or backend text is only ever set through textContent / widget values, never as HTML.
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

app.registerExtension({
  name: "qwenpix.core",
  nodeCreated(node) {
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
