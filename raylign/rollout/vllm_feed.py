"""``LocalFeed``: the vLLM engine's own process as the sender of a weight group with its vLLM workers.

The in-process and object-store transports hand the engine tensors (``VLLMEngine.load_weights``);
vLLM's workers may live in other processes (its default multiprocess mode, tensor parallelism), so
the engine broadcasts each bucket to them over a gloo group of its own, on this host, the same way
the learner does (``raylign.sync.collective``). Only the layout goes through ``collective_rpc``,
which runs in a helper thread while this thread sends (it returns once the workers have loaded).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from raylign.sync.buckets import Bucket, WeightLayout, layout_to_plain, spec_of
from raylign.sync.collective import GroupSpec, WeightGroup, open_store, send_buckets

LOOPBACK = "127.0.0.1"
FEED_TIMEOUT_S = 300.0  # per operation; the workers load a bucket between two operations


class LocalFeed:
    """Bucket-at-a-time weight updates from this process into vLLM's workers.

    Args:
        rpc: ``llm.collective_rpc``.
        ranks: vLLM's worker processes (its world size); they join as ranks 1..ranks.
    """

    def __init__(self, rpc: Callable[..., list], ranks: int, timeout_s: float = FEED_TIMEOUT_S):
        self._rpc, self._ranks, self._timeout = rpc, ranks, timeout_s
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="raylign-vllm-feed")
        self._group: WeightGroup | None = None
        self._open = False  # buckets loaded since the last finish()

    def send(self, bucket: Bucket) -> int:
        """Broadcast ``bucket`` to the workers and wait until they have loaded it; returns its size."""
        group = self._group if self._group is not None and self._group.alive else self._join()
        layout = WeightLayout((spec_of(bucket),))
        self._open = True
        pending = self._call("raylign_receive_weights", group.spec.tag, layout_to_plain(layout), False)
        send_error: Exception | None = None
        try:
            send_buckets([bucket], layout, group)
        except Exception as err:  # noqa: BLE001 - the workers' error (below) says more; both are raised
            send_error = err
        counts = self._result(pending, send_error)
        if any(int(c) != len(bucket) for c in counts):
            raise RuntimeError(f"vLLM's workers loaded {counts} of {len(bucket)} tensors of a bucket")
        return len(bucket)

    def finish(self) -> None:
        """Close the workers' open reload (every layer processed); a no-op when nothing was sent."""
        if self._open:
            self._open = False
            self._rpc("raylign_finish_update")

    def close(self) -> None:
        """Drop this process's end of the group (the workers drop theirs when they join another)."""
        if self._group is not None:
            self._group.close()
            self._group = None

    def _join(self) -> WeightGroup:
        store = open_store(self._timeout, host=LOOPBACK)
        spec = GroupSpec(LOOPBACK, int(store.port), 1 + self._ranks, "gloo", self._timeout)
        joined = self._call("raylign_join_weight_group", dataclasses.asdict(spec), 1, LOOPBACK)
        group = WeightGroup(spec, 0, store, LOOPBACK)  # returns once every worker has joined
        self._result(joined, None)
        self._group = group
        return group

    def _call(self, method: str, *args: Any) -> Future:
        return self._pool.submit(self._rpc, method, args=args)

    def _result(self, pending: Future, send_error: Exception | None) -> list:
        try:
            result = pending.result()
        except Exception as err:
            self.close()
            raise RuntimeError(f"vLLM's workers failed to take weights from this process: {err}") from (
                send_error or err
            )
        if send_error is not None:
            self.close()
            raise send_error
        return result
