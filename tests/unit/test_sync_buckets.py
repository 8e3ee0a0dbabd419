"""Weight-sync wire format and process group, without Ray: packing, layouts, and gloo broadcast with failures."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from raylign.config import LoraConfig
from raylign.learner.model import add_lora
from raylign.learner.weights import iter_buckets
from raylign.models.loading import load_model, vision_module_prefixes
from raylign.sync.buckets import (
    ALIGN,
    WeightLayout,
    check_bucket,
    iter_bucket_views,
    layout_of,
    pack,
    spec_of,
    unpack,
)
from raylign.sync.collective import GroupSpec, WeightGroup, open_store, receive_buckets, send_buckets
from raylign.sync.transports import resolve_transport


def _mixed_bucket() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        ("a", torch.randn(3, 5, generator=g)),
        ("b", torch.randn(7, generator=g).to(torch.bfloat16)),
        ("c", torch.arange(5, dtype=torch.int64)),
        ("d", torch.tensor(2.5)),  # 0-dim
        ("e", torch.randn(4, 6, generator=g).t()),  # not contiguous
        ("f", torch.randn(3, generator=g).half()),
    ]


def test_pack_unpack_is_bitwise_and_aligned():
    bucket = _mixed_bucket()
    spec = spec_of(bucket)
    assert all(t.offset % ALIGN == 0 for t in spec.tensors)
    assert spec.nbytes % ALIGN == 0 and spec.nbytes >= sum(t.nbytes for t in spec.tensors)
    buffer = torch.full((spec.nbytes + 100,), 255, dtype=torch.uint8)
    flat = pack(bucket, spec, buffer)
    assert flat.numel() == spec.nbytes
    for copy in (False, True):
        out = unpack(flat, spec, copy=copy)
        assert [n for n, _ in out] == [n for n, _ in bucket]
        for (_, got), (_, want) in zip(out, bucket):
            assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
    views, copies = unpack(flat, spec), unpack(flat, spec, copy=True)
    flat.zero_()  # views follow the buffer, copies do not
    assert float(views[0][1].abs().sum()) == 0.0 and torch.equal(copies[0][1], bucket[0][1])


def test_a_bucket_that_differs_from_its_layout_is_refused():
    bucket = _mixed_bucket()
    spec = spec_of(bucket)
    check_bucket(bucket, spec)
    with pytest.raises(RuntimeError, match="b .*vs announced b"):
        check_bucket([bucket[0], ("b", bucket[1][1].float()), *bucket[2:]], spec)
    with pytest.raises(ValueError, match="uint8 buffer"):
        pack(bucket, spec, torch.empty(10, dtype=torch.uint8))


@pytest.fixture(scope="module")
def tiny_model(tiny_qwen_dir):
    return load_model(tiny_qwen_dir)


@pytest.mark.parametrize("case", ["all", "frozen_vision", "lora"])
def test_layout_matches_the_buckets_the_learner_yields(tiny_model, case):
    import copy

    model = copy.deepcopy(tiny_model)
    trainable_only = case != "all"
    if case == "frozen_vision":
        for name, p in model.named_parameters():
            if name.startswith(vision_module_prefixes(model)):
                p.requires_grad_(False)
    if case == "lora":
        model = add_lora(model, LoraConfig(r=4))
    bucket_mb = 0.05  # smaller than the embedding, which must then travel alone
    layout = layout_of(model, bucket_mb, trainable_only)
    actual = list(iter_buckets(model, bucket_mb, trainable_only))
    assert layout == tuple(spec_of(b) for b in actual)
    names = [t.name for b in layout for t in b.tensors]
    hf_names = dict(load_model_names(tiny_model))
    assert set(names) <= set(hf_names), "every name must be one the engine's loader knows"
    big = [b for b in layout if b.nbytes > bucket_mb * 2**20]
    assert big and all(len(b.tensors) == 1 for b in big)
    if case == "all":
        assert set(names) == set(hf_names)
    if case == "frozen_vision":
        assert not any(n.startswith(vision_module_prefixes(tiny_model)) for n in names)
    if case == "lora":  # only adapter-merged layers change; none is a lora_ name
        assert names and all("lora" not in n and n.endswith("proj.weight") for n in names)


@pytest.mark.parametrize("case", ["all", "lora"])
def test_views_of_an_unpartitioned_policy_equal_the_learners_buckets(tiny_model, case):
    import copy

    model = copy.deepcopy(tiny_model)
    if case == "lora":
        model = add_lora(model, LoraConfig(r=4))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p)  # a non-zero adapter, so merging changes the weights
    views = list(iter_bucket_views(model, 0.05, trainable_only=case == "lora"))
    copies = list(iter_buckets(model, 0.05, trainable_only=case == "lora"))
    assert [spec_of(b) for b in views] == [spec_of(b) for b in copies]
    for vb, cb in zip(views, copies):
        assert all(torch.equal(v, c) for (_, v), (_, c) in zip(vb, cb))
    if case == "all":  # plain weights are the model's own storage, not copies
        params = dict(model.named_parameters())
        assert all(t.data_ptr() == params[n].data_ptr() for b in views for n, t in b)


def load_model_names(model) -> list[tuple[str, tuple[int, ...]]]:
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def test_transport_choice_follows_placement():
    assert resolve_transport("auto", True, True) == "inprocess"
    assert resolve_transport("auto", False, False) == "collective"
    assert resolve_transport("auto", True, False) == "collective"
    assert resolve_transport("auto", False, True) == "object_store"
    with pytest.raises(ValueError, match="inprocess needs"):
        resolve_transport("inprocess", False, True)
    with pytest.raises(ValueError, match="collective needs rollout workers"):
        resolve_transport("collective", False, True)
    # rollout.colocate: the engines are inside the learner actors, so only an in-process load reaches them
    assert resolve_transport("auto", False, False, colocated=True) == "inprocess"
    assert resolve_transport("inprocess", False, False, colocated=True) == "inprocess"
    for kind in ("collective", "object_store"):
        with pytest.raises(ValueError, match="inside the learner actors"):
            resolve_transport(kind, False, False, colocated=True)


# ---- a real gloo group, its members in threads of this process


def _group(n: int, timeout_s: float) -> list[WeightGroup]:
    store = open_store(timeout_s)
    spec = GroupSpec("127.0.0.1", store.port, n, "gloo", timeout_s)
    groups: dict[int, WeightGroup] = {}

    def join(rank: int) -> None:
        groups[rank] = WeightGroup(spec, rank, store if rank == 0 else None, "127.0.0.1")

    threads = [threading.Thread(target=join, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [groups[r] for r in range(n)]


def _buckets(k: int) -> list[list[tuple[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(1)
    return [
        [(f"w{i}", torch.randn(300, 40, generator=g)), (f"b{i}", torch.randn(9, generator=g).bfloat16())]
        for i in range(k)
    ]


def _run(groups, buckets, layout, receiver_load):
    """Send from groups[0] to the rest; returns (send outcome, {rank: outcome}, buckets iterated, seconds)."""
    outcome: dict[int, object] = {}
    iterated = []

    def receive(rank: int) -> None:
        try:
            outcome[rank] = receive_buckets(groups[rank], layout, receiver_load(rank))
        except (RuntimeError, ValueError) as err:
            outcome[rank] = err

    def source():
        for b in buckets:
            iterated.append(b[0][0])
            yield b

    threads = [threading.Thread(target=receive, args=(r,)) for r in range(1, len(groups))]
    for t in threads:
        t.start()
    start = time.perf_counter()
    try:
        sent: object = send_buckets(source(), layout, groups[0])
    except RuntimeError as err:
        sent = err
    for t in threads:
        t.join()
    return sent, outcome, iterated, time.perf_counter() - start


def test_broadcast_delivers_every_bucket_bitwise():
    buckets = _buckets(6)
    layout = WeightLayout(tuple(spec_of(b) for b in buckets))
    groups = _group(3, 10.0)
    got: dict[int, list] = {1: [], 2: []}

    def load(rank):
        def fn(bucket):
            got[rank].extend((n, t.clone()) for n, t in bucket)
            return len(bucket)

        return fn

    sent, outcome, _, _ = _run(groups, buckets, layout, load)
    assert sent == layout.nbytes and outcome == {1: 12, 2: 12}
    flat = [pair for b in buckets for pair in b]
    for rank in (1, 2):
        assert [n for n, _ in got[rank]] == [n for n, _ in flat]
        assert all(torch.equal(a, b) and a.dtype == b.dtype for (_, a), (_, b) in zip(got[rank], flat))
    for g in groups:
        g.close()


def test_a_failing_receiver_fails_everyone_fast_and_the_sender_still_iterates():
    buckets = _buckets(8)
    layout = WeightLayout(tuple(spec_of(b) for b in buckets))
    groups = _group(3, 20.0)  # the op timeout: nobody may wait for it
    seen = {1: 0, 2: 0}

    def load(rank):
        def fn(bucket):
            if rank == 2 and seen[2] == 3:
                raise ValueError("engine refused bucket")
            seen[rank] += 1
            return len(bucket)

        return fn

    sent, outcome, iterated, seconds = _run(groups, buckets, layout, load)
    assert isinstance(sent, RuntimeError) and "weight sync send failed at bucket" in str(sent)
    assert isinstance(outcome[2], ValueError) and "engine refused" in str(outcome[2])
    assert isinstance(outcome[1], RuntimeError) and "rank 1" in str(outcome[1])
    assert len(iterated) == len(buckets)  # every bucket reached (ZeRO-3 gathers stay in step)
    assert seconds < 5.0, seconds
    assert not groups[0].alive and not groups[1].alive


def test_a_stalled_receiver_times_the_sender_out():
    buckets = _buckets(3)
    layout = WeightLayout(tuple(spec_of(b) for b in buckets))
    groups = _group(2, 1.0)
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="send failed at bucket 0"):
        send_buckets(iter(buckets), layout, groups[0])  # rank 1 never receives
    assert time.perf_counter() - start < 4.0
    groups[1].close()
