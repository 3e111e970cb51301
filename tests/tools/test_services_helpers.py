"""The test helpers' servers (tests/services.py) do not outlive the test process that started them."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
from services import REPO

START_AND_WAIT = """
import sys, time
sys.path.insert(0, {tests!r})
from services import Service
service = Service([sys.executable, "-c", "import time; time.sleep(300)"], None, {log!r})
print(service.process.pid, flush=True)
time.sleep(300)
"""


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting to be reaped is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
def test_a_server_stops_when_the_test_process_that_started_it_is_killed(tmp_path):
    script = START_AND_WAIT.format(tests=str(REPO / "tests"), log=str(tmp_path / "service.log"))
    test_process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    server_pid = int(test_process.stdout.readline())
    assert running(server_pid)
    test_process.kill()  # as an interrupted pytest worker dies: no finally, no Service.stop()
    test_process.wait()
    deadline = time.time() + 15
    while running(server_pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not running(server_pid)
