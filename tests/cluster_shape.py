"""The node types of cluster/raycluster.yaml, read once: what the multi-node tests build their clusters from.

Pure YAML reading (no Ray), shared by tests/unit/test_manifests.py and the multi-node e2e tests, so
the test clusters and the KubeRay manifest have one source: a test cluster has the manifest's node
types with the manifest's custom resources; only the amounts of CPUs and GPUs are scaled to this
machine (no GPUs here; a few logical CPUs per node).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

RAYCLUSTER = Path(__file__).resolve().parents[1] / "cluster" / "raycluster.yaml"


def custom_resources(group: dict) -> dict[str, float]:
    """Custom Ray resources a group declares (rayStartParams' JSON-in-a-string, or the `resources` field)."""
    raw = group.get("rayStartParams", {}).get("resources")
    declared = {k: float(v) for k, v in json.loads(json.loads(raw)).items()} if raw else {}
    declared.update({k: float(v) for k, v in group.get("resources", {}).items()})
    return declared


def gpus(template: dict) -> int:
    """GPUs a pod template asks for (its first container's `nvidia.com/gpu` limit)."""
    limits = template["spec"]["containers"][0]["resources"].get("limits", {})
    return int(limits.get("nvidia.com/gpu", 0))


@dataclass(frozen=True)
class NodeShape:
    """One node type: the head or a worker group of the manifest."""

    name: str
    num_cpus: float  # rayStartParams num-cpus, else the container's CPU limit
    num_gpus: int
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources
    min_replicas: int = 1
    max_replicas: int = 1

    def scaled(self, num_cpus: float) -> NodeShape:
        """This node type on a CPU machine: the same custom resources, no GPUs, ``num_cpus`` logical CPUs."""
        return NodeShape(self.name, num_cpus, 0, dict(self.resources), self.min_replicas, self.max_replicas)


def _cpus(params: dict, template: dict) -> float:
    if "num-cpus" in params:
        return float(params["num-cpus"])
    return float(template["spec"]["containers"][0]["resources"]["limits"]["cpu"])


def cluster_shapes(path: Path = RAYCLUSTER) -> tuple[NodeShape, dict[str, NodeShape]]:
    """(head, {group name: worker node type}) of the RayCluster manifest at ``path``."""
    spec = yaml.safe_load(path.read_text())["spec"]
    h = spec["headGroupSpec"]
    head_params = h.get("rayStartParams", {})
    num_gpus = int(head_params.get("num-gpus", gpus(h["template"])))
    head = NodeShape("head", _cpus(head_params, h["template"]), num_gpus, custom_resources(h))
    groups = {
        g["groupName"]: NodeShape(g["groupName"], _cpus(g.get("rayStartParams", {}), g["template"]),
                                  gpus(g["template"]), custom_resources(g), g["minReplicas"], g["maxReplicas"])
        for g in spec["workerGroupSpecs"]
    }
    return head, groups
