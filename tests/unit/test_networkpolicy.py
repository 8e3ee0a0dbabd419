"""cluster/networkpolicy.yaml admits only the Ray pods, the job submitter and the KubeRay operator.

The policy is evaluated here with Kubernetes' NetworkPolicy semantics (a pod selected by a policy
accepts a connection when some ingress rule's peers and ports match it; peers in one rule are
ORed; a podSelector without namespaceSelector means "this namespace") against the pods the
manifests create, with the labels KubeRay adds (``ray.io/is-ray-node: "yes"``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from k8s_schemas import NETWORK_POLICY

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is in raylign[test]: pip install jsonschema")

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
KUBERAY_NODE = {"ray.io/is-ray-node": "yes"}  # KubeRay's label on every Ray pod it creates


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]


POLICY = _docs("networkpolicy.yaml")[0]


def _matches(selector: dict, labels: dict) -> bool:
    """LabelSelector match (matchLabels and matchExpressions; an empty selector matches everything)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        present, value = e["key"] in labels, labels.get(e["key"])
        ok = {
            "In": present and value in e.get("values", []),
            "NotIn": not present or value not in e.get("values", []),
            "Exists": present,
            "DoesNotExist": not present,
        }[e["operator"]]
        if not ok:
            return False
    return True


def admits(policy: dict, dest: dict, source: dict, source_ns: dict, same_namespace: bool, port: int) -> bool:
    """Whether ``policy`` lets ``source`` (pod labels, its namespace's labels) connect to ``dest`` on TCP ``port``."""
    spec = policy["spec"]
    if not _matches(spec["podSelector"], dest):
        return True  # not selected: this policy says nothing
    for rule in spec.get("ingress", []):
        ports = rule.get("ports")
        if ports and not any(p.get("protocol", "TCP") == "TCP" and p["port"] == port for p in ports):
            continue
        for peer in rule.get("from", [{}]):
            ns_ok = _matches(peer["namespaceSelector"], source_ns) if "namespaceSelector" in peer else same_namespace
            if ns_ok and _matches(peer.get("podSelector", {}), source):
                return True
    return False


def _ray_pods() -> list[tuple[str, dict]]:
    """(where, labels KubeRay gives it) of every Ray pod the RayCluster and RayJob create."""
    out = []
    for name in ("raycluster.yaml", "rayjob-grpo.yaml"):
        for doc in _docs(name):
            spec = doc["spec"].get("rayClusterSpec", doc["spec"])
            groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
            out += [(f"{name}:{g}", {**t["template"]["metadata"]["labels"], **KUBERAY_NODE}) for g, t in groups]
    return out


def _submitter() -> dict:
    (job,) = _docs("rayjob-grpo.yaml")
    return job["spec"]["submitterPodTemplate"]["metadata"]["labels"]


OPERATOR = {"app.kubernetes.io/name": "kuberay-operator", "app.kubernetes.io/instance": "kuberay-operator"}


def test_policy_is_a_valid_network_policy():
    assert list(jsonschema.Draft7Validator(NETWORK_POLICY).iter_errors(POLICY)) == []
    typo = {**POLICY, "spec": {**POLICY["spec"], "podselector": POLICY["spec"]["podSelector"]}}
    assert list(jsonschema.Draft7Validator(NETWORK_POLICY).iter_errors(typo)), "a misspelt key validated"


@pytest.mark.parametrize("where,pod", _ray_pods(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_ray_pod_is_protected(where, pod):
    stranger = {"app": "some-other-app"}
    for port in (8265, 6379, 10001, 8080):
        assert not admits(POLICY, pod, stranger, {}, same_namespace=True, port=port), f"{where}: open on {port}"
    # Other raylign Ray pods reach it on any port (GCS, raylets, object store, NCCL).
    for _, peer in _ray_pods():
        assert admits(POLICY, pod, peer, {}, same_namespace=True, port=6379)
        assert admits(POLICY, pod, peer, {}, same_namespace=True, port=41234)


def test_submitter_and_operator_reach_only_the_job_api():
    (_, head), *_ = _ray_pods()
    for source, same_ns in ((_submitter(), True), (OPERATOR, False)):
        assert admits(POLICY, head, source, {"kubernetes.io/metadata.name": "ray-system"}, same_ns, 8265)
        assert not admits(POLICY, head, source, {}, same_ns, 6379)
    # The submitter label only counts in this namespace (anyone can label a pod elsewhere).
    assert not admits(POLICY, head, _submitter(), {}, same_namespace=False, port=8265)


def test_evaluator_can_say_no_and_yes():
    """Guard: the evaluator is not trivially true or false."""
    policy = {"spec": {"podSelector": {"matchLabels": {"a": "1"}}, "ingress": [{"from": [{"podSelector": {}}], "ports": [{"port": 1}]}]}}
    assert admits(policy, {"a": "1"}, {}, {}, True, 1) and not admits(policy, {"a": "1"}, {}, {}, True, 2)
    assert not admits(policy, {"a": "1"}, {}, {}, False, 1) and admits(policy, {"a": "2"}, {}, {}, False, 9)
