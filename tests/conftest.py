import os

import pytest
import torch
from helpers import FIGURES, TINY, cfg_of

from fcn_lightning.app.train import train

# one thread per test process under pytest-xdist (-n 2 on 2 cores), else both cores; the same
# for the commands the tests start (train.py, the sweeps' jobs): more threads than cores, each
# waiting on the others, cost several times the CPU
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _label_cache(tmp_path_factory):
    # the label check's cache goes to a test folder, never the user's home (also for the runs
    # that module- and session-scoped fixtures train, set up before any test's own fixtures)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FCN_LIGHTNING_CACHE", str(tmp_path_factory.getbasetemp() / "label-cache"))
        yield


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One tiny staged run (FCN-32s -> FCN-16s), with its figures, trained once per test process
    and shared by the test files: (run folder, the score train returned). Read it; copy it to
    change it."""
    out = tmp_path_factory.mktemp("tiny_run")
    return out, train(cfg_of("config", ["arch=fcn16s", *TINY, FIGURES], out))


@pytest.fixture(scope="session")
def tiny_run32(tmp_path_factory):
    """One tiny finished FCN-32s run (no stages), trained once per test process: its run folder.
    Read it; copy it to change it."""
    out = tmp_path_factory.mktemp("tiny_run32")
    train(cfg_of("config", [*TINY, "arch=fcn32s", FIGURES], out))  # as tiny_run, one stage
    return out
