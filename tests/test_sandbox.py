"""The sandbox the coding grader runs answers in: it passes working code and stops what loops,
hoards memory, reaches the network, starts processes or writes outside its folder."""

from __future__ import annotations

import pytest

from router.sandbox import run_python


def test_sandbox_passes_working_code_and_fails_broken_code() -> None:
    assert run_python("def f():\n    return 1\n", "assert f() == 1\n").passed
    failed = run_python("def f():\n    return 2\n", "assert f() == 1\n")
    assert failed.outcome == "failed" and "AssertionError" in failed.detail


def test_sandbox_stops_code_that_loops_forever() -> None:
    result = run_python("while True:\n    pass\n", "", timeout_s=1.0)
    assert result.outcome == "timeout" and not result.passed


def test_sandbox_refuses_code_that_takes_too_much_memory() -> None:
    result = run_python("hoard = bytearray(1 << 30)\n", "", memory_mb=128)
    assert result.outcome == "memory" and not result.passed
    result = run_python("hoard = [0] * (1 << 28)\n", "", memory_mb=128)
    assert result.outcome == "memory"


@pytest.mark.parametrize(
    "code",
    [
        "import socket\nsocket.create_connection(('127.0.0.1', 9))\n",
        "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:9/')\n",
        "import subprocess\nsubprocess.run(['true'])\n",
        "import os\nos.system('true')\n",
        "open('/tmp/tiergate-sandbox-escape.txt', 'w').write('x')\n",
    ],
)
def test_sandbox_refuses_network_processes_and_outside_writes(code: str) -> None:
    result = run_python(code, "")
    assert result.outcome == "refused", result


def test_sandbox_does_not_count_an_early_exit_as_a_pass() -> None:
    assert not run_python("import sys\nsys.exit(0)\n", "assert False\n").passed
    assert not run_python("import os\nos._exit(0)\n", "assert False\n").passed
    # its own temporary directory is writable
    assert run_python(
        "open('scratch.txt', 'w').write('x')\n", "assert open('scratch.txt').read() == 'x'\n"
    ).passed
