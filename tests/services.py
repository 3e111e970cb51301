"""Servers the integration tests start on loopback and always stop."""

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
_PR_SET_PDEATHSIG = 1  # prctl option: the signal a process gets when the thread that started it exits


def _terminated_with_parent() -> None:
    """Run in a server's process before it starts: SIGTERM it when the test process that started it dies. A
    pytest worker killed or interrupted mid-test runs no ``finally``, and its servers, in sessions of their own,
    would otherwise live on."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{process.args} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout}s")


class Service:
    """A server process in its own process group, stopped (the whole group) by ``stop``."""

    def __init__(self, args, env, log_path):
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(args, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True, cwd=REPO,
                                        preexec_fn=_terminated_with_parent if sys.platform == "linux" else None)

    def stop(self):
        if self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
        self.log.close()


def prefect_server(port: int, home: Path, log_path: Path) -> Service:
    """``prefect server start`` on 127.0.0.1:``port`` with its database under ``home``; wait for it to answer."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    server = Service([str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                     env, log_path)
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", server.process, timeout=180)
    except BaseException:
        server.stop()
        raise
    return server
