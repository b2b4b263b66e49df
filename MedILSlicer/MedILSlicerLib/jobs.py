"""Run the MedIL backend in a separate process.

The child is ``PYTHON -m medil_backend reconstruct ... --progress json``: it prints one JSON
object a line (``{"progress": f, "message": m}``, then ``{"done": true, ...}``). A crash, a CUDA
error or running out of memory ends the child, never the caller. ``cancel()`` kills the whole
process tree (the child runs in its own process group / session).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence

from .tasks import catalog


def panel_fields() -> dict:
    """How the panel names the settings that a backend error points at (MedILError.options): every option of
    the backend's task specs that has a panel label, and the grid settings (from ``medil tasks --json``)."""
    return catalog().panel_fields


class BackendJob:
    def __init__(self, args: Sequence[str], python: str | None = None, env: dict | None = None) -> None:
        self.command = [python or sys.executable, "-m", "medil_backend", *map(str, args)]
        self.env = env
        self.process: subprocess.Popen | None = None
        self.events: queue.Queue = queue.Queue()
        self.stderr_lines: list[str] = []
        self.result: dict | None = None
        self.error: dict | None = None  # {"error": message, "options": [setting, ...]} from the backend
        self.cancelled = False
        self._threads: list[threading.Thread] = []

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> BackendJob:
        kwargs: dict = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            kwargs["start_new_session"] = True
        # UTF-8 both ways, whatever locale the host application (Qt, VTK) left behind
        from .deps import backend_env

        env = {**backend_env(self.env), "PYTHONIOENCODING": "utf-8"}
        # an interrupt while Popen runs would leave a child we hold no handle of: hold the termination
        # signals until self.process is set (the backend unblocks them for itself as it starts)
        held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP} if hasattr(signal, "pthread_sigmask") else set()
        if held and threading.current_thread() is threading.main_thread():
            signal.pthread_sigmask(signal.SIG_BLOCK, held)
        else:
            held = set()
        try:
            self.process = self._popen(env, kwargs)
        finally:
            if held:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, held)
        self._threads = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for t in self._threads:
            t.start()
        return self

    def _popen(self, env: dict, kwargs: dict) -> subprocess.Popen:
        return subprocess.Popen(
            self.command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            encoding="utf-8",
            errors="replace",
            env=env,
            **kwargs,
        )

    def _read_stdout(self) -> None:
        assert self.process and self.process.stdout
        for line in self.process.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                msg = json.loads(line)
            except ValueError:
                msg = {"log": line}
            if msg.get("done"):
                self.result = msg
            if "error" in msg:
                self.error = msg
            self.events.put(msg)

    def _read_stderr(self) -> None:
        assert self.process and self.process.stderr
        for line in self.process.stderr:
            line = line.rstrip()
            if line:
                self.stderr_lines.append(line)
                self.events.put({"log": line})

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def drain(self) -> list[dict]:
        """Events (progress, log lines, done) received since the last call."""
        out = []
        while True:
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                return out

    def wait(self, on_event: Callable[[dict], None] | None = None, poll_s: float = 0.1) -> int:
        """Block until the child ends, passing every event to ``on_event``; returns its exit status."""
        assert self.process is not None
        while True:
            try:
                rc = self.process.wait(timeout=poll_s)
            except subprocess.TimeoutExpired:
                rc = None
            for ev in self.drain():
                if on_event:
                    on_event(ev)
            if rc is not None:
                for t in self._threads:
                    t.join(timeout=5)
                for ev in self.drain():
                    if on_event:
                        on_event(ev)
                return rc

    def cancel(self, grace_s: float = 3.0) -> None:
        """Kill the child and everything it started."""
        if not self.running():
            return
        self.cancelled = True
        assert self.process is not None
        if os.name == "nt":
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.process.pid)], capture_output=True)
        else:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.process.wait()

    def error_message(self) -> str:
        """The backend's one-line error in the panel's words (its settings named as the panel shows them), or the last line it printed."""
        if self.error:
            names = panel_fields()
            fields = [names[o] for o in self.error.get("options", []) if o in names]
            return self.error["error"] + (f" (panel: {', '.join(fields)})" if fields else "")
        for line in reversed(self.stderr_lines):
            if line.startswith("medil: error:"):
                return line[len("medil: error:") :].strip()
        return self.stderr_lines[-1] if self.stderr_lines else "the MedIL backend stopped without a message"
