"""train.py commands in real processes that skip the imports: each forked from one server process
that has imported what train.py imports (tests/test_sweeps.py, tests/test_run_folder.py)."""

from __future__ import annotations

import atexit
import functools
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from . import ROOT

TESTS = ROOT / "tests"

# runs train.py with optuna.create_study wrapped, and writes each trial's state at exit: the
# study's own view of its trials (its sqlite storage does not work with this SQLAlchemy)
OPTUNA_SPY = """
import atexit, json, runpy, sys
import optuna
studies, create = [], optuna.create_study
def spy(*args, **kwargs):
    studies.append(create(*args, **kwargs))
    return studies[-1]
optuna.create_study = spy
dump, sys.argv = sys.argv[1], sys.argv[2:]
atexit.register(lambda: open(dump, "w").write(json.dumps(
    [[t.state.name, t.value] for s in studies for t in s.trials])))
runpy.run_path(sys.argv[0], run_name="__main__")
"""

# The commands' processes are forked from this server once it has imported what train.py
# imports (torch, Lightning, Hydra: seconds that a command need not pay again). Each command is
# still a process of its own, as `python <script> <args>` would start it: its folder, its
# environment, its output, its signals, its exit status. A request: [cwd, env, folder for the
# output, [argv, ...]] (the argvs run at once); the answer: their exit statuses.
SERVER = """
import json, os, runpy, sys
sys.path[0] = os.path.dirname(sys.argv[1])  # the script's folder, as for `python <script>`
import train
for line in sys.stdin:
    cwd, env, logs, commands = json.loads(line)
    pids = []
    for i, argv in enumerate(commands):
        if (pid := os.fork()) == 0:
            os.chdir(cwd)
            os.environ.clear()
            os.environ.update(env)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            for fd in (1, 2):
                os.dup2(os.open(f"{logs}/{i}.{fd}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            sys.argv, sys.path[0] = argv, os.path.dirname(argv[0])
            runpy.run_path(argv[0], run_name="__main__")
            sys.exit()
        pids.append(pid)
    print(json.dumps([os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]), flush=True)
"""


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONWARNINGS="ignore", HYDRA_FULL_ERROR="0", PYTHONPATH=path)


@functools.cache
def _server() -> subprocess.Popen:
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(ROOT / "train.py")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env(),
        start_new_session=True,
    )  # fmt: skip
    atexit.register(server.communicate)  # the server ends with this process
    return server


def commands(*argvs: list, cwd: Path) -> list[subprocess.CompletedProcess]:
    """Run each ``[script, *args]`` in ``cwd``, all at once, each in a process of its own that
    can import tests/interrupts.py (and this module); what subprocess.run would return for each."""
    server, logs = _server(), tempfile.mkdtemp()
    try:
        request = [str(cwd), _env(), logs, [[str(a) for a in argv] for argv in argvs]]
        server.stdin.write(json.dumps(request) + "\n")
        server.stdin.flush()
        if not select.select([server.stdout], [], [], 600)[0]:
            os.killpg(server.pid, signal.SIGKILL)  # the server and its commands
            _server.cache_clear()
            raise subprocess.TimeoutExpired(argvs, 600)
        codes = json.loads(server.stdout.readline() or "null")  # null: the server died
        return [
            subprocess.CompletedProcess(
                argv, code, *(Path(logs, f"{i}.{fd}").read_text() for fd in (1, 2))
            )
            for i, (argv, code) in enumerate(zip(argvs, codes, strict=True))
        ]
    finally:
        shutil.rmtree(logs)


def cli(*args: str, cwd: Path, spy: Path | None = None) -> subprocess.CompletedProcess:
    """``python train.py <args>`` (with ``spy``: the Optuna spy writing the trials there)."""
    if spy is None:
        return commands([ROOT / "train.py", *args], cwd=cwd)[0]
    script = spy.with_suffix(".py")
    script.write_text(OPTUNA_SPY)
    return commands([script, spy, ROOT / "train.py", *args], cwd=cwd)[0]
