"""cluster/: KubeRay manifests against the real CRD schemas, plus the policies the manifests promise.

Schemas: every RayCluster / RayJob validates against ``openAPIV3Schema`` of its kind and version in
the KubeRay CRDs (../shared/kuberay-crds beside the repository; those tests skip, saying so, when it
is absent). The CRD schemas embed the full Kubernetes PodSpec (containers, securityContext,
volumes, resources with the quantity pattern), so pod templates are checked against Kubernetes'
own field definitions. Validation is *strict*: an object schema with ``properties`` rejects keys
it does not list (the API server would silently prune them), so a typo fails here. The
PersistentVolumeClaim's ``spec`` validates against ``PersistentVolumeClaimSpec`` as embedded in the
same CRDs (an ephemeral volume's ``volumeClaimTemplate.spec``); its apiVersion/kind/metadata are
hand-checked. The cluster-launcher YAML validates against Ray's own ``ray-schema.json``.

Policies: restricted Pod Security Standard for every pod, no LoadBalancer/NodePort/Ingress, a GPU-less
head, `rollout`/`learner` worker groups with their custom Ray resources, images = docker/ tags, and a
RayJob whose entrypoint is a loadable recipe whose resources fit the groups.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cluster_shape import custom_resources, gpus  # shared with the multi-node e2e tests' clusters

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is in raylign[test]: pip install jsonschema")

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
CRD_DIR = ROOT.parent / "shared" / "kuberay-crds"
MANIFESTS = sorted(p for p in CLUSTER.glob("*.yaml") if p.name != "cluster-launcher.yaml")
LAUNCHER = CLUSTER / "cluster-launcher.yaml"
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# Pod Security Standard "restricted": the only volume types it allows.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}
GROUPS = {"rollout", "learner"}
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
needs_crds = pytest.mark.skipif(not CRD_DIR.is_dir(), reason=f"KubeRay CRDs not found at {CRD_DIR} "
                                "(CI clones the repository with shared/ beside it)")


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.load_all(path.read_text(), Loader=LOADER) if d]


def all_docs() -> Iterator[tuple[str, dict]]:
    for path in MANIFESTS:
        for doc in docs(path):
            yield path.name, doc


def versions_env() -> dict[str, str]:
    pairs = (ln.split("=", 1) for ln in (ROOT / "docker" / "versions.env").read_text().splitlines()
             if "=" in ln and not ln.lstrip().startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def expected_image() -> str:
    env = versions_env()
    return f"{env['IMAGE_NAME']}:{env['RAYLIGN_VERSION']}-gpu"


# ------------------------------------------------------------------ schemas


def strict(schema: Any) -> Any:
    """A copy where every object schema with `properties` forbids other keys (unless it preserves unknown fields)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_schema(kind: str, version: str) -> dict:
    """openAPIV3Schema of `kind` at `version` from the KubeRay CRDs, made strict."""
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=LOADER)
        if crd["spec"]["names"]["kind"] == kind:
            for v in crd["spec"]["versions"]:
                if v["name"] == version:
                    return strict(v["schema"]["openAPIV3Schema"])
    raise AssertionError(f"no CRD for {kind} {version} in {CRD_DIR}")


def pvc_spec_schema() -> dict:
    """Kubernetes' PersistentVolumeClaimSpec, as the RayCluster CRD embeds it for ephemeral volumes."""
    pod = crd_schema("RayCluster", "v1")["properties"]["spec"]["properties"]["headGroupSpec"]["properties"]
    volume = pod["template"]["properties"]["spec"]["properties"]["volumes"]["items"]["properties"]
    return volume["ephemeral"]["properties"]["volumeClaimTemplate"]["properties"]["spec"]


def schema_errors(doc: dict, schema: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)]


