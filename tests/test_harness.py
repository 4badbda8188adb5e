"""The test harness never leaves a ComfyUI process behind, even when the run that started it is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tools.comfy_harness import kill_stale_server

ROOT = Path(__file__).resolve().parent.parent


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def _wait_dead(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.2)
    return False


def test_stale_pidfile_is_killed_on_next_start(tmp_path):
    # a process that looks like a server a killed run left behind (same command-line shape)
    fake = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", "main.py", "--base-directory", str(tmp_path)],
        start_new_session=True,
    )
    while b"main.py" not in Path(f"/proc/{fake.pid}/cmdline").read_bytes():  # until it has exec'd
        time.sleep(0.01)
    pidfile = tmp_path / "server.pid"
    pidfile.write_text(str(fake.pid))
    kill_stale_server(pidfile)
    fake.wait(timeout=10)
    assert not pidfile.exists()


def test_unrelated_pid_in_pidfile_is_left_alone(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        pidfile = tmp_path / "server.pid"
        pidfile.write_text(str(other.pid))
        kill_stale_server(pidfile)
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
        "s = ComfyServer(Path(sys.argv[1]), pidfile=Path(sys.argv[1]) / 'server.pid').start()\n"
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
