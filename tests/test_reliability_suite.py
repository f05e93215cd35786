"""bench/reliability/run.py, the suite users run against their server: its quick variant of
every section that kills nothing, against a real Serve app over real HTTP (test_server's), with
the figures it returns asserted; and its flags refused with a message naming the flag."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from .test_server import served, text_models  # noqa: F401  (the real Serve app, shared setup)

pytestmark = pytest.mark.timeout(240)
SUITE = Path(__file__).resolve().parents[1] / "bench" / "reliability"


def suite():
    sys.path.insert(0, str(SUITE))  # run.py imports its sibling modules by name
    spec = importlib.util.spec_from_file_location("reliability_run", SUITE / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv,says", [
    ([], "--url is required"),
    (["--url", "http://10.1.2.3:8000"], "--url 'http://10.1.2.3:8000'"),
    (["--url", "http://127.0.0.1:8000", "--only", "load,bogus"], "--only 'load,bogus'"),
    (["--url", "http://127.0.0.1:8000", "--only", "kills"], "--only kills needs --allow-kills"),
    (["--url", "http://127.0.0.1:8000", "--allow-kills"], "--allow-kills needs --serve"),
    (["--url", "http://127.0.0.1:8000", "--pids", "12,x"], "--pids '12,x'"),
    (["--url", "http://127.0.0.1:8000", "--streams", "0"], "--streams 0"),
])
def test_bad_flags_are_refused_naming_the_flag(argv, says, capsys):
    with pytest.raises(SystemExit) as exit_:
        suite().main(argv)
    assert exit_.value.code == 2 and says in capsys.readouterr().err


def test_quick_suite_against_a_real_serve_app(served, tmp_path):  # noqa: F811
    run = suite()
    pids = run.server_pids([os.getpid()])  # the test run's Ray cluster: the Serve replicas
    assert pids, "no Serve replica process found for the RSS trend"
    out = tmp_path / "reliability.json"
    result = run.main(["--url", served, "--quick", "--only", "load,storm,soak,hostile,fuzz",
                       "--out", str(out), "--pids", ",".join(map(str, pids))])
    s = result["sections"]
    assert set(s) == {"load", "storm", "soak", "hostile", "fuzz"}
    load = s["load"]  # every stream complete, with the lone request's greedy text
    assert load["streams"] == load["completed"] == load["correct_text"] == 16
    assert load["errors"] == load["http_5xx"] == 0
    storm = s["storm"]  # every abandoned stream's KV blocks came back
    assert storm["abandoned"] == 16 and storm["http_5xx"] == 0
    assert storm["kv_blocks_used_after"] == 0 and storm["running_after"] == 0
    soak = s["soak"]
    assert soak["requests"] > 0 and soak["errors"] == soak["http_5xx"] == 0, soak
    assert soak["rss_mib"]["pids"] == pids and soak["rss_mib"]["last"] > 0
    hostile = s["hostile"]
    statuses = {name: c["statuses"] for name, c in hostile["cases"].items()}
    assert hostile["http_5xx"] == 0, statuses
    assert statuses["chunked_oversized_body"] == {"413": 1}  # the app's cap is 4 KiB
    assert statuses["slow_incomplete_body"] == {"408": 1}  # body_timeout_s 2
    for name in ("stop_strings_80k", "deep_json"):  # past the 4 KiB cap here: 413
        assert set(statuses[name]) <= {"400", "413"}, (name, statuses[name])
    for name in ("lone_surrogate", "lone_surrogate_chat", "bad_utf8", "boolean_token_ids"):
        assert set(statuses[name]) == {"400"}, (name, statuses[name])
    assert statuses["unknown_path"] == {"404": 1}
    assert all(c["victim_requests"] >= 1 and c["victim_worst_s"] < float("inf")
               for c in hostile["cases"].values())  # every victim request answered 200
    fuzz = s["fuzz"]
    assert fuzz["cases"] >= 50 and fuzz["http_5xx"] == 0 and fuzz["no_answer"] == 0, fuzz
    assert out.exists()
