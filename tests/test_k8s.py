"""The KubeRay manifests under k8s/: valid against KubeRay's CRD schemas as strictly as
`kubectl apply --validate=strict` checks them, serving the app of the Serve config they are
rendered from, with the GPUs, volumes and metrics ports the README promises. No cluster, no
network: the schemas are compact copies in tests/data/kuberay (scripts/extract_crd_schemas.py)."""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
SCHEMAS = ROOT / "tests/data/kuberay"
CRD_DIR = ROOT.parent / "shared/data/kuberay"  # the full CRDs; beside dev checkouts, not in CI
SERVE_CONFIG = ROOT / "deployments/qwen3-30b-a3b.yaml"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def closed(schema: dict) -> dict:
    """`schema` with unknown fields made errors. The API server's strict field validation rejects
    them, but the CRDs only list their fields: they never say additionalProperties: false."""
    s = dict(schema)
    if "properties" in s:
        s["properties"] = {k: closed(v) for k, v in s["properties"].items()}
        if "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(s.get(key), dict):
            s[key] = closed(s[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in s:
            s[key] = [closed(sub) for sub in s[key]]
    if s.get("x-kubernetes-int-or-string"):  # 8 and "8"; controller-gen adds this anyOf itself
        s.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    return s


def crd_schema(name: str) -> dict:
    return closed(json.loads((SCHEMAS / f"{name}.schema.json").read_text())["openAPIV3Schema"])


SCHEMA_BY_KIND = {"RayService": crd_schema("rayservice"), "RayCluster": crd_schema("raycluster")}


def errors(doc: dict, schema: dict) -> list[str]:
    # OpenAPI v3.0 schemas are draft-4 style (boolean exclusiveMinimum and friends).
    found = jsonschema.Draft4Validator(schema).iter_errors(doc)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in found)


def ray_errors(doc: dict) -> list[str]:
    found = errors(doc, SCHEMA_BY_KIND[doc["kind"]])
    if doc["kind"] == "RayService":  # the operator turns rayClusterConfig into a RayCluster spec
        cluster_spec = SCHEMA_BY_KIND["RayCluster"]["properties"]["spec"]
        found += errors(doc["spec"]["rayClusterConfig"], cluster_spec)
    return found


def manifests() -> list[dict]:
    return [
        doc
        for path in sorted(K8S.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc is not None
    ]


def rayservice() -> dict:
    return yaml.safe_load((K8S / "rayservice.yaml").read_text())


def groups(doc: dict) -> list[tuple[str, dict]]:
    """(node type, group spec) for the head and every worker group of a RayService."""
    cluster = doc["spec"]["rayClusterConfig"]
    workers = [("worker", group) for group in cluster["workerGroupSpecs"]]
    return [("head", cluster["headGroupSpec"]), *workers]


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay runs Ray in the first container


def test_every_manifest_parses_and_names_itself():
    docs = manifests()
    assert {"RayService", "PersistentVolumeClaim", "PodMonitor"} <= {d["kind"] for d in docs}
    for doc in docs:
        assert doc["apiVersion"] and doc["metadata"]["name"], doc


def test_ray_manifests_validate_strictly():
    ray_docs = [d for d in manifests() if d["kind"] in SCHEMA_BY_KIND]
    assert ray_docs
    for doc in ray_docs:
        assert ray_errors(doc) == [], doc["metadata"]["name"]


def _misspell_head_params(doc):
    head = doc["spec"]["rayClusterConfig"]["headGroupSpec"]
    head["rayStartParam"] = head.pop("rayStartParams")


def _misspell_volume_mounts(doc):
    container = ray_container(doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0])
    container["volumeMount"] = container.pop("volumeMounts")


def _gpus_as_list(doc):
    container = ray_container(doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0])
    container["resources"]["limits"]["nvidia.com/gpu"] = [8]


