import os

import pytest
import torch

# one thread per test process under pytest-xdist (-n 2 on 2 cores), else both cores
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _label_cache(tmp_path_factory, monkeypatch):
    # the label check's cache goes to a test folder, never the user's home
    monkeypatch.setenv("FCN_LIGHTNING_CACHE", str(tmp_path_factory.getbasetemp() / "label-cache"))
