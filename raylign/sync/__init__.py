"""Weight sync: the learner's weights to every rollout engine, in buckets, versioned.

``WeightBroadcaster`` (``raylign.sync.broadcaster``) is the entry point. The transports are in
``raylign.sync.transports`` (interface, in-process) and ``raylign.sync.group`` (the Ray ones:
collective and object store); ``buckets``, ``collective`` and ``endpoints`` are the plain pieces
the learner and rollout workers run. Nothing here imports Ray until a remote transport is built.
"""

from raylign.sync.broadcaster import WeightBroadcaster
from raylign.sync.buckets import BucketSpec, TensorSpec, WeightLayout, layout_of, pack, unpack
from raylign.sync.transports import SendResult, SyncError, Transport

__all__ = [
    "BucketSpec",
    "SendResult",
    "SyncError",
    "TensorSpec",
    "Transport",
    "WeightBroadcaster",
    "WeightLayout",
    "layout_of",
    "pack",
    "unpack",
]
