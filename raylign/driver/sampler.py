"""A deterministic, resumable prompt order with exactly-once accounting.

Every prompt handed out gets a uid ``"e<epoch>/r<row>"``. The driver reports each uid back as
``trained`` or ``filtered`` (dynamic sampling dropped it). What was handed out but not yet
reported is *pending*; a checkpoint stores the pending uids so a resumed run hands them out
again first: no prompt is lost or trained twice across a restart.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field


def parse_uid(uid: str) -> tuple[int, int]:
    """``"e3/r17"`` -> (epoch 3, row 17)."""
    epoch, row = uid.split("/")
    return int(epoch[1:]), int(row[1:])


@dataclass
class PromptSampler:
    num_rows: int
    seed: int = 0
    shuffle: bool = True
    epoch: int = 0
    cursor: int = 0  # position in the current epoch's order
    requeued: deque[str] = field(default_factory=deque)  # handed out again before new rows
    pending: dict[str, None] = field(default_factory=dict)  # insertion-ordered set
    trained: int = 0
    filtered: int = 0

    def __post_init__(self) -> None:
        if self.num_rows <= 0:
            raise ValueError("the prompt dataset is empty: nothing to sample")
        self._order = self._epoch_order(self.epoch)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(self.num_rows))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def take(self) -> tuple[str, int]:
        """The next prompt as ``(uid, row)``; wraps to a new (reshuffled) epoch at the end."""
        if self.requeued:
            uid = self.requeued.popleft()
        else:
            if self.cursor == self.num_rows:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            uid = f"e{self.epoch}/r{self._order[self.cursor]}"
            self.cursor += 1
        self.pending[uid] = None
        return uid, parse_uid(uid)[1]

    def done(self, uid: str, trained: bool = True) -> None:
        """Report a pending uid as trained on (or filtered out); reporting twice is a bug."""
        if uid not in self.pending:
            raise RuntimeError(f"prompt {uid} reported twice or never handed out (exactly-once violated)")
        del self.pending[uid]
        if trained:
            self.trained += 1
        else:
            self.filtered += 1

    def state_dict(self) -> dict:
        """JSON-able state; pending uids (in flight at checkpoint time) come back first on restore."""
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "requeued": list(self.requeued) + list(self.pending),
            "trained": self.trained,
            "filtered": self.filtered,
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._epoch_order(self.epoch)
        self.requeued = deque(state["requeued"])
        self.pending = {}
        self.trained, self.filtered = int(state["trained"]), int(state["filtered"])
