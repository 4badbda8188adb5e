"""The main job: run the example workflows headless through a real ComfyUI and write the images.

    python -m tools.run_workflows [--models DIR] [--out DIR] [WORKFLOW.json ...]

Starts the pinned ComfyUI (or COMFYUI_DIR) with this pack, queues each API-format workflow over
`POST /prompt`, waits for it, and copies the images it saved into --out. Model files are looked up in
--models (ComfyUI's layout: diffusion_models/, text_encoders/, vae/, loras/, controlnet/). A file a workflow needs
that is not there is replaced by a tiny random smoke-test file in the same format under the same name,
and the job says so: the pipeline runs end to end, but those images are noise.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tools.comfy_harness import ComfyClient, ComfyServer
from tools.comfy_paths import ROOT

# loader class -> (input naming the file, models sub-folder)
LOADER_INPUTS: dict[str, tuple[str, str]] = {
    "VAELoader": ("vae_name", "vae"),
    "UNETLoader": ("unet_name", "diffusion_models"),
    "CLIPLoader": ("clip_name", "text_encoders"),
    "LoraLoaderModelOnly": ("lora_name", "loras"),
    "ControlNetLoader": ("control_net_name", "controlnet"),
    "QwenPixDiTLoader": ("dit_name", "diffusion_models"),
    "QwenPixTextEncoderLoader": ("text_encoder_name", "text_encoders"),
    "QwenPixVAELoader": ("vae_name", "vae"),
    "QwenPixLoraLoader": ("lora_name", "loras"),
    "QwenPixControlNetLoader": ("control_net_name", "controlnet"),
    "QwenPix21DiTLoader": ("dit_name", "diffusion_models"),
    "QwenPix21TextEncoderLoader": ("text_encoder_name", "text_encoders"),
    "QwenPix21VAELoader": ("vae_name", "vae"),
}

# sampler nodes whose `steps` the job lowers on smoke-test weights
SAMPLERS = ("QwenPixSampler", "KSampler", "QwenPixLayeredSampler", "QwenPix21Sampler")
# (sampler, schedule) whose step count is fixed: the 2.1 Turbo schedule is its 8 published sigmas
FIXED_STEPS = {("QwenPix21Sampler", "turbo")}


def lower_steps(node: dict, steps: int) -> None:
    """Set a sampler node's `steps` to at most `steps`, unless its schedule fixes the count."""
    if node["class_type"] in SAMPLERS and (node["class_type"], node["inputs"].get("schedule")) not in FIXED_STEPS:
        node["inputs"]["steps"] = min(node["inputs"]["steps"], steps)


# what the job runs while the pack has no example workflows yet: an empty latent decoded to a PNG
BUILTIN_SMOKE = {
    "1": {
        "class_type": "QwenPixEmptyLatent",
        "inputs": {"aspect": "custom", "width": 256, "height": 192, "batch_size": 1},
    },
    "2": {"class_type": "VAELoader", "inputs": {"vae_name": "qwen_image_vae.safetensors"}},
    "3": {"class_type": "VAEDecode", "inputs": {"samples": ["1", 0], "vae": ["2", 0]}},
    "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "qwenpix/smoke"}},
}


def needed_models(prompt: dict) -> list[tuple[str, str]]:
    """(sub-folder, file name) of every model file the API prompt's loader nodes name."""
    out = []
    for node in prompt.values():
        spec = LOADER_INPUTS.get(node.get("class_type"))
        if spec and isinstance(node["inputs"].get(spec[0]), str):
            out.append((spec[1], node["inputs"][spec[0]]))
    return out


def stage_models(prompts: list[dict], models: Path, server_models: Path) -> list[str]:
    """Link the real files into the server's models folder, or write smoke files; return the smoke ones."""
    from tools.checkpoints.smoke import WRITERS, write_smoke

    smoke = []
    for folder, name in sorted({m for p in prompts for m in needed_models(p)}):
        dest = server_models / folder / name
        if dest.exists():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        real = models / folder / name
        if real.exists():
            dest.symlink_to(real.resolve())
            continue
        if folder not in WRITERS:
            raise SystemExit(f"{real} is missing and no smoke-test writer exists for '{folder}'")
        write_smoke(folder, dest)
        smoke.append(f"{folder}/{name}")
    return smoke


def load_prompts(paths: list[Path]) -> list[tuple[str, dict]]:
    if not paths:
        paths = sorted((ROOT / "workflows" / "api").glob("*.json"))
    if not paths:
        return [("builtin_smoke", BUILTIN_SMOKE)]
    return [(p.stem, json.loads(p.read_text())) for p in paths]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workflows", nargs="*", type=Path, help="API-format workflow files (default: workflows/api/*.json)")
    ap.add_argument(
        "--models", type=Path, default=ROOT / "models", help="ComfyUI-style models folder with real weights"
    )
    ap.add_argument("--out", type=Path, default=ROOT / "out", help="where the images are written")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds allowed per workflow")
    ap.add_argument("--smoke-steps", type=int, default=2, help="sampling steps when running on smoke-test weights")
    args = ap.parse_args(argv)

    jobs = load_prompts(args.workflows)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qwenpix-run-") as tmp:
        server = ComfyServer(Path(tmp))
        server.prepare()
        smoke = stage_models([p for _, p in jobs], args.models, server.models_dir)
        for image in (ROOT / "workflows" / "inputs").glob("*.png"):  # the example workflows' reference images
            shutil.copyfile(image, server.input_dir / image.name)
        if smoke:  # noise in, noise out: a couple of steps prove the graph as well as the shipped count
            for _, prompt in jobs:
                for node in prompt.values():
                    lower_steps(node, args.smoke_steps)
            print(
                f"NOTE: no real weights for {', '.join(smoke)} in {args.models}: generated tiny random smoke-test "
                f"weights in the real formats. The pipeline runs end to end ({args.smoke_steps} sampling steps; a "
                "fixed schedule such as the 2.1 Turbo's keeps its own), but "
                "those images are noise."
            )
        print(f"starting ComfyUI ({server.comfy_dir}) ...", flush=True)
        sys.stdout.reconfigure(line_buffering=True)
        failures = 0
        with server:
            client = ComfyClient(server.url).connect()
            for name, prompt in jobs:
                t0 = time.monotonic()
                res = client.run(prompt, timeout=args.timeout)
                if res.status != "success":
                    failures += 1
                    err = res.error() or {}
                    print(
                        f"FAILED {name}: {err.get('node_type')} #{err.get('node_id')}: {err.get('exception_message')}"
                    )
                    continue
                for img in res.images():
                    src = server.output_dir / img["subfolder"] / img["filename"]
                    dest = args.out / f"{name}_{img['filename']}"
                    shutil.copyfile(src, dest)
                    print(f"{name}: wrote {dest} ({time.monotonic() - t0:.1f} s)")
            client.close()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
