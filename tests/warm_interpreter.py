"""`python -m pipeline ARGS` without paying for the interpreter's start each time.

Importing torch, torchvision and timm takes 4-5 s of the 5-9 s a command needs on 2 cores, and the suite
runs the command line a few hundred times. This script, started once per test process, imports them as a
command does (`pipeline.runtime.imports.heavy_imports`) and then forks one child per command: the child
sets the command's working folder, environment, standard streams and arguments, and runs `pipeline` as
`python -m pipeline` would (as `__main__`, to the interpreter's own exit: tracebacks, exit codes, atexit
and signals as in a fresh process). Of the project, only that small module is imported ahead. A command
whose environment differs in what the interpreter or these libraries read at start-up (e.g. HF_HOME, read
by huggingface_hub on import) runs in a fresh interpreter instead (`WarmInterpreter.can_run`).

Protocol, one JSON line each way on the script's stdin and stdout: request {argv, env, cwd, stdout,
stderr, timeout} -> reply {returncode} ({"timeout": true} when the command was killed for taking longer).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

PRELOADED = ("numpy", "PIL.Image", "torch", "torchvision", "timm")

# What the interpreter or the preloaded libraries read once, at start-up or import.
STARTUP_VARIABLES = ("PYTHON", "OMP_", "MKL_", "OPENBLAS_", "KMP_", "CUDA_", "TORCH_", "PYTORCH_", "LD_", "HF_",
                     "XDG_")


def startup_settings(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(STARTUP_VARIABLES)}


class WarmInterpreter:
    """The test side: starts the script, sends it commands one at a time."""

    def __init__(self, env: dict[str, str], scratch: Path):
        self.env = dict(env)
        self.scratch = scratch
        self.lock = threading.Lock()
        self.commands = 0
        self.proc = subprocess.Popen([sys.executable, __file__], env=self.env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline() != "ready\n":
            raise RuntimeError("the warm interpreter did not start")

    def can_run(self, env: dict[str, str]) -> bool:
        return self.proc.poll() is None and startup_settings(env) == startup_settings(self.env)

    def run(self, argv: list[str], env: dict[str, str], cwd: Path | None,
            timeout: float) -> subprocess.CompletedProcess:
        with self.lock:
            out, err = self.scratch / "stdout", self.scratch / "stderr"
            request = {"argv": argv, "env": env, "cwd": str(cwd or os.getcwd()), "stdout": str(out),
                       "stderr": str(err), "timeout": timeout}
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            reply = json.loads(self.proc.stdout.readline())
            self.commands += 1
            stdout, stderr = out.read_text(), err.read_text()   # as subprocess's text mode decodes them
        command = [sys.executable, "-m", "pipeline", *argv]
        if reply.get("timeout"):
            raise subprocess.TimeoutExpired(command, timeout, stdout, stderr)
        return subprocess.CompletedProcess(command, reply["returncode"], stdout, stderr)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def wait(pid: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return {"returncode": os.waitstatus_to_exitcode(status)}
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return {"timeout": True}
        time.sleep(0.01)


def become(request: dict) -> None:
    """In the forked child: take on the command's folder, environment, streams and arguments."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        opened = os.open(path, flags, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    sys.argv = ["-m", *request["argv"]]
    sys.path[0] = os.getcwd()       # as `python -m` puts the working folder first


def serve() -> None:
    """Returns only in a forked child, which then runs the command."""
    import importlib

    from pipeline.runtime.imports import heavy_imports
    requests, replies = os.fdopen(os.dup(0), "r"), os.fdopen(os.dup(1), "w")
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    with heavy_imports():
        for name in PRELOADED:
            importlib.import_module(name)
    replies.write("ready\n")
    replies.flush()
    for line in requests:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            requests.close()
            replies.close()
            become(request)
            return
        replies.write(json.dumps(wait(pid, request["timeout"])) + "\n")
        replies.flush()
    sys.exit(0)


if __name__ == "__main__":
    serve()
    import runpy
    runpy.run_module("pipeline", run_name="__main__", alter_sys=True)
