"""The test harness never leaves a ComfyUI process behind, even when the run that started it is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tools.comfy_harness import _alive, kill_stale_servers

ROOT = Path(__file__).resolve().parent.parent


def _wait_dead(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.2)
    return False


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _fake_server(tmp_path) -> subprocess.Popen:
    """A process with a ComfyUI server's command-line shape, as a killed run would leave behind."""
    fake = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", "main.py", "--base-directory", str(tmp_path)],
        start_new_session=True,
    )
    while b"main.py" not in Path(f"/proc/{fake.pid}/cmdline").read_bytes():  # until it has exec'd
        time.sleep(0.01)
    return fake


def _record(run_dir: Path, server: int, owner: int) -> Path:
    run_dir.mkdir(exist_ok=True)
    path = run_dir / f"{server}.json"
    path.write_text(json.dumps({"server": server, "owner": owner}))
    return path


def test_server_of_a_killed_run_is_stopped_on_next_start(tmp_path):
    fake = _fake_server(tmp_path)
    record = _record(tmp_path / "servers", fake.pid, _dead_pid())
    kill_stale_servers(tmp_path / "servers")
    fake.wait(timeout=10)
    assert not record.exists()


def test_server_of_a_live_run_is_left_alone(tmp_path):
    fake = _fake_server(tmp_path)
    try:
        record = _record(tmp_path / "servers", fake.pid, os.getpid())  # its owner (us) is alive
        kill_stale_servers(tmp_path / "servers")
        assert fake.poll() is None and record.exists()
    finally:
        os.killpg(fake.pid, signal.SIGKILL)
        fake.wait()


def test_unrelated_process_with_a_reused_pid_is_left_alone(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        _record(tmp_path / "servers", other.pid, _dead_pid())
        kill_stale_servers(tmp_path / "servers")
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


@pytest.mark.e2e
def test_server_dies_with_killed_runner(tmp_path):
    """SIGKILL the process that started a server (as when a test run is killed): the server goes too."""
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from tools.comfy_harness import ComfyServer\n"
        "s = ComfyServer(Path(sys.argv[1]), run_dir=Path(sys.argv[1]) / 'servers').start()\n"
        "print(s.proc.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    runner = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    line = runner.stdout.readline()
    assert line.strip(), "runner did not start a server"
    server_pid = int(line)
    assert _alive(server_pid)
    runner.send_signal(signal.SIGKILL)
    runner.wait()
    assert _wait_dead(server_pid), "ComfyUI outlived the killed runner"