@pytest.mark.parametrize(
    "mutate, where, what",
    [
        (_misspell_head_params, "spec.rayClusterConfig.headGroupSpec", "'rayStartParam'"),
        (_misspell_volume_mounts, "containers.0", "'volumeMount'"),  # deep in the pod spec
        (_gpus_as_list, "limits.nvidia.com/gpu", "is not valid under any of"),
    ],
)
def test_a_bad_field_is_an_error_naming_it(mutate, where, what):
    doc = rayservice()
    mutate(doc)
    found = errors(doc, SCHEMA_BY_KIND["RayService"])
    assert len(found) == 1 and where in found[0] and what in found[0], found


def test_closing_keeps_the_kubernetes_extensions():
    # Neither extension form occurs in today's CRDs; a newer KubeRay may bring them.
    schema = closed(
        {
            "type": "object",
            "properties": {
                "quantity": {"x-kubernetes-int-or-string": True},
                "free": {
                    "type": "object",
                    "x-kubernetes-preserve-unknown-fields": True,
                    "properties": {"known": {"type": "string"}},
                },
            },
        }
    )
    assert errors({"quantity": 8, "free": {"known": "x", "anything": 1}}, schema) == []
    assert errors({"quantity": "8Gi"}, schema) == []
    assert len(errors({"quantity": [8]}, schema)) == 1
    assert "'extra' was unexpected" in errors({"extra": 1}, schema)[0]


def test_serve_config_is_the_deployments_app_with_pod_paths():
    from ray.serve.schema import ServeDeploySchema

    doc = rayservice()
    config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)
    assert config["http_options"]["host"] == "0.0.0.0"  # the serve Service reaches the pods

    # The model paths are the only change: the same directory names under the PVC mount.
    worker = groups(doc)[1][1]
    volumes = worker["template"]["spec"]["volumes"]
    pvc = next(v for v in volumes if v.get("persistentVolumeClaim"))
    assert pvc["persistentVolumeClaim"]["claimName"] == "dflash-models"
    mount = next(m for m in ray_container(worker)["volumeMounts"] if m["name"] == pvc["name"])
    assert mount["readOnly"]
    (app,) = config["applications"]
    (source,) = yaml.safe_load(SERVE_CONFIG.read_text())["applications"]
    want = copy.deepcopy(source)
    for key in ("target", "drafter"):
        name = PurePosixPath(want["args"]["engine"][key]).name
        want["args"]["engine"][key] = f"{mount['mountPath']}/{name}"
    assert app["import_path"] == "dflash_ray.server.app:build_app"
    assert app == want


def test_worker_gpus_and_cpus_cover_the_placement_groups():
    doc = rayservice()
    (app,) = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
    server = next(d for d in app["deployments"] if d["name"] == "DFlashServer")
    bundles, replicas = server["placement_group_bundles"], server["num_replicas"]
    gpus = sum(b.get("GPU", 0) for b in bundles)
    # The head runs no replicas (num-cpus 0), so the other deployments' CPUs count too.
    cpus = replicas * sum(b.get("CPU", 0) for b in bundles) + sum(
        d["num_replicas"] * d["ray_actor_options"]["num_cpus"]
        for d in app["deployments"]
        if d is not server
    )
    (_, head), *workers = groups(doc)
    assert head["rayStartParams"]["num-gpus"] == "0" and head["rayStartParams"]["num-cpus"] == "0"
    assert all("nvidia.com/gpu" not in r for r in ray_container(head)["resources"].values())
    pods = [(w["replicas"], ray_container(w)["resources"]["limits"]) for _, w in workers]
    if server["placement_group_strategy"] == "STRICT_PACK":  # a replica's bundles on one pod
        assert max(int(lim["nvidia.com/gpu"]) for _, lim in pods) >= gpus
    assert sum(n * int(lim["nvidia.com/gpu"]) for n, lim in pods) >= replicas * gpus
    assert sum(n * int(lim["cpu"]) for n, lim in pods) >= cpus
    for _, w in workers:
        spec = w["template"]["spec"]
        gpu_taint = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        assert gpu_taint in spec["tolerations"]
        mounts = {m["mountPath"]: m["name"] for m in ray_container(w)["volumeMounts"]}
        assert {"name": mounts["/dev/shm"], "emptyDir": {"medium": "Memory"}} in spec["volumes"]


