"""Run a real, unmodified ComfyUI with this pack loaded, and talk to it over its HTTP/websocket API.

Used by the end-to-end tests and by the main job (tools/run_workflows.py). The server runs in an
isolated base directory (models, input, output, user, custom_nodes) so nothing touches the ComfyUI tree,
in its own process group, and dies with the process that started it. It is also recorded (server and owner
PIDs) in .comfyui/servers/, so the next start stops any server whose owner was killed, and only those.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tools.comfy_paths import ROOT, comfyui_dir

PACK_NAME = "qwenpix"  # folder name under custom_nodes: also the /extensions/<name>/ URL segment
RUN_DIR = ROOT / ".comfyui" / "servers"  # one record per running server: {"server": pid, "owner": pid}
MODEL_FOLDERS = ("diffusion_models", "text_encoders", "vae", "loras")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child before exec: SIGKILL it when the parent dies
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _is_our_server(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(c.endswith(b"main.py") for c in cmd) and b"--base-directory" in cmd


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has finished
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_stale_servers(run_dir: Path = RUN_DIR) -> None:
    """Stop servers whose starting process is gone (a killed test run), leaving other live runs' servers alone."""
    for record in sorted(run_dir.glob("*.json")) if run_dir.is_dir() else []:
        try:
            info = json.loads(record.read_text())
            server, owner = int(info["server"]), int(info["owner"])
        except (OSError, ValueError, KeyError, TypeError):
            record.unlink(missing_ok=True)
            continue
        if _alive(owner):
            continue
        if _is_our_server(server):
            try:
                os.killpg(server, signal.SIGKILL)
            except ProcessLookupError:
                pass
        record.unlink(missing_ok=True)


