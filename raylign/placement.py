"""Reserve Ray resources for a group's actors, with a bound: an unschedulable request fails in one line.

Ray waits for resources without limit: an actor (or placement group) asking for a GPU the cluster
lacks, or for a mistyped custom resource, stays pending forever while the autoscaler logs "No
available node types can fulfill resource request". Each group therefore reserves its actors'
resources in a placement group first and waits for it at most ``timeout_s`` (the top-level
``resource_timeout_s`` key; generous on a cluster, where an autoscaler may add nodes), then fails
with the request, the config keys that asked for it and what the cluster offers. Actors scheduled
into a ready placement group start at once, so the later waits are for work, not for resources.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from raylign.errors import RaylignError

logger = logging.getLogger(__name__)

DEFAULT_RESOURCE_TIMEOUT_S = 120.0  # for groups built outside a job (the job passes resource_timeout_s)
# Ray lists what placement groups hold as CPU_group_<pg id>, bundle_group_<i>_<pg id>, ...
_PG_SHARE = re.compile(r"_group_(\d+_)?[0-9a-f]{16,}$")
_NOTICE_AFTER_S = 10.0  # say what we wait for once this much time passed without resources


class ResourcesUnavailable(RaylignError, TimeoutError):
    """A group's resources were not granted within the bound; the message names request, keys and cluster."""


@dataclass(frozen=True)
class ResourceRequest:
    """What a group asks for, and which config keys asked.

    ``keys`` maps a resource name to the key that sets it (``{"GPU": "learner.num_gpus_per_learner"}``);
    a custom resource missing from it is named ``<custom_prefix>.<name>`` (``rollout.resources.gpu_a100``).
    """

    what: str  # "2 learners", "rollout worker rollout-3"
    bundles: tuple[Mapping[str, float], ...]
    keys: Mapping[str, str]
    custom_prefix: str
    strategy: str = "PACK"

    def key_of(self, resource: str) -> str:
        return self.keys.get(resource, f"{self.custom_prefix}.{resource}")


def bundle(num_cpus: float, num_gpus: float, custom: Mapping[str, float]) -> dict[str, float]:
    """One actor's bundle, zero amounts left out (Ray refuses them)."""
    return {k: float(v) for k, v in {"CPU": num_cpus, "GPU": num_gpus, **custom}.items() if v}


def reserve(request: ResourceRequest, timeout_s: float) -> PlacementGroup | None:
    """A ready placement group holding ``request.bundles``, or ``ResourcesUnavailable`` after ``timeout_s``.

    None when every bundle is empty (nothing to wait for). The caller removes the group with
    ``release`` when its actors are gone.
    """
    bundles = [dict(b) for b in request.bundles]
    if not any(bundles):
        return None
    pg = placement_group(bundles, strategy=request.strategy)
    deadline = time.monotonic() + timeout_s
    granted = pg.ready()
    ready, _ = ray.wait([granted], timeout=min(timeout_s, _NOTICE_AFTER_S))
    if not ready and timeout_s > _NOTICE_AFTER_S:
        logger.warning(
            "waiting for %s (%s); giving up in %.0f s (resource_timeout_s)",
            request.what, _describe(request), deadline - time.monotonic(),
        )
        ready, _ = ray.wait([granted], timeout=max(0.0, deadline - time.monotonic()))
    if ready:
        return pg
    remove_placement_group(pg)
    raise ResourcesUnavailable(
        unavailable_message(request, timeout_s, _alive_node_resources(), ray.available_resources())
    )


def release(pg: PlacementGroup | None) -> None:
    """Give a reservation back (a no-op for None)."""
    if pg is not None:
        remove_placement_group(pg)


def _alive_node_resources() -> list[dict[str, float]]:
    return [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]


def short_resources(request: ResourceRequest, nodes: Sequence[Mapping[str, float]]) -> list[str]:
    """Resources some bundle wants more of than any single node has in total (they can never fit as is)."""
    short: list[str] = []
    for b in request.bundles:
        for name, amount in b.items():
            if name not in short and all(n.get(name, 0.0) < amount for n in nodes):
                short.append(name)
    return short


def unavailable_message(
    request: ResourceRequest,
    timeout_s: float,
    nodes: Sequence[Mapping[str, float]],
    available: Mapping[str, float],
) -> str:
    """One line: the request, the keys that asked for it, what the cluster offers, what to do."""
    short = short_resources(request, nodes)
    total: dict[str, float] = {}
    for n in nodes:
        for k, v in n.items():
            total[k] = total.get(k, 0.0) + v
    offers = f"the cluster offers {_fmt(total)} ({len(nodes)} node(s)), free now {_fmt(available)}"
    if short:
        most = {r: max(b.get(r, 0) for b in request.bundles) for r in short}
        asked = ", ".join(f"{request.key_of(r)} ({r}: {_num(most[r])} per actor)" for r in short)
        cause = f"no node has enough {', '.join(short)} (asked by {asked})"
        fix = "lower those keys, fix a mistyped resource name, or add nodes that have them"
    else:
        keys = ", ".join(request.key_of(r) for r in sorted({r for b in request.bundles for r in b}))
        cause = f"the resources exist but are in use or spread over nodes (asked by {keys})"
        fix = "free them (other jobs?), lower the request, or add nodes"
    return (
        f"{request.what} could not get {_describe(request)} within resource_timeout_s={_num(timeout_s)}: "
        f"{cause}; {offers}; {fix}"
    )


def _describe(request: ResourceRequest) -> str:
    distinct = {tuple(sorted(b.items())) for b in request.bundles}
    if len(distinct) == 1:
        n = len(request.bundles)
        return f"{n} x {_fmt(request.bundles[0])}" if n > 1 else _fmt(request.bundles[0])
    return "[" + ", ".join(_fmt(b) for b in request.bundles) + "]"


def _fmt(resources: Mapping[str, float]) -> str:
    """``{CPU: 4, GPU: 1, memory: 12.5 GiB}``, without Ray's ``node:<ip>`` and placement-group entries."""
    parts = []
    for k in sorted(resources, key=lambda k: (k not in ("CPU", "GPU"), k)):
        if k.startswith("node:") or _PG_SHARE.search(k):
            continue
        v = resources[k]
        in_bytes = k in ("memory", "object_store_memory")
        parts.append(f"{k}: {v / 2**30:.1f} GiB" if in_bytes else f"{k}: {_num(v)}")
    return "{" + ", ".join(parts) + "}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"
