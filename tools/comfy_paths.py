"""Where the ComfyUI used by tests and the main job lives, and how to import its code as an oracle."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def comfyui_dir() -> Path:
    """COMFYUI_DIR if set, else the pinned ComfyUI 0.3.75 that tools/setup.sh unpacks into .comfyui/."""
    d = Path(os.environ.get("COMFYUI_DIR") or ROOT / ".comfyui" / "ComfyUI")
    if not (d / "main.py").is_file():
        raise FileNotFoundError(f"no ComfyUI at {d}: run tools/setup.sh or set COMFYUI_DIR")
    return d


def import_comfy_for_oracle() -> Path:
    """Make ComfyUI's `comfy` package importable in this process, on the CPU, and return its folder.

    For tests that use ComfyUI's own model code as a reference. ComfyUI reads its CLI flags at import of
    comfy.model_management; forcing cpu first keeps it from probing CUDA.
    """
    d = comfyui_dir()
    if str(d) not in sys.path:
        sys.path.insert(0, str(d))
    import comfy.cli_args  # noqa: PLC0415

    comfy.cli_args.args.cpu = True
    return d


def import_pack(register_nodes: bool = False):
    """Make this pack importable in-process as ComfyUI loads it: the package `qwenpix` (its __init__ run) with
    `qwenpix.nodes` registered as a package, so `importlib.import_module("qwenpix.nodes.<module>")` works in
    tests that call node code without a server; `register_nodes`: also run `qwenpix.nodes` (its
    NODE_CLASS_MAPPINGS), as ComfyUI does when it asks for them. Call after `import_comfy_for_oracle()`.
    Returns the `qwenpix.nodes` package."""
    import importlib.util  # noqa: PLC0415

    for name, folder in (("qwenpix", ROOT), ("qwenpix.nodes", ROOT / "nodes")):
        if name not in sys.modules:
            init = folder / "__init__.py"
            spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(folder)])
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            if name == "qwenpix":
                spec.loader.exec_module(module)
    nodes = sys.modules["qwenpix.nodes"]
    if register_nodes and not hasattr(nodes, "NODE_CLASS_MAPPINGS"):
        # ComfyUI's own top-level `nodes` module first (comfy_extras import it by that name; with this checkout
        # on sys.path, the pack's nodes/ folder could otherwise be found under that name)
        top = sys.modules.get("nodes")
        if top is None or Path(getattr(top, "__file__", "") or "").parent != comfyui_dir():
            spec = importlib.util.spec_from_file_location("nodes", comfyui_dir() / "nodes.py")
            sys.modules["nodes"] = module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        nodes.__spec__.loader.exec_module(nodes)
    return nodes
