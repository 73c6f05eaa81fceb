"""Start the campaign's `kdcache` processes in milliseconds: fork them from a server process that
has already imported kdcache and torch.

Each case kills a real, separate process (its own pid, signals, files, exit status); what it
skips is only the ~2 s of imports a fresh interpreter pays, which would be most of the suite's
time. The server imports and forks, nothing else: it starts no threads (no torch op, no fsspec
event loop), so the children are like freshly started ones. Its protocol is JSON lines on
stdin/stdout: {"spawn": {...}} -> {"pid"}, {"poll": pid} -> {"code": int | null}.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

from tests.conftest import REPO


def _child(req: dict) -> None:
    os.environ.clear()
    os.environ.update(req["env"])
    fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(fd, 0)
    for target, path in ((1, req["out"]), (2, req["err"])):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, target)
    if req.get("host"):
        import socket

        socket.gethostname = lambda: req["host"]
    from kdcache.pipeline.cli import main

    code = 1
    try:
        main(args=req["argv"], prog_name="kdcache")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported like an uncaught error of a real process
        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve() -> None:
    import torch._dynamo  # noqa: F401 - the optimizer's first step imports it

    import kdcache.pipeline.cli  # noqa: F401 - what every child needs, imported once
    import kdcache.pipeline.jobs  # noqa: F401

    done: dict[int, int] = {}
    for line in sys.stdin:
        req = json.loads(line)
        if "spawn" in req:
            pid = os.fork()
            if pid == 0:
                _child(req["spawn"])
            reply = {"pid": pid}
        else:
            pid = req["poll"]
            if pid not in done:
                got, status = os.waitpid(pid, os.WNOHANG)
                if got:
                    done[pid] = os.waitstatus_to_exitcode(status)
            reply = {"code": done.get(pid)}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


class Launcher:
    """The test side: one server per session; `spawn` returns a Popen-like handle."""

    def __init__(self, env: dict):
        self.server = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.launcher"],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.logs = tempfile.mkdtemp(prefix="kdcache-faults-")

    def ask(self, req: dict) -> dict:
        self.server.stdin.write(json.dumps(req) + "\n")
        self.server.stdin.flush()
        return json.loads(self.server.stdout.readline())

    def spawn(self, argv: list[str], env: dict, logs: str, host: str | None = None) -> Child:
        out, err = f"{logs}.out", f"{logs}.err"
        req = {"argv": argv, "env": env, "out": out, "err": err, "host": host}
        return Child(self, self.ask({"spawn": req})["pid"], out, err)

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=30)
        shutil.rmtree(self.logs, ignore_errors=True)


class Child:
    stderr = None  # (tests.conftest.wait_for reads it from a Popen)

    def __init__(self, launcher: Launcher, pid: int, out: str, err: str):
        self.launcher, self.pid, self.out, self.err = launcher, pid, out, err
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.launcher.ask({"poll": self.pid})["code"]
        return self.returncode

    def communicate(self, timeout: float = 120) -> tuple[str, str]:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            time.sleep(0.01)
        with open(self.out) as o, open(self.err) as e:
            return o.read(), e.read()


if __name__ == "__main__":
    serve()
