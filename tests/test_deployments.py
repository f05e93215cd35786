"""The Serve YAMLs parse into our app arguments, and GPU layouts reserve a bundle per actor."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dflash_ray.server.app import AppArgs

DEPLOYMENTS = Path(__file__).resolve().parents[1] / "deployments"


@pytest.mark.parametrize("name", ["dflash.yaml", "dflash-ray-executor.yaml", "qwen3-8b.yaml",
                                  "qwen3-30b-a3b.yaml", "qwen3.5-35b-a3b.yaml"])
def test_yaml_args_validate_and_bundles_fit(name):
    app = yaml.safe_load((DEPLOYMENTS / name).read_text())["applications"][0]
    assert app["import_path"] == "dflash_ray.server.app:build_app"
    args = AppArgs(**app["args"])  # EngineConfig validation included
    server = next(d for d in app["deployments"] if d["name"] == "DFlashServer")
    engine = args.engine
    if engine.get("executor") == "ray":
        bundles = server["placement_group_bundles"]
        has_drafter = engine.get("drafter") or args.demo
        actors = engine.get("num_target_shards", 1) + (1 if has_drafter else 0)
        assert len(bundles) == 1 + actors  # bundle 0 is the replica's own
        gpus = 1 if engine.get("device", "cpu").startswith("cuda") else None
        assert all(b.get("GPU") == gpus and b.get("CPU", 0) >= 0.5 for b in bundles[1:])
        if gpus is None:  # the executor asks each bundle for exactly its per-actor CPUs
            per_actor = engine.get("cluster", {}).get("num_cpus_per_actor", 0.5)
            assert all(b["CPU"] == per_actor for b in bundles[1:])
    else:
        assert "placement_group_bundles" not in server


def test_qwen3_30b_a3b_plan_uses_the_seven_gpus_beside_the_drafter(tmp_path):
    """The YAML's cluster options give a valid plan for Qwen3-30B-A3B's published shape (its
    config.json fields that the plan reads; the weights are not needed)."""
    import json

    from dflash_ray.cluster.cluster_config import ClusterConfig
    from dflash_ray.models.hf_config import TargetConfig

    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 32,
        "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 6144,
        "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
        "vocab_size": 151936, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "max_position_embeddings": 40960, "tie_word_embeddings": False,
    }))
    app = yaml.safe_load((DEPLOYMENTS / "qwen3-30b-a3b.yaml").read_text())["applications"][0]
    engine = AppArgs(**app["args"]).engine
    cluster = ClusterConfig(num_target_shards=engine["num_target_shards"],
                            **engine.get("cluster", {}))
    plan = cluster.sharding(TargetConfig.load(tmp_path))
    assert (plan.tp_size, plan.ep_size) == (4, 7)
    # what the YAML writes out is what the default would pick
    default = ClusterConfig(num_target_shards=7).sharding(TargetConfig.load(tmp_path))
    assert default == plan


@pytest.mark.parametrize("name", sorted(p.name for p in DEPLOYMENTS.glob("*.yaml")))
def test_yaml_gives_its_replicas_serves_streaming_settings(name):
    """Every deployment runs its replicas with the settings `serve_env` measured and names."""
    from dflash_ray.server.serve_env import REPLICA_ENV

    app = yaml.safe_load((DEPLOYMENTS / name).read_text())["applications"][0]
    env = app.get("runtime_env", {}).get("env_vars", {})
    assert {k: env.get(k) for k in REPLICA_ENV} == REPLICA_ENV
