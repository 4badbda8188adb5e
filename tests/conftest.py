"""Shared fixtures. `comfy` is a real ComfyUI server with this pack loaded, started once per test session.

Disk: every module's scratch (its tmp_path_factory folders, its tmp_path folders, the model files it wrote into
the server's models folder) is removed when the module ends, and the server is asked to drop its cached models,
so the suite's disk use peaks at one module's files rather than the sum of all (23 GB before, which filled a CI
disk). Session fixtures register what must outlive a module with `_keep`. The peak is printed at the end and the
run fails past QWENPIX_TMP_BUDGET_MB.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from tools.comfy_harness import ComfyClient, ComfyServer
from tools.run_workflows import needed_models, stage_models

TEST_PACK = Path(__file__).resolve().parent / "comfy_test_pack"  # test-only helper nodes
BUDGET_MB = float(os.environ.get("QWENPIX_TMP_BUDGET_MB", "4000"))  # peak scratch a module may leave on disk


@dataclass
class _Scratch:
    """What the running module created, for removal when it ends; the largest footprint seen so far."""

    keep: set[Path] = field(default_factory=set)  # session-scoped folders and files
    server: ComfyServer | None = None
    module: str | None = None
    dirs_before: set[Path] = field(default_factory=set)
    models_before: set[Path] = field(default_factory=set)
    failed: bool = False
    peak_mb: float = 0.0
    peak_module: str = ""


_SCRATCH = pytest.StashKey[_Scratch]()


def _keep(config: pytest.Config, *paths: Path) -> None:
    config.stash[_SCRATCH].keep.update(Path(p) for p in paths)


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()} if root.is_dir() else set()


def _size_mb(root: Path) -> float:
    return sum(p.lstat().st_size for p in _files(root)) / 2**20


def pytest_configure(config):
    config.stash[_SCRATCH] = _Scratch()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    s = item.config.stash[_SCRATCH]
    if s.module != item.nodeid.split("::")[0]:
        s.module, s.failed = item.nodeid.split("::")[0], False
        s.dirs_before = set(item.config._tmp_path_factory.getbasetemp().iterdir())
        s.models_before = _files(s.server.models_dir) if s.server else set()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if outcome.get_result().failed:
        item.config.stash[_SCRATCH].failed = True


@pytest.hookimpl(hookwrapper=True, trylast=True)
def pytest_runtest_teardown(item, nextitem):
    yield  # the module's fixtures are finalised inside this call when `nextitem` is in another module
    s, base = item.config.stash[_SCRATCH], item.config._tmp_path_factory.getbasetemp()
    size = _size_mb(base)
    if size > s.peak_mb:
        s.peak_mb, s.peak_module = size, item.nodeid
    if nextitem is not None and nextitem.nodeid.split("::")[0] == item.nodeid.split("::")[0]:
        return
    if s.failed:  # keep the evidence of a failing module
        return
    for d in set(base.iterdir()) - s.dirs_before - s.keep:
        shutil.rmtree(d, ignore_errors=True)
    if s.server is not None and s.server.proc is not None:
        new = _files(s.server.models_dir) - s.models_before - s.keep
        for f in new:
            f.unlink(missing_ok=True)
        if new:  # the server's cache may hold the deleted files mapped; drop it so the disk is really freed
            ComfyClient(s.server.url).post("/free", {"unload_models": True, "free_memory": True})


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    s = config.stash[_SCRATCH]
    terminalreporter.write_line(
        f"scratch disk: peak {s.peak_mb:.0f} MB after {s.peak_module or '-'} (budget {BUDGET_MB:.0f} MB)"
    )


def pytest_sessionfinish(session, exitstatus):
    s = session.config.stash[_SCRATCH]
    if s.peak_mb > BUDGET_MB and session.exitstatus == 0:
        print(f"\nscratch disk {s.peak_mb:.0f} MB after {s.peak_module} exceeds {BUDGET_MB:.0f} MB")
        session.exitstatus = 1


@pytest.fixture(scope="session")
def comfy(tmp_path_factory, request):
    """A running ComfyUI (CPU) in an isolated base directory; tests put model files in `comfy.models_dir`."""
    server = ComfyServer(tmp_path_factory.mktemp("comfy"), extra_packs=(TEST_PACK,))
    _keep(request.config, server.base_dir)
    server.start()
    s = request.config.stash[_SCRATCH]
    s.server, s.models_before = server, _files(server.models_dir)
    yield server
    server.stop()
    s.server = None


@pytest.fixture
def client(comfy):
    """A client connected to the server's websocket, closed after the test."""
    c = ComfyClient(comfy.url).connect()
    yield c
    c.close()


@pytest.fixture(scope="session")
def tiny_comfy_vae(comfy, request):
    """A tiny Qwen-Image VAE (Wan naming, ComfyUI's layout) in the server's models/vae folder; returns its name."""
    from tools.checkpoints.vae import write_vae

    path = write_vae(comfy.models_dir / "vae", "comfy", base_dim=16)
    _keep(request.config, path)
    return path.name


@pytest.fixture(scope="session")
def example_models(comfy, request):
    """The example workflows' model files (tiny smoke weights under the real names) and reference images, staged
    once into the server's models and input folders; returns the server."""
    workflows = Path(__file__).resolve().parent.parent / "workflows"
    prompts = [json.loads(p.read_text()) for p in sorted((workflows / "api").glob("*.json"))]
    stage_models(prompts, comfy.base_dir / "no-real-models", comfy.models_dir)
    _keep(request.config, *(comfy.models_dir / folder / name for p in prompts for folder, name in needed_models(p)))
    for image in (workflows / "inputs").glob("*.png"):
        shutil.copyfile(image, comfy.input_dir / image.name)
    return comfy


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-model tests: on 2 cores the OpenMP hand-offs of small ops cost
    more than the second thread gains (5-10x slower when the other core is busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
