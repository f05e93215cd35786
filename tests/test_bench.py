"""`dflash-ray bench` and `generate` from the command line on tiny models."""

from __future__ import annotations

import json

import pytest

from dflash_ray.cli import main


def test_bench_writes_json_fields_and_plots(tiny, tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", "--target", tiny["moe"], "--drafter", tiny["drafter"],
                 "--spec-profile", "whole_block",
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
                 "--spec-profile", "whole_block",
                 "--prompt-ids", "1,2,3", "--max-tokens", "9", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == 9 and out["finish_reason"] == "length"
    assert sum(out["acceptance_lengths"]) == 8  # the first token comes from prefill


def test_bad_values_exit_with_a_message(tiny, capsys):
    assert main(["generate", "--target", tiny["moe"], "--prompt-ids", "1", "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err
    assert main(["bench", "--target", tiny["moe"], "--drafter", tiny["drafter"],
                 "--spec-profile", "whole_block",
                 "--num-prompts", "1", "--rounds", "0"]) == 2
    assert "rounds must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--target", tiny["moe"], "--drafter", tiny["drafter"],
                 "--spec-profile", "whole_block",
              "--spec-max-batch", "lots"])
    assert exc.value.code == 2
    assert "expected an integer, 'auto' or 'none', got 'lots'" in capsys.readouterr().err


def bench_script(name: str):
    """A script under bench/, imported as a module."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_step_costs_counts_experts_and_restores_the_router(tiny, tmp_path):
    """bench/step_costs.py on the tiny MoE (4 experts, top-2): a one-token step runs exactly 2
    experts per layer, a multi-token verify 2 to 4; the router it wraps is put back."""
    from dflash_ray.ops import OPS, REFERENCE

    step_costs = bench_script("step_costs")
    out_file = tmp_path / "costs.json"
    out = step_costs.main(["--target", tiny["moe"], "--drafter", tiny["drafter"],
                           "--spec-min-confidence", "0", "--prompts", "2", "--max-tokens", "12",
                           "--rounds", "2", "--out", str(out_file)])
    assert json.loads(out_file.read_text()) == json.loads(json.dumps(out))
    assert OPS.route_experts is REFERENCE["route_experts"]
    plain, spec_rows = out["plain"], out["dflash"]["verify_by_tokens"]
    assert list(plain["verify_by_tokens"]) == [1] and plain["experts_per_layer"] == 2.0
    assert plain["verify_by_tokens"][1]["steps"] == 2 * 2 * 11  # rounds x prompts x decodes
    assert set(spec_rows) <= set(range(1, 9)) and max(spec_rows) > 1  # B = 8, whole blocks
    for tokens, row in spec_rows.items():
        assert (row["experts_per_layer"] == 2.0) if tokens == 1 else (
            2.0 <= row["experts_per_layer"] <= 4.0)
    assert out["dflash"]["draft_ms"] > 0 and 1.0 <= out["tau"] <= 8.0


def test_ratios_in_process_parts(tiny, tmp_path):
    """bench/ratios.py's in-process parts (Serve and Ray left out) on the tiny models: every row
    has its fields, positive figures and a `met` that agrees with value and target; both sides
    gave the same tokens (z-lab's loop, transformers' generate, plain vs DFlash)."""
    ratios = bench_script("ratios")
    out = tmp_path / "ratios"
    result = ratios.main(["--out", str(out), "--target", tiny["moe"], "--drafter", tiny["drafter"],
                          "--parts", "zlab", "bench", "code", "hf", "bound",
                          "--concurrency", "1", "2", "--prompts", "2", "--sweep-prompts", "2",
                          "--max-tokens", "8", "--rounds", "1"])
    assert json.loads((out / "ratios.json").read_text()) == json.loads(json.dumps(result))
    assert (out / "ratios.png").stat().st_size > 1000
    rows = {r["name"]: r for r in result["ratios"]}
    assert list(rows) == ["engine_vs_zlab_c1", "dflash_vs_plain_bench_c1", "dflash_vs_plain_c1",
                          "dflash_vs_plain_c2", "dflash_vs_plain_thirdparty_c1",
                          "plain_vs_hf_generate_b1", "speedup_over_bound_c1"]
    for r in rows.values():
        assert set(r) == {"name", "value", "target", "met", "inputs", "command"}, r
        assert r["value"] > 0 and r["command"][0] in ("python3", "dflash-ray")
        i = r["inputs"]
        assert i["numerator_value"] > 0 and i["denominator_value"] > 0
        assert i["unit"] == ("speedup" if r["name"] == "speedup_over_bound_c1" else "tok/s")
        assert r["met"] is (None if r["target"] is None else r["value"] >= r["target"])
        if r["name"] != "speedup_over_bound_c1":
            assert i["outputs_identical"] is True, r["name"]
    for name in ("engine_vs_zlab_c1", "plain_vs_hf_generate_b1"):  # exactly max_tokens each
        assert rows[name]["inputs"]["tokens"] == [2 * 8, 2 * 8]
        assert rows[name]["inputs"]["mismatched_prompts"] == []
    assert rows["speedup_over_bound_c1"]["target"] is None
