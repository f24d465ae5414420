"""Run untrusted Python (a local model's answer to a coding probe) in a bounded subprocess.

Used by the coding probes of ``tiergate profile`` (:mod:`router.probes`): the model's code and
the probe's unit tests run in a fresh interpreter (``python -I``) in an empty temporary
directory, with a minimal environment and these limits:

* wall-clock timeout, and ``RLIMIT_CPU`` as a backstop;
* ``RLIMIT_AS`` (address space) so a runaway allocation fails with ``MemoryError``;
* ``RLIMIT_FSIZE``, ``RLIMIT_NOFILE`` and ``RLIMIT_CORE`` 0;
* an audit hook, installed before the code runs and irremovable from Python, that refuses
  sockets, new processes, ``ctypes`` and writes outside the temporary directory.

This bounds the honest mistakes of a small model (an endless loop, a huge list, a stray
``requests.get``); it is not a security boundary against a hostile one. Run profiles only on
machines where a misbehaving Python process is an inconvenience, not a breach.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
from dataclasses import dataclass

# Runs first in the child (so no preexec_fn, which is unsafe beside threads): sets the limits,
# reads the nonce, installs the audit hook, runs code then tests, and prints the nonce only
# when both finished without raising (a stray exit() is not a pass).
_HARNESS = r"""
import os, resource, sys
cpu_s, memory = int(sys.argv[1]), int(sys.argv[2])
for kind, value in ((resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_AS, memory),
                    (resource.RLIMIT_FSIZE, 1 << 20), (resource.RLIMIT_NOFILE, 64),
                    (resource.RLIMIT_CORE, 0)):
    hard = resource.getrlimit(kind)[1]
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(kind, (value, value))
nonce = sys.stdin.readline().strip()
root = os.getcwd()
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def _refuse(event, args):
    if event.startswith(("socket.", "subprocess.", "os.exec", "os.posix_spawn", "os.spawn",
                         "os.fork", "os.system", "os.kill", "ctypes.", "pty.")):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "import" and args[0] in ("ctypes", "_ctypes", "socket", "_socket"):
        raise PermissionError(f"sandbox: import {args[0]} is not allowed")
    if event == "open":
        path, mode, flags = args
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & _WRITE
        )
        if writes and isinstance(path, (str, bytes)):
            full = os.path.realpath(os.fsdecode(path))
            if not full.startswith(root + os.sep):
                raise PermissionError("sandbox: writes outside the work directory")
    if event in ("os.remove", "os.rename", "os.rmdir", "shutil.rmtree", "os.chmod"):
        full = os.path.realpath(os.fsdecode(args[0]))
        if not full.startswith(root + os.sep):
            raise PermissionError(f"sandbox: {event} outside the work directory")

sys.addaudithook(_refuse)
namespace = {"__name__": "solution"}
try:
    with open("solution.py", encoding="utf-8") as fh:
        exec(compile(fh.read(), "solution.py", "exec"), namespace)
    with open("tests.py", encoding="utf-8") as fh:
        exec(compile(fh.read(), "tests.py", "exec"), namespace)
except SystemExit:
    print("sandbox: the code called exit()", file=sys.stderr)
    sys.exit(3)
sys.stdout.write("\n" + nonce + "\n")
"""


@dataclass(frozen=True, slots=True)
class SandboxResult:
    """How a sandboxed run ended.

    ``outcome``: passed, failed (an assertion or any exception), timeout, memory (the address-
    space limit was hit) or refused (the audit hook stopped a socket, process or write).
    """

    outcome: str
    detail: str = ""

    @property
    def passed(self) -> bool:
        """True only when the code and every test ran to the end."""
        return self.outcome == "passed"


def run_python(
    code: str, tests: str, *, timeout_s: float = 5.0, memory_mb: int = 256
) -> SandboxResult:
    """Run ``code`` then ``tests`` (plain ``assert`` statements) in a bounded subprocess."""
    nonce = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="tiergate-probe-") as tmp:
        for name, text in (("solution.py", code), ("tests.py", tests)):
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as fh:
                fh.write(text)
        cpu_s = max(1, int(timeout_s) + 1)
        try:
            done = subprocess.run(
                [sys.executable, "-I", "-S", "-c", _HARNESS, str(cpu_s), str(memory_mb << 20)],
                input=nonce + "\n",
                capture_output=True,
                text=True,
                cwd=tmp,
                env={"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1", "LC_ALL": "C.UTF-8"},
                timeout=timeout_s,
                start_new_session=True,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return SandboxResult("timeout", f"ran past {timeout_s:g}s")
    err = done.stderr[-2000:]
    if done.returncode == 0 and done.stdout.rstrip().endswith(nonce):
        return SandboxResult("passed")
    if "MemoryError" in err:
        return SandboxResult("memory", f"hit the {memory_mb} MiB limit")
    if "PermissionError: sandbox:" in err:
        return SandboxResult("refused", err.strip().splitlines()[-1])
    if done.returncode < 0:  # killed by a signal: SIGXCPU past the CPU limit, SIGKILL...
        return SandboxResult("timeout", f"killed by signal {-done.returncode}")
    last = err.strip().splitlines()[-1] if err.strip() else f"exit {done.returncode}"
    return SandboxResult("failed", last)
