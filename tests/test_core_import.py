"""qwen_image_core is usable without ComfyUI: importing every module never touches a ComfyUI package."""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_core_imports_without_comfyui(tmp_path):
    script = textwrap.dedent(
        """
        import importlib, pkgutil, sys
        BLOCKED = ("comfy", "comfy_extras", "comfy_api", "folder_paths", "nodes", "server", "execution")

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"qwen_image_core imported ComfyUI module {name}")

        sys.meta_path.insert(0, Block())
        import qwen_image_core
        names = [m.name for m in pkgutil.walk_packages(qwen_image_core.__path__, "qwen_image_core.")
                 if not m.name.endswith("__main__")]
        for name in names:
            importlib.import_module(name)
        for name in qwen_image_core.__all__:  # the public API resolves
            assert callable(getattr(qwen_image_core, name)), name
        print(len(names))
        """
    )
    # run from an unrelated folder with only the repo root on the path: no ComfyUI is importable there
    r = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.strip()) >= 1