@needs_crds
@pytest.mark.parametrize("name,doc", list(all_docs()), ids=lambda x: x if isinstance(x, str) else x.get("kind"))
def test_manifest_matches_its_schema(name, doc):
    kind, version = doc.get("kind"), str(doc.get("apiVersion", "")).rpartition("/")[2]
    if kind in ("RayCluster", "RayJob"):
        assert doc["apiVersion"] == "ray.io/v1", f"{name}: use ray.io/v1 (v1alpha1 is deprecated)"
        errors = schema_errors(doc, crd_schema(kind, version))
    elif kind == "PersistentVolumeClaim":
        assert doc["apiVersion"] == "v1" and set(doc) <= {"apiVersion", "kind", "metadata", "spec"}
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", doc["metadata"]["name"])
        errors = schema_errors(doc["spec"], pvc_spec_schema())
    elif kind == "NetworkPolicy":
        from k8s_schemas import NETWORK_POLICY  # not embedded in the CRDs; written from the API reference

        errors = schema_errors(doc, NETWORK_POLICY)
    else:
        pytest.fail(f"{name}: no schema check for kind {kind}; add one")
    assert not errors, f"{name}:\n" + "\n".join(errors)


@needs_crds
def test_strict_schema_rejects_typos_and_bad_values():
    """The validation can fail: a misspelt key, a number where KubeRay wants a string, a bad quantity."""
    cluster = docs(CLUSTER / "raycluster.yaml")[0]
    schema = crd_schema("RayCluster", "v1")
    assert schema_errors(cluster, schema) == []
    typo = copy.deepcopy(cluster)
    typo["spec"]["workerGroupSpecs"][0]["minReplica"] = 1
    bad_param = copy.deepcopy(cluster)
    bad_param["spec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] = 0
    bad_qty = copy.deepcopy(cluster)
    bad_qty["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] = "32 GB"
    for broken in (typo, bad_param, bad_qty):
        assert schema_errors(broken, schema), "a broken manifest validated"
    assert schema_errors({"accessModes": "ReadWriteMany"}, pvc_spec_schema())


def test_cluster_launcher_matches_rays_schema():
    spec = importlib.util.find_spec("ray")  # locates the package without importing it
    if spec is None or spec.origin is None:
        pytest.skip("ray is not installed, so its cluster-launcher schema is not available")
    schema = json.loads((Path(spec.origin).parent / "autoscaler" / "ray-schema.json").read_text())
    config = docs(LAUNCHER)[0]
    assert schema_errors(config, schema) == []
    assert schema_errors({**config, "max_worker": 3}, schema), "a misspelt key validated"


# ------------------------------------------------------------------ pod policies


def pod_templates(doc: dict) -> Iterator[tuple[str, dict]]:
    """(where, pod template) of every pod a RayCluster / RayJob creates."""
    spec = doc["spec"]
    if doc["kind"] == "RayJob":
        if "submitterPodTemplate" in spec:
            yield "submitter", spec["submitterPodTemplate"]
        spec = spec["rayClusterSpec"]
    yield "head", spec["headGroupSpec"]["template"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]


def ray_docs() -> list[tuple[str, dict]]:
    return [(n, d) for n, d in all_docs() if d["kind"] in ("RayCluster", "RayJob")]


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def container_problems(where: str, c: dict, pod_sc: dict) -> list[str]:
    sc, out = c.get("securityContext", {}), []
    if sc.get("privileged"):
        out.append(f"{where}: privileged")
    if sc.get("allowPrivilegeEscalation") is not False:
        out.append(f"{where}: allowPrivilegeEscalation must be false")
    caps = sc.get("capabilities", {})
    if "ALL" not in caps.get("drop", []) or caps.get("add"):
        out.append(f"{where}: capabilities must drop ALL and add none")
    if not (sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True):
        out.append(f"{where}: runAsNonRoot not set")
    if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
        out.append(f"{where}: runs as uid 0")
    if sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type") not in ("RuntimeDefault", "Localhost"):
        out.append(f"{where}: seccompProfile must be RuntimeDefault")
    res = c.get("resources", {})
    for part in ("requests", "limits"):
        for r in ("cpu", "memory"):
            if r not in res.get(part, {}):
                out.append(f"{where}: no {part}.{r}")
    if c.get("image") != expected_image():
        out.append(f"{where}: image {c.get('image')} is not {expected_image()} (docker/versions.env)")
    return out


def pod_problems(where: str, template: dict) -> list[str]:
    pod, out = template["spec"], []
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            out.append(f"{where}: {flag}")
    for vol in pod.get("volumes", []):
        types = set(vol) - {"name"}
        if not types <= RESTRICTED_VOLUMES:
            out.append(f"{where}: volume {vol['name']} of type {sorted(types)}")
    for c in pod.get("initContainers", []) + pod["containers"]:
        out += container_problems(f"{where}/{c['name']}", c, pod.get("securityContext", {}))
    return out


@pytest.mark.parametrize("name,doc", ray_docs(), ids=lambda x: x if isinstance(x, str) else x["kind"])
def test_pods_meet_the_restricted_pod_security_standard(name, doc):
    problems = [p for where, t in pod_templates(doc) for p in pod_problems(f"{name}:{where}", t)]
    auto = cluster_spec(doc).get("autoscalerOptions", {})
    fake = {"name": "autoscaler", "image": auto.get("image", expected_image()), **auto}
    problems += [p for p in container_problems(f"{name}:autoscaler", fake, {}) if "image" not in p]
    assert not problems, "\n".join(problems)


def test_policy_checks_catch_violations():
    doc = copy.deepcopy(docs(CLUSTER / "raycluster.yaml")[0])
    worker = doc["spec"]["workerGroupSpecs"][0]["template"]
    worker["spec"]["hostNetwork"] = True
    worker["spec"]["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    c = worker["spec"]["containers"][0]
    c["securityContext"] = {"privileged": True}
    c["image"] = "rayproject/ray:latest"
    found = " ".join(pod_problems("w", worker))
    for needle in ("hostNetwork", "hostPath", "privileged", "allowPrivilegeEscalation", "capabilities", "image"):
        assert needle in found, needle


@pytest.mark.parametrize("name,doc", list(all_docs()), ids=lambda x: x if isinstance(x, str) else x.get("kind"))
def test_nothing_is_exposed_outside_the_cluster(name, doc):
    assert doc["kind"] != "Ingress", f"{name}: no Ingress; use kubectl port-forward"
    if doc["kind"] == "Service":
        assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", f"{name}: Service type {doc['spec']['type']}"
    if doc["kind"] in ("RayCluster", "RayJob"):
        head = cluster_spec(doc)["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{name}: head serviceType {head['serviceType']}"
        assert not head.get("enableIngress"), f"{name}: enableIngress"
        assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"


# ------------------------------------------------------------------ cluster layout


@pytest.mark.parametrize("name,doc", ray_docs(), ids=lambda x: x if isinstance(x, str) else x["kind"])
def test_head_without_gpus_and_autoscaled_gpu_worker_groups(name, doc):
    spec = cluster_spec(doc)
    assert spec["rayVersion"] == versions_env()["RAY_VERSION"], "rayVersion differs from the image's Ray"
    assert spec.get("enableInTreeAutoscaling") is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-gpus") == "0" and gpus(head["template"]) == 0
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == GROUPS
    for gname, g in groups.items():
        res = custom_resources(g)
        assert res.get(gname, 0) > 0, f"{gname}: no custom Ray resource {gname!r}"
        assert res[gname] == gpus(g["template"]) > 0, f"{gname}: one {gname} unit per GPU, so 1-GPU actors fill a pod"
        assert g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]
        has_params = any(k in g.get("rayStartParams", {}) for k in ("num-cpus", "num-gpus", "memory", "resources"))
        assert not (has_params and g.get("resources")), f"{gname}: KubeRay rejects resources in both places"
        assert "labels" not in g.get("rayStartParams", {}), f"{gname}: KubeRay rejects rayStartParams labels"
    assert groups["rollout"]["maxReplicas"] > groups["rollout"]["minReplicas"], "rollout group must autoscale"
    assert DNS1035.match(doc["metadata"]["name"]) and len(doc["metadata"]["name"]) <= (47 if doc["kind"] == "RayJob" else 53)


def mounts(template: dict) -> dict[str, dict]:
    pod = template["spec"]
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    return {m["mountPath"]: vols[m["name"]] for m in pod["containers"][0].get("volumeMounts", [])}


@pytest.mark.parametrize("name,doc", ray_docs(), ids=lambda x: x if isinstance(x, str) else x["kind"])
def test_shared_checkpoints_and_shm(name, doc):
    claim = docs(CLUSTER / "pvc.yaml")[0]
    assert "ReadWriteMany" in claim["spec"]["accessModes"] and claim["spec"]["resources"]["requests"]["storage"]
    for where, template in pod_templates(doc):
        if where == "submitter":
            continue
        m = mounts(template)
        assert m["/mnt/checkpoints"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"], where
        shm = m.get("/dev/shm", {}).get("emptyDir", {})
        assert shm.get("medium") == "Memory" and shm.get("sizeLimit"), f"{where}: no memory-backed /dev/shm"


# ------------------------------------------------------------------ the RayJob runs a real recipe


def rayjob() -> dict:
    return docs(CLUSTER / "rayjob-grpo.yaml")[0]


def test_rayjob_embeds_the_raycluster_spec_and_cleans_up():
    job = rayjob()["spec"]
    assert job["rayClusterSpec"] == docs(CLUSTER / "raycluster.yaml")[0]["spec"], \
        "rayjob-grpo.yaml and raycluster.yaml describe different clusters"
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0
    env = yaml.safe_load(job["runtimeEnvYAML"])
    assert env["working_dir"] == "local:///app"
    dockerfile = (ROOT / "docker" / "Dockerfile.gpu").read_text()
    assert re.search(r"^COPY .*jobs /app/jobs$", dockerfile, re.MULTILINE) and "WORKDIR /app" in dockerfile


def test_rayjob_entrypoint_is_a_loadable_recipe_that_fits_the_groups():
    from raylign.config import load_config

    tokens = shlex.split(rayjob()["spec"]["entrypoint"])
    assert tokens[:2] == ["raylign", "grpo"] and tokens[2] == "--config"
    recipe = tokens[3]
    assert recipe == "jobs/grpo_qwen2_5_vl_3b.yaml" and (ROOT / recipe).is_file()
    cfg = load_config(ROOT / recipe, tokens[4:], method=tokens[1])
    assert cfg.output_dir.startswith("/mnt/checkpoints/"), "run directories must land on the shared PVC"
    assert cfg.rollout.resources == {"rollout": 1.0} and cfg.learner.resources == {"learner": 1.0}
    groups = {g["groupName"]: g for g in rayjob()["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    rollout_units = custom_resources(groups["rollout"])["rollout"] * groups["rollout"]["maxReplicas"]
    learner_units = custom_resources(groups["learner"])["learner"] * groups["learner"]["maxReplicas"]
    assert cfg.rollout.num_workers * cfg.rollout.resources["rollout"] <= rollout_units
    assert cfg.learner.num_learners * cfg.learner.resources["learner"] <= learner_units
    assert (cfg.rollout.num_gpus_per_worker or 1) <= gpus(groups["rollout"]["template"])


def test_cluster_launcher_layout():
    config = docs(LAUNCHER)[0]
    types = config["available_node_types"]
    assert set(types) == {"head"} | GROUPS and config["head_node_type"] == "head"
    assert types["head"]["resources"].get("GPU", 0) == 0
    for name in GROUPS:
        res = types[name]["resources"]
        assert res.get(name, 0) == res.get("GPU", 0) > 0, f"{name}: one {name} unit per GPU"
        assert types[name].get("min_workers", 0) <= types[name]["max_workers"]
    assert config["docker"]["image"] == expected_image()
    starts = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=0.0.0.0" not in starts, "the dashboard must stay on the head's localhost"
