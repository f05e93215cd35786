"""The main job as a user runs it: `serve run deployments/dflash.yaml`, then HTTP, then SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_serve_run_the_shipped_yaml(tmp_path):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1",
               RAY_ADDRESS="local",  # a cluster of its own, not the test session's
               RAY_DISABLE_FAILURE_SIGNAL_HANDLER="1",  # the quiet SIGTERM the README gives
               DFLASH_NODE_IP="127.0.0.1")  # the replicas' sockets for peers on loopback
    serve = Path(sys.executable).with_name("serve")
    cmd = [str(serve) if serve.exists() else "serve", "run", "deployments/dflash.yaml"]
    with open(tmp_path / "serve.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline, ready = time.time() + 180, False
        while time.time() < deadline and proc.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                ready = httpx.get("http://127.0.0.1:8000/health", timeout=2).status_code == 200
            if ready:
                break
            time.sleep(1)
        assert ready, (tmp_path / "serve.log").read_text()[-3000:]
        r = httpx.post("http://127.0.0.1:8000/v1/completions", timeout=120, json={
            "model": "dflash-demo", "prompt": "def add(a, b):", "max_tokens": 32,
            "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["completion_tokens"] > 0 and body["choices"][0]["text"]
        assert body["usage"]["acceptance_length"] > 1.0  # the trained drafter is accepted
    finally:
        proc.send_signal(signal.SIGTERM)
        hung = False
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            hung = True
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not hung, "serve run did not exit within 60 s of SIGTERM"
    log = (tmp_path / "serve.log").read_text()
    assert "SIGTERM received" not in log and "Traceback" not in log, log[-3000:]
