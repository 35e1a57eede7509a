"""Run the real `minigpt` CLI in child processes without paying torch's import for each one.

Importing torch costs seconds per process on a small shared machine, and the error matrix and the
kill tests launch dozens of CLI processes. So one helper process (a "fork server") imports torch and
minigpt once, and forks a fresh child per command. Each child is a real, separate process running
`python -m minigpt ARGV...` exactly as the interpreter would: `minigpt/__main__.py` runs as
`__main__`, an uncaught exception prints a traceback and exits 1, stdout/stderr go to files, and the
child can be killed with SIGKILL like any process. The fork server itself never runs a torch op, so
no thread pool exists yet when it forks (libgomp thread pools do not survive fork).

`test_errors.py::test_fork_server_matches_a_plain_subprocess` checks that a child gives the same
output and exit code as `python -m minigpt` launched the ordinary way.

Use: `result = run(["sample", run_dir, "--prompt", "x"], cwd=tmp_path)`, or `spawn` + `os.kill` +
`wait` to kill a command part-way.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


@dataclass
class Result:
    argv: list[str]
    rc: int  # negative: killed by that signal
    stdout: str
    stderr: str


class ForkServer:
    def __init__(self) -> None:
        # One OpenMP thread per child: with several torch processes on a loaded 2-core machine,
        # spinning OpenMP workers make tiny runs 10-50x slower. Results do not depend on it.
        env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env=env, text=True, bufsize=1,
        )
        self.lock = threading.Lock()
        self.live: dict[int, tuple[list[str], Path, Path]] = {}  # pid -> (argv, stdout, stderr)
        self.count = 0
        self.outdir = Path(tempfile.mkdtemp(prefix="minigpt-cli-"))

    def _ask(self, request: dict) -> dict:
        with self.lock:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the CLI fork server died")
        return json.loads(line)

    def spawn(self, argv: list[str], cwd: str | Path, pause: dict | None = None) -> int:
        argv = [str(a) for a in argv]
        self.count += 1
        out, err = self.outdir / f"{self.count}.out", self.outdir / f"{self.count}.err"
        pid = self._ask({"op": "spawn", "argv": argv, "cwd": str(cwd), "stdout": str(out),
                         "stderr": str(err), "pause": pause})["pid"]
        self.live[pid] = (argv, out, err)
        return pid

    def wait(self, pid: int) -> Result:
        rc = self._ask({"op": "wait", "pid": pid})["rc"]
        argv, out, err = self.live.pop(pid)
        return Result(argv, rc, out.read_text(errors="replace"), err.read_text(errors="replace"))

    def close(self) -> None:
        for pid in list(self.live):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)


_server: ForkServer | None = None


def server() -> ForkServer:
    global _server
    if _server is None or _server.proc.poll() is not None:
        _server = ForkServer()
        atexit.register(_server.close)
    return _server


def spawn(argv: list[str], cwd: str | Path, pause: dict | None = None) -> int:
    """Start `minigpt ARGV...` in `cwd`; returns its pid (kill it with os.kill, then `wait`).

    `pause={"where": "step"|"save", "at": k, "marker": PATH}` makes the child stop for good at a
    chosen point — before its k-th training step, or inside its k-th checkpoint save (the weights
    written into the temp directory, the trainer state not yet) — after creating PATH. A test that
    waits for PATH and then kills the child has killed it exactly there, however fast the machine.
    """
    return server().spawn(argv, cwd, pause)


def wait(pid: int) -> Result:
    return server().wait(pid)


def run(argv: list[str], cwd: str | Path) -> Result:
    """Run `minigpt ARGV...` in `cwd` to completion."""
    return wait(spawn(argv, cwd))


# --- the fork server process -----------------------------------------------------------------------


def _child(request: dict) -> None:
    """In the forked child: become `python -m minigpt ARGV...`; never returns."""
    import runpy
    import traceback

    code = 1
    try:
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        os.chdir(request["cwd"])
        if request.get("pause"):
            _install_pause(**request["pause"])
        sys.argv = ["minigpt", *request["argv"]]
        try:
            runpy.run_module("minigpt", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:  # what the interpreter does with sys.exit(x)
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _install_pause(where: str, at: int, marker: str) -> None:
    """Stop this child for good at the k-th training step or checkpoint save (see `spawn`)."""
    from minigpt import checkpoint
    from minigpt.training.trainer import Trainer

    calls = 0

    def stop_here() -> None:
        Path(marker).write_text(str(os.getpid()))
        while True:
            signal.pause()  # until the test's SIGKILL

    if where == "step":
        real_step = Trainer.train_step

        def train_step(self):
            nonlocal calls
            calls += 1
            if calls == at:
                stop_here()
            return real_step(self)

        Trainer.train_step = train_step
    elif where == "save":
        real_save = checkpoint.save_file

        def save_file(tensors, path, *args, **kwargs):
            nonlocal calls
            real_save(tensors, path, *args, **kwargs)
            calls += 1
            if calls == at:
                stop_here()

        checkpoint.save_file = save_file
    else:
        raise ValueError(f"unknown pause point {where!r}")


def _serve() -> None:
    import torch._dynamo  # noqa: F401  (torch.optim imports it lazily: seconds per process)

    # torch, numpy, safetensors and the minigpt modules the commands use (the package is lazy)
    import minigpt.cli  # noqa: F401
    import minigpt.engine  # noqa: F401
    import minigpt.tools.info  # noqa: F401
    import minigpt.training.run  # noqa: F401

    replies = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "spawn":
            replies.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(request)
            reply = {"pid": pid}
        else:
            _, status = os.waitpid(request["pid"], 0)
            reply = {"rc": os.waitstatus_to_exitcode(status)}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()
