"""The prompt sampler is deterministic, wraps epochs, and never loses or repeats a prompt across a restart."""

from __future__ import annotations

import pytest

from raylign.driver.sampler import PromptSampler, parse_uid


def test_epochs_cover_every_row_once_and_reshuffle():
    s = PromptSampler(num_rows=10, seed=3)
    first = [s.take()[1] for _ in range(10)]
    second = [s.take()[1] for _ in range(10)]
    assert sorted(first) == sorted(second) == list(range(10))
    assert first != second
    assert PromptSampler(num_rows=10, seed=3).take() == ("e0/r%d" % first[0], first[0])


def test_restore_hands_pending_out_first_and_exactly_once():
    s = PromptSampler(num_rows=7, seed=1)
    taken = [s.take()[0] for _ in range(5)]
    for uid in taken[:3]:
        s.done(uid)
    state = s.state_dict()

    r = PromptSampler(num_rows=7, seed=1)
    r.load_state_dict(state)
    again = [r.take()[0] for _ in range(2)]
    assert again == taken[3:]  # in flight at checkpoint time -> first after resume
    rest = [r.take()[0] for _ in range(2)]
    uninterrupted = PromptSampler(num_rows=7, seed=1)
    expected = [uninterrupted.take()[0] for _ in range(7)]
    assert taken + rest == expected
    assert r.trained == 3


def test_double_report_is_an_error():
    s = PromptSampler(num_rows=2)
    uid, _ = s.take()
    s.done(uid, trained=False)
    assert s.filtered == 1
    with pytest.raises(RuntimeError, match="exactly-once"):
        s.done(uid)
    assert parse_uid("e2/r11") == (2, 11)


def test_empty_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="empty"):
        PromptSampler(num_rows=0)
