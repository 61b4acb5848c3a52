"""A real ``tensorboard`` server on a log folder, read through the HTTP calls its web page makes
(tests/test_tensorboard_server.py, tests/test_experiments.py)."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

START_TIMEOUT = 90.0
ALL_STATUSES = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Board:
    """A running ``tensorboard`` and the calls its web page makes."""

    def __init__(self, url: str) -> None:
        self.url = url

    def raw(self, path: str, params: dict | None = None, body: dict | None = None) -> bytes:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if body is not None else {}
        request = urllib.request.Request(self.url + path + query, data=data, headers=headers)
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read()

    def get(self, path: str, params: dict | None = None, body: dict | None = None):
        return json.loads(self.raw(path, params, body))

    def scalars(self, run: str, name: str) -> list[tuple[int, float]]:
        points = self.get("/data/plugin/scalars/scalars", {"run": run, "tag": name})
        return [(step, value) for _, step, value in points]

    def last_image(self, run: str, name: str) -> Image.Image:
        entries = self.get("/data/plugin/images/images", {"run": run, "tag": name, "sample": 0})
        assert entries, (run, name)
        png = self.raw(f"/data/plugin/images/individualImage?{entries[-1]['query']}")
        image = Image.open(io.BytesIO(png))
        image.load()  # decodes the whole image: a truncated one fails here
        return image.convert("RGB")

    def experiment(self) -> dict:
        body = {"experimentName": "", "includeMetrics": True}
        return self.get("/data/plugin/hparams/experiment", body=body)

    def session_groups(self) -> list[dict]:
        body = {
            "experimentName": "",
            "allowedStatuses": ALL_STATUSES,
            "colParams": [],
            "startIndex": 0,
            "sliceSize": 100,
        }
        return self.get("/data/plugin/hparams/session_groups", body=body)["sessionGroups"]


@contextlib.contextmanager
def serve(logdir: Path, log: Path):
    """Start ``tensorboard`` on ``logdir`` (yield a :class:`Board` once it answers with every
    event file loaded) and stop it whatever happens."""
    port = free_port()
    command = [
        sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir),
        "--host", "127.0.0.1", "--port", str(port), "--load_fast=false",
        # load everything once, before serving: what it answers is the runs' whole content
        "--reload_interval", "0", "--reload_task", "blocking",
    ]  # fmt: skip
    with log.open("wb") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        board = Board(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if server.poll() is not None:
                pytest.fail(f"tensorboard exited ({server.returncode}):\n{log.read_text()}")
            try:
                board.get("/data/runs")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"tensorboard did not answer in {START_TIMEOUT:.0f} s:\n"
                                f"{log.read_text()}")  # fmt: skip
                time.sleep(0.25)
        yield board
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
