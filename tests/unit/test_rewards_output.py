"""Reward output is capped per call (first lines kept, the rest counted); reward.max_memory_mb caps a process."""

from __future__ import annotations

import pytest

from raylign.rewards.pool import RewardProcessPool

LOUD = '''
import os, sys

def loud(completions, **kwargs):
    for i in range(100_000):  # ~10 MB per call, as the issue measured
        print(f"line {i:06d} " + "x" * 90)
    sys.stderr.write("E" * 3_000_000)  # 3 MB on one line, no newline
    os.write(1, b"raw fd write\\n" * 1000)  # below Python: still capped
    return [1.0] * len(completions)

def quiet(completions, **kwargs):
    print("only line")
    return [0.5] * len(completions)

def hog(completions, **kwargs):
    block = bytearray(1024 * 2**20)  # 1 GiB
    return [float(len(block))] * len(completions)
'''


@pytest.fixture(scope="module")
def helpers(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("rewards") / "loud.py"
    path.write_text(LOUD)
    return str(path)


def test_output_is_capped_and_summarised_per_call(helpers, capfd):
    pool = RewardProcessPool([f"{helpers}:loud", f"{helpers}:quiet"], size=1, output_lines=5)
    try:
        pool.wait_ready()
        capfd.readouterr()
        first = pool.call(0, {"completions": ["a", "b"]}, 2, timeout_s=60)
        second = pool.call(1, {"completions": ["a"]}, 1, timeout_s=60)
        out, err = capfd.readouterr()
    finally:
        pool.close()
    assert first.status == "ok" and first.values == (1.0, 1.0) and second.values == (0.5,)
    lines = out.splitlines()
    assert lines[:5] == [f"line {i:06d} " + "x" * 90 for i in range(5)]
    assert lines[5] == (
        f"[reward {helpers}:loud: 100995 more line(s), 9.8 MiB of stdout not shown (reward.output_lines=5)]"
    )
    assert lines[6:] == ["only line"]  # the next call starts a fresh count
    assert len(out) < 1000 and len(err) < 20_000  # instead of 10 MB and 3 MB
    assert err.endswith(f"[reward {helpers}:loud: 1 more line(s), 2.8 MiB of stderr not shown (reward.output_lines=5)]\n")


def test_max_memory_mb_fails_the_call_not_the_run(helpers):
    pool = RewardProcessPool([f"{helpers}:hog", f"{helpers}:quiet"], size=1, max_memory_mb=512)
    try:
        hogged = pool.call(0, {"completions": ["a"]}, 1, timeout_s=60)
        after = pool.call(1, {"completions": ["a"]}, 1, timeout_s=60)
    finally:
        pool.close()
    assert hogged.status == "error" and hogged.message.startswith("MemoryError"), hogged
    assert after.status == "ok" and after.values == (0.5,) and pool.restarts == 0
