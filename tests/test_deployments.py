"""The Serve YAMLs parse into our app arguments, and GPU layouts reserve a bundle per actor."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dflash_ray.server.app import AppArgs

DEPLOYMENTS = Path(__file__).resolve().parents[1] / "deployments"


@pytest.mark.parametrize("name", ["dflash.yaml", "qwen3-8b.yaml", "qwen3-30b-a3b.yaml"])
def test_yaml_args_validate_and_bundles_fit(name):
    app = yaml.safe_load((DEPLOYMENTS / name).read_text())["applications"][0]
    assert app["import_path"] == "dflash_ray.server.app:build_app"
    args = AppArgs(**app["args"])  # EngineConfig validation included
    server = next(d for d in app["deployments"] if d["name"] == "DFlashServer")
    engine = args.engine
    if engine.get("executor") == "ray":
        bundles = server["placement_group_bundles"]
        actors = engine.get("num_target_shards", 1) + (1 if engine.get("drafter") else 0)
        assert len(bundles) == 1 + actors  # bundle 0 is the replica's own
        assert all(b.get("GPU") == 1 and b.get("CPU", 0) >= 0.5 for b in bundles[1:])
    else:
        assert "placement_group_bundles" not in server
