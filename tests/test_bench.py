"""`dflash-ray bench` and `generate` from the command line on tiny models."""

from __future__ import annotations

import json

import pytest

from dflash_ray.cli import main


def test_bench_writes_json_fields_and_plots(tiny, tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", "--target", tiny["moe"], "--drafter", tiny["drafter"],
                 "--num-prompts", "4", "--concurrency", "1", "4", "--max-tokens", "16",
                 "--rounds", "2", "--out", str(out)])
    assert code == 0
    result = json.loads((out / "bench.json").read_text())
    assert [r["concurrency"] for r in result["rows"]] == [1, 4]
    for row in result["rows"]:
        assert row["outputs_identical"] is True
        # two rounds add up: tokens and the verify steps behind the tau histogram
        assert row["plain"]["tokens"] == row["dflash"]["tokens"] == 2 * 4 * 16
        assert len(row["speedup_per_round"]) == 2
        assert min(row["speedup_per_round"]) <= row["speedup"] <= max(row["speedup_per_round"])
        assert row["speedup"] > 0 and row["dflash"]["mean_tau"] >= 1.0
        assert row["dflash"]["acceptance_length"] >= 1.0
        assert len(row["dflash"]["acceptance_rate_per_position"]) == 7  # B = 8
        assert sum(row["dflash"]["tau_histogram"].values()) > 0
        d = row["dflash"]
        assert d["draft_ms_per_step"] > 0 and 0 < d["verify_ms_per_step"] < d["ms_per_step"]
        hist = row["dflash"]["tau_histogram"]
        # every token after a request's first comes from a verify step
        assert sum(int(k) * v for k, v in hist.items()) == 2 * 4 * 15
    for name in ("speedup.png", "tau_histogram.png"):
        assert (out / name).stat().st_size > 1000


def test_generate_json(tiny, capsys):
    assert main(["generate", "--target", tiny["moe"], "--drafter", tiny["drafter"],
                 "--prompt-ids", "1,2,3", "--max-tokens", "9", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == 9 and out["finish_reason"] == "length"
    assert sum(out["acceptance_lengths"]) == 8  # the first token comes from prefill


def test_bad_values_exit_with_a_message(tiny, capsys):
    assert main(["generate", "--target", tiny["moe"], "--prompt-ids", "1", "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err
    assert main(["bench", "--target", tiny["moe"], "--drafter", tiny["drafter"],
                 "--num-prompts", "1", "--rounds", "0"]) == 2
    assert "rounds must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--target", tiny["moe"], "--drafter", tiny["drafter"],
              "--spec-max-batch", "lots"])
    assert exc.value.code == 2
    assert "expected an integer or 'auto', got 'lots'" in capsys.readouterr().err
