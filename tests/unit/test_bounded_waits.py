"""Lint: no ``ray.get`` / ``ray.wait`` in raylign/ waits without a timeout, outside the places documented here.

Waiting for *resources* never happens in these places: groups reserve them first with a bound
(``raylign.placement.reserve``). What remains unbounded below is waiting for *work* on a live
actor, where a dead actor raises ``RayActorError`` at once, or for a ref already known to be ready.
A new unbounded call fails this test: give it a ``timeout=`` or document it here with its reason.
"""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

RAYLIGN = Path(__file__).resolve().parents[2] / "raylign"

# (file, function) -> (number of unbounded calls there, why that is fine)
DOCUMENTED: dict[tuple[str, str], tuple[int, str]] = {
    ("learner/group.py", "__init__"): (2, "rank 0's address, then model load + DeepSpeed init on actors already placed"),
    ("learner/group.py", "_all"): (1, "a training/forward step; collectives are bounded by the process-group timeout"),
    ("learner/group.py", "shutdown"): (1, "barrier + destroy_process_group, bounded by the process-group timeout"),
    ("rewards/group.py", "_collect"): (2, "a ray.put ref (local), or a reward call whose functions each have reward.timeout_s"),
    ("rollout/group.py", "__init__"): (1, "engines built inside actors that already hold their resources (colocate)"),
    ("rollout/group.py", "_on_all"): (1, "engine sleep/wake on live workers"),
    ("rollout/group.py", "load_weights"): (1, "a weight load on a live worker; a death raises and is replaced"),
    ("rollout/group.py", "_collect"): (1, "a ref ray.wait reported ready"),
    ("rollout/group.py", "_fail"): (1, "a ref ray.wait(timeout=0) reported ready"),
    ("rollout/worker.py", "load_weight_refs"): (1, "object-store buckets the learner put; a lost owner raises"),
    ("sync/group.py", "wait"): (1, "a ref ray.wait reported ready"),
    ("sync/group.py", "ready"): (1, "a ref ray.wait(timeout=0) reported ready"),
}


def unbounded_waits(root: Path = RAYLIGN) -> Counter:
    """``(file, enclosing function) -> count`` of ray.get/ray.wait calls with no (or a None) timeout."""
    found: Counter = Counter()
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        enclosing: dict[int, str] = {}
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    enclosing[id(node)] = fn.name  # inner functions overwrite: the innermost wins
        for node in ast.walk(tree):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "ray"
                and node.func.attr in ("get", "wait")
            ):
                continue
            timeout = next((k.value for k in node.keywords if k.arg == "timeout"), None)
            if timeout is None or (isinstance(timeout, ast.Constant) and timeout.value is None):
                found[(path.relative_to(root).as_posix(), enclosing.get(id(node), "<module>"))] += 1
    return found


def test_every_unbounded_ray_wait_is_documented():
    problems = [
        f"raylign/{file}:{func} has {n} ray.get/ray.wait without timeout= (documented: "
        f"{DOCUMENTED.get((file, func), (0, ''))[0]}); add a timeout or document why it cannot hang"
        for (file, func), n in sorted(unbounded_waits().items())
        if n > DOCUMENTED.get((file, func), (0, ""))[0]
    ]
    assert not problems, "\n".join(problems)


def test_the_lint_sees_a_bare_get(tmp_path):
    """Guard: the scanner must flag what it is meant to, or the test above proves nothing."""
    (tmp_path / "m.py").write_text(
        "import ray\n"
        "def f(r):\n    ray.get(r)\n    ray.wait([r], timeout=None)\n    ray.get(r, timeout=5)\n"
    )
    assert unbounded_waits(tmp_path) == Counter({("m.py", "f"): 2})


def test_resource_timeout_default_is_generous_only_where_nodes_can_be_added(monkeypatch):
    from types import SimpleNamespace

    from raylign.driver.common import resource_timeout_s

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    local = SimpleNamespace(ray_address=None, resource_timeout_s=None)
    assert resource_timeout_s(local) == 60.0
    assert resource_timeout_s(SimpleNamespace(ray_address="auto", resource_timeout_s=None)) == 900.0
    assert resource_timeout_s(SimpleNamespace(ray_address="auto", resource_timeout_s=5.0)) == 5.0
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")  # what `ray job submit` sets for the entrypoint
    assert resource_timeout_s(local) == 900.0
