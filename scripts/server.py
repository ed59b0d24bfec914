"""Start and stop a local ComfyUI server (stdlib only): used by the headless CLI, the demo and the server tests."""
from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 10.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read().decode())


def reachable(url: str) -> bool:
    try:
        get_json(url.rstrip("/") + "/system_stats", timeout=3)
        return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


class LocalServer:
    """``python main.py --listen 127.0.0.1 --port N`` in a child process, with the pack's generated models added."""

    def __init__(self, comfyui_root: Path | None = None, python: str | None = None, output_dir: Path | None = None,
                 extra_args: list[str] | None = None, startup_timeout: float = 180.0,
                 frontend_path: str | os.PathLike | None = None):
        """``frontend_path`` (default: $PERSONALIZE_FRONTEND_PATH): a folder holding another
        ``comfyui_frontend_package`` (``pip install --target``), put first on the server's PYTHONPATH so that the
        pinned server serves that frontend (``make test-frontend-latest``)."""
        from . import host

        self.root = Path(comfyui_root) if comfyui_root else host.comfyui_root()
        self.python = python or sys.executable
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.work = Path(tempfile.mkdtemp(prefix="personalize-server-"))
        self.output_dir = Path(output_dir) if output_dir else self.work / "output"
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.work / "server.log"
        self.extra_args = list(extra_args or [])
        self.startup_timeout = startup_timeout
        fp = frontend_path if frontend_path is not None else os.environ.get("PERSONALIZE_FRONTEND_PATH") or None
        self.frontend_path = Path(fp).resolve() if fp else None
        if self.frontend_path and not (self.frontend_path / "comfyui_frontend_package").is_dir():
            raise RuntimeError(f"frontend path {self.frontend_path} holds no comfyui_frontend_package "
                               "(pip install --target DIR comfyui-frontend-package)")
        self.proc: subprocess.Popen | None = None
        self._yaml = host.extra_model_paths_yaml(self.work / "extra_model_paths.yaml")
        # a private input folder seeded with ComfyUI's own inputs (example.png) and the pack's example inputs
        self.input_dir = self.work / "input"
        self.input_dir.mkdir(parents=True, exist_ok=True)
        (self.work / "user").mkdir(parents=True, exist_ok=True)
        for src in (self.root / "input", REPO / "example_workflows" / "input"):
            if src.is_dir():
                for f in src.iterdir():
                    if f.is_file():
                        shutil.copy2(f, self.input_dir / f.name)

    def start(self) -> "LocalServer":
        import torch

        cmd = [self.python, "main.py", "--listen", "127.0.0.1", "--port", str(self.port), "--disable-auto-launch",
               "--output-directory", str(self.output_dir), "--input-directory", str(self.work / "input"),
               "--user-directory", str(self.work / "user"), "--temp-directory", str(self.work),
               "--extra-model-paths-config", str(self._yaml), "--dont-print-server"]
        if not torch.cuda.is_available():
            cmd.append("--cpu")
        cmd += self.extra_args
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.frontend_path:
            env["PYTHONPATH"] = os.pathsep.join([str(self.frontend_path)] + [
                p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        self._log = open(self.log_path, "w")
        atexit.register(self.stop)  # never leave a server behind, whatever happens to the caller
        self.proc = subprocess.Popen(cmd, cwd=self.root, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.time() + self.startup_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.proc.returncode} while starting; log: {self.log_path}\n"
                                   + self.log_tail())
            if reachable(self.url):
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {self.startup_timeout:.0f}s; log: {self.log_path}\n" + self.log_tail())

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