def test_every_ray_pod_runs_its_proxy_with_serves_streaming_settings():
    """A Serve proxy runs on every node and reads its settings from the pod's env at start."""
    from dflash_ray.server.serve_env import PROXY_ENV

    for node_type, group in groups(rayservice()):
        env = {e["name"]: e.get("value") for e in ray_container(group)["env"]}
        assert {k: env.get(k) for k in PROXY_ENV} == PROXY_ENV, node_type


def _selects(selector: dict, labels: dict[str, str]) -> bool:
    ok = all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] in ("Exists", "In"), expr
        ok &= expr["key"] in labels and (
            expr["operator"] == "Exists" or labels[expr["key"]] in expr["values"]
        )
    return ok


def test_podmonitors_scrape_metrics_port_of_head_and_workers():
    pods = []
    for node_type, group in groups(rayservice()):
        ports = {p["name"]: p["containerPort"] for p in ray_container(group)["ports"]}
        assert ports["metrics"] == 8080 == int(group["rayStartParams"]["metrics-export-port"])
        # The labels KubeRay puts on the pod, over those of our template.
        labels = {
            **group["template"]["metadata"]["labels"],
            "ray.io/node-type": node_type,
            "ray.io/cluster": "dflash-x7k2p",
            "ray.io/group": group.get("groupName", "headgroup"),
        }
        pods.append((node_type, labels))
    monitors = [d for d in manifests() if d["kind"] == "PodMonitor"]
    covered = set()
    for monitor in monitors:
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
        selected = {t for t, labels in pods if _selects(monitor["spec"]["selector"], labels)}
        assert len(selected) == 1, (monitor["metadata"]["name"], selected)
        covered |= selected
    assert covered == {"head", "worker"}


def test_render_check_passes_on_the_checked_in_files():
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts/render_k8s.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr


def test_render_flags_drift_and_builds_the_dashboard_configmap(tmp_path):
    render_k8s = load_script("render_k8s")
    (tmp_path / "deployments").mkdir()
    shutil.copy(SERVE_CONFIG, tmp_path / "deployments")
    assert render_k8s.main(["--repo", str(tmp_path), "--check"]) == 1  # k8s/ not written yet
    render_k8s.main(["--repo", str(tmp_path)])
    assert not (tmp_path / "k8s/grafana-dashboard-configmap.yaml").exists()  # no dashboards
    assert render_k8s.main(["--repo", str(tmp_path), "--check"]) == 0

    text = SERVE_CONFIG.read_text().replace("max_num_seqs: 64", "max_num_seqs: 32")
    (tmp_path / "deployments" / SERVE_CONFIG.name).write_text(text)
    (tmp_path / "dashboards").mkdir()
    dashboard = json.dumps({"title": "DFlash", "panels": []}, indent=2)
    (tmp_path / "dashboards/dflash.json").write_text(dashboard)
    problems = render_k8s.check(tmp_path, render_k8s.render(tmp_path))
    assert len(problems) == 2 and "+          max_num_seqs: 32" in problems[0], problems

    render_k8s.main(["--repo", str(tmp_path)])
    configmap = yaml.safe_load((tmp_path / "k8s/grafana-dashboard-configmap.yaml").read_text())
    assert configmap["metadata"]["labels"] == {"grafana_dashboard": "1"}
    assert configmap["data"] == {"dflash.json": dashboard}


@pytest.mark.skipif(not CRD_DIR.is_dir(), reason="no full KubeRay CRDs beside the checkout")
@pytest.mark.parametrize("name", ["rayservice", "raycluster"])
def test_compact_schemas_are_those_of_the_crds(name):
    extract = load_script("extract_crd_schemas")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((CRD_DIR / extract.CRDS[name]).read_text(), Loader=loader)
    stored = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
    assert extract.extract(crd, "v1", "")["openAPIV3Schema"] == stored["openAPIV3Schema"]
