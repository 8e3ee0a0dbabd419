"""WeightBroadcaster bookkeeping without Ray: versions, who gets marked synced, who is replaced, what SyncError says."""

from __future__ import annotations

import pytest

from raylign.config import SyncConfig
from raylign.sync import broadcaster as module
from raylign.sync.broadcaster import WeightBroadcaster
from raylign.sync.transports import Readiness, SendResult, SyncError


class FakeRollouts:
    """The parts of RolloutGroup the broadcaster uses."""

    def __init__(self, ids):
        self.local = None
        self.version = 0
        self.ids = list(ids)
        self.synced: list[tuple[list[str], int]] = []
        self.replaced: list[str] = []

    @property
    def workers(self):
        return [(w, f"handle-{w}") for w in self.ids]

    def mark_synced(self, ids, version):
        self.synced.append((list(ids), version))
        self.version = max(self.version, version)

    def replace_worker(self, worker_id, reason):
        self.replaced.append(worker_id)
        self.ids[self.ids.index(worker_id)] = new = f"{worker_id}-new"
        return new


class FakeTransport:
    name = "fake"

    def __init__(self):
        self.results: list[SendResult] = []
        self.sent: list[tuple[list[str], int]] = []
        self.starting: set[str] = set()

    def ready(self, targets, wait_s):
        ready = [t for t in targets if t[0] not in self.starting]
        return Readiness(ready=ready, starting=[w for w, _ in targets if w in self.starting], control_calls=0)

    def send(self, targets, version):
        self.sent.append(([w for w, _ in targets], version))
        result = self.results.pop(0) if self.results else SendResult(bytes=100, buckets=2, control_calls=4)
        if not result.synced and not result.failed and result.sender_error is None:
            result.synced = [w for w, _ in targets]
        return result

    def close(self):
        pass


@pytest.fixture
def parts(monkeypatch):
    transport = FakeTransport()
    monkeypatch.setattr(module, "make_transport", lambda *args: transport)
    rollouts = FakeRollouts(["a", "b", "c"])
    return WeightBroadcaster(None, rollouts, SyncConfig(timeout_s=5)), rollouts, transport


def test_a_good_sync_marks_everyone_and_reports_metrics(parts):
    broadcaster, rollouts, transport = parts
    metrics = broadcaster.broadcast(3)
    assert rollouts.synced == [(["a", "b", "c"], 3)] and transport.sent == [(["a", "b", "c"], 3)]
    assert metrics["sync/version"] == 3 and metrics["sync/bytes"] == 100 and metrics["sync/buckets"] == 2
    assert (
        metrics["sync/control_calls"] == 4 and metrics["sync/engines"] == 3 and metrics["sync/seconds"] >= 0
    )
    broadcaster.sync_workers(["b"])  # the last broadcast version by default
    assert transport.sent[-1] == (["b"], 3)
    with pytest.raises(KeyError, match="no live rollout workers"):
        broadcaster.sync_workers(["zz"])


def test_starting_engines_are_skipped_and_not_blamed(parts):
    broadcaster, rollouts, transport = parts
    transport.starting = {"c"}
    metrics = broadcaster.broadcast(1)
    assert transport.sent == [(["a", "b"], 1)] and metrics["sync/engines_starting"] == 1
    assert rollouts.synced == [(["a", "b"], 1)] and rollouts.version == 1  # "c" stays stale: no work


def test_a_dead_receiver_is_replaced_and_named_collateral_failures_are_not(parts):
    broadcaster, rollouts, transport = parts
    transport.results.append(
        SendResult(
            synced=["c"],
            failed={"a": "died: ActorDiedError", "b": "GroupError: connection closed"},
            lost=["a"],
            at_fault=["a"],
            sender_error="learner rank 0: connection reset",
        )
    )
    with pytest.raises(SyncError) as info:
        broadcaster.broadcast(2)
    err = info.value
    assert err.worker_ids == ["a"] and sorted(err.unsynced) == ["a", "b"] and err.replaced == {"a": "a-new"}
    assert (
        "rollout worker a: died" in str(err)
        and "replaced by a-new" in str(err)
        and "learner side" in str(err)
    )
    assert rollouts.replaced == ["a"]
    assert rollouts.synced == [(["c"], 2)] and rollouts.version == 2  # the group moved on without a and b
    broadcaster.broadcast(3)  # the replacement is a target of the next sync
    assert transport.sent[-1] == (["a-new", "b", "c"], 3)


def test_when_no_one_is_at_fault_every_failed_worker_is_named(parts):
    broadcaster, rollouts, transport = parts
    transport.results.append(SendResult(synced=["a", "c"], failed={"b": "KeyError: no parameter 'x'"}))
    with pytest.raises(SyncError, match="rollout worker b: KeyError") as info:
        broadcaster.broadcast(1)
    assert (
        info.value.worker_ids == ["b"] and rollouts.replaced == []
    )  # a load error is not fixed by a restart
