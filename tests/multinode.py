"""What the multi-node e2e tests share: the GRPO recipe with the cluster overrides, and where things ran.

Needs a connected driver (``ray_nodes.NodeCluster.connect`` or ``RayHead.connect``) for the node look-ups.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import ray
from cluster_shape import cluster_shapes
from ray_nodes import alive_nodes

from raylign.config import RaylignConfig, load_config
from raylign.driver.online import OnlineRun

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "jobs" / "grpo_qwen2_5_vl_3b.yaml"
CLUSTER_OVERRIDES = ["--rollout.resources.rollout=1", "--learner.resources.learner=1"]
_NOT_CUSTOM = ("CPU", "GPU", "memory", "object_store_memory", "node:", "accelerator_type:")


def custom(resources: dict) -> dict[str, float]:
    """The custom Ray resources of a node's resource dict (what tells node types apart)."""
    return {k: v for k, v in resources.items() if not k.startswith(_NOT_CUSTOM)}


def node_types() -> dict[str, str]:
    """Alive node id -> node type: the manifest group whose custom resource the node has, else "head"."""
    _, groups = cluster_shapes()
    return {n["NodeID"]: next((g for g in groups if g in n["Resources"]), "head") for n in alive_nodes()}


def job_config(out: Path, name: str, *overrides: str) -> RaylignConfig:
    """The GRPO recipe, tiny, with the manifest's cluster overrides (what cluster/raycluster.yaml says to pass)."""
    return load_config(RECIPE, ["--preset=tiny", *CLUSTER_OVERRIDES, f"--output_dir={out}", f"--run_name={name}",
                                "--logging.report_to=[none]", "--logging.progress_bar=false", *overrides],
                       method="grpo")


def audit(run_dir: Path) -> dict[int, dict]:
    """step -> its prompts.jsonl record (the last record of a step wins, as after a resume)."""
    return {r["step"]: r for r in map(json.loads, (run_dir / "prompts.jsonl").read_text().splitlines())}


def assert_each_prompt_trained_once(run_dir: Path, steps: int, per_step: int) -> None:
    records = audit(run_dir)
    assert sorted(records) == list(range(1, steps + 1)), sorted(records)
    uids = [u for r in records.values() for u in r["uids"]]
    assert len(uids) == steps * per_step and max(Counter(uids).values()) == 1, Counter(uids).most_common(3)


def worker_nodes(job: OnlineRun) -> dict[str, str]:
    """rollout worker id -> the node id it runs on."""
    return {w: p["node_id"] for w, p in zip(
        [w for w, _ in job.rollouts.workers], ray.get([h.ping.remote() for _, h in job.rollouts.workers]))}


def learner_nodes(job: OnlineRun) -> list[str]:
    return ray.get([a.node_id.remote() for a in job.learners.actors])
