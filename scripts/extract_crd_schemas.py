"""Extract the `openAPIV3Schema` of KubeRay's RayService and RayCluster CRDs into the compact JSON
files `tests/test_k8s.py` validates manifests against (`tests/data/kuberay/*.schema.json`).

The CRD YAMLs are ~1 MB each and are not in this repository; the schemas of one served version,
as one-line JSON, are a few hundred KB together. Rerun after moving to a newer KubeRay:

    python3 scripts/extract_crd_schemas.py CRD_DIR --source "ray-project/kuberay @ <commit>"

CRD_DIR holds `ray.io_rayservices.yaml` and `ray.io_rayclusters.yaml` (KubeRay's
ray-operator/config/crd/bases/). Standard library + PyYAML only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

CRDS = {"rayservice": "ray.io_rayservices.yaml", "raycluster": "ray.io_rayclusters.yaml"}
OUT = Path(__file__).resolve().parents[1] / "tests/data/kuberay"


def extract(crd: dict, version: str, source: str) -> dict:
    """The schema of `version` with a header naming where it came from."""
    served = {v["name"]: v for v in crd["spec"]["versions"] if v.get("served")}
    if version not in served:
        raise SystemExit(f"{crd['metadata']['name']}: version {version} is not served ({served})")
    return {
        "source": f"{source}, ray-operator/config/crd/bases ({crd['metadata']['name']})",
        "license": "Apache-2.0",
        "kind": crd["spec"]["names"]["kind"],
        "apiVersion": f"{crd['spec']['group']}/{version}",
        "openAPIV3Schema": served[version]["schema"]["openAPIV3Schema"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("crd_dir", type=Path)
    parser.add_argument("--source", required=True, help='e.g. "ray-project/kuberay @ feeaf72"')
    parser.add_argument("--version", default="v1")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, filename in CRDS.items():
        crd = yaml.safe_load((args.crd_dir / filename).read_text())
        text = json.dumps(extract(crd, args.version, args.source), separators=(",", ":"))
        (args.out / f"{name}.schema.json").write_text(text + "\n")
        print(f"wrote {name}.schema.json ({len(text) // 1024} KB)")


if __name__ == "__main__":
    main()