class ComfyServer:
    """A ComfyUI process on 127.0.0.1 with this pack symlinked into an isolated base directory."""

    def __init__(
        self,
        base_dir: Path,
        python: str | None = None,
        comfy_dir: Path | None = None,
        port: int | None = None,
        run_dir: Path = RUN_DIR,
        extra_packs: tuple[Path, ...] = (),
    ):
        self.base_dir = Path(base_dir)
        self.python = python or os.environ.get("QWENPIX_PYTHON") or sys.executable
        self.comfy_dir = comfy_dir or comfyui_dir()
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = self.base_dir / "server.log"
        self.run_dir = Path(run_dir)
        self.extra_packs = tuple(Path(p) for p in extra_packs)  # more custom node folders (tests' helper nodes)

    @property
    def models_dir(self) -> Path:
        return self.base_dir / "models"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"

    def prepare(self) -> None:
        for sub in ("custom_nodes", "input", "output", "temp", "user/default", *(f"models/{m}" for m in MODEL_FOLDERS)):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        for name, target in ((PACK_NAME, ROOT), *((p.name, p) for p in self.extra_packs)):
            link = self.base_dir / "custom_nodes" / name
            if not link.exists():
                link.symlink_to(target.resolve(), target_is_directory=True)
        settings = self.base_dir / "user" / "default" / "comfy.settings.json"
        if not settings.exists():  # skip the first-run templates dialog in the frontend
            settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))

    def start(self, timeout: float = 180.0, extra_args: tuple[str, ...] = ()) -> ComfyServer:
        kill_stale_servers(self.run_dir)
        self.prepare()
        cmd = [
            self.python,
            "main.py",
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-auto-launch",
            "--base-directory",
            str(self.base_dir),
            *extra_args,
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            cmd,
            cwd=self.comfy_dir,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._record = self.run_dir / f"{self.proc.pid}.json"
        self._record.write_text(json.dumps({"server": self.proc.pid, "owner": os.getpid()}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.proc.returncode} during boot:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        self.proc = None
        if getattr(self, "_record", None):
            self._record.unlink(missing_ok=True)
        if getattr(self, "_log", None):
            self._log.close()

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class PromptRejected(RuntimeError):
    """HTTP 400 from /prompt: the graph failed validation. `.body` holds ComfyUI's JSON (node_errors)."""

    def __init__(self, body: dict):
        super().__init__(json.dumps(body)[:2000])
        self.body = body


@dataclass
class Result:
    """What became of one queued prompt."""

    prompt_id: str
    status: str  # "success", "error" or "interrupted"
    outputs: dict
    messages: list
    events: list = field(default_factory=list)  # websocket messages for this prompt, in order

    def error(self) -> dict | None:
        """The execution_error payload (node_id, node_type, exception_message, traceback...), if any."""
        for kind, data in self.messages:
            if kind == "execution_error":
                return data
        return None

    def images(self) -> list[dict]:
        return [img for out in self.outputs.values() for img in out.get("images", [])]


class ComfyClient:
    """A small synchronous client: queue, wait (with the websocket events of the prompt), interrupt."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.client_id = uuid.uuid4().hex
        self._events: list[dict] = []
        self.binary_frames: list[bytes] = []
        self._lock = threading.Lock()
        self._ws = None
        self._thread: threading.Thread | None = None

    # -- plain HTTP
    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            body = r.read()
            return json.loads(body) if r.headers.get_content_type() == "application/json" else body

    def post(self, path: str, payload: dict | None = None):
        data = json.dumps(payload or {}).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            body = r.read()
        return json.loads(body) if body else None

    def object_info(self) -> dict:
        return self.get("/object_info")

    def interrupt(self) -> None:
        self.post("/interrupt")

    # -- websocket
    def connect(self) -> ComfyClient:
        import websocket  # websocket-client; test-only dependency

        ws_url = self.url.replace("http", "ws", 1) + f"/ws?clientId={self.client_id}"
        self._ws = websocket.create_connection(ws_url, timeout=30)
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()
        return self

    def _listen(self) -> None:
        import websocket  # noqa: PLC0415

        while self._ws is not None:
            try:
                msg = self._ws.recv()
            except websocket.WebSocketTimeoutException:  # a quiet server (a long load or step): keep listening
                continue
            except Exception:  # closed
                return
            if not msg:  # connection closed
                return
            with self._lock:
                if isinstance(msg, bytes):  # binary frames carry live previews
                    self.binary_frames.append(msg)
                else:
                    self._events.append(json.loads(msg))

    def close(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            ws.close()

    def events_for(self, prompt_id: str) -> list[dict]:
        with self._lock:
            return [e for e in self._events if (e.get("data") or {}).get("prompt_id") == prompt_id]

    # -- prompts
    def queue(self, prompt: dict) -> str:
        return self.queue_checked(prompt)[0]

    def queue_checked(self, prompt: dict) -> tuple[str, dict]:
        """(prompt id, node_errors): ComfyUI queues a prompt whose other outputs are valid and reports (then
        skips) the outputs it refused in node_errors."""
        try:
            answer = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})
        except urllib.error.HTTPError as e:
            if e.code == 400:
                raise PromptRejected(json.loads(e.read() or b"{}")) from None
            raise
        return answer["prompt_id"], answer.get("node_errors") or {}

    def wait(self, prompt_id: str, timeout: float = 300.0) -> Result:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hist = self.get(f"/history/{urllib.parse.quote(prompt_id)}")
            if prompt_id in hist:
                entry = hist[prompt_id]
                st = entry.get("status", {})
                messages = [tuple(m) for m in st.get("messages", [])]
                status = st.get("status_str", "unknown")
                if any(kind == "execution_interrupted" for kind, _ in messages):
                    status = "interrupted"
                self._await_closing_event(prompt_id)
                return Result(prompt_id, status, entry.get("outputs", {}), messages, self.events_for(prompt_id))
            time.sleep(0.1)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")

    def _await_closing_event(self, prompt_id: str, timeout: float = 60.0) -> None:
        """/history shows a prompt done before the server's event loop has sent its last websocket messages (on a
        busy machine, seconds later): wait for the closing `executing` (node None) that ComfyUI sends after every
        prompt, success, error or interrupt, so the events of the prompt are all in."""
        deadline = time.monotonic() + timeout
        while self._ws is not None and time.monotonic() < deadline:
            if any(e["type"] == "executing" and e["data"].get("node") is None for e in self.events_for(prompt_id)):
                return
            time.sleep(0.02)

    def run(self, prompt: dict, timeout: float = 300.0) -> Result:
        return self.wait(self.queue(prompt), timeout)
