"""The local stack's choice of which deliveries come twice: the configured rate, the same choices
for the same seed and messages whatever the order, other choices for another seed."""

from __future__ import annotations

import pytest

from local_stack.at_least_once import AtLeastOnce

IDS = [f"message-{i}" for i in range(20_000)]


def _chosen(duplicates: AtLeastOnce, ids: list[str]) -> set[str]:
    return {i for i in ids if duplicates.chosen("sqs", i)}


def test_the_rate_is_the_share_of_messages_delivered_twice() -> None:
    duplicates = AtLeastOnce(rate=0.05, seed=1)
    share = len(_chosen(duplicates, IDS)) / len(IDS)
    assert 0.045 < share < 0.055
    assert duplicates.decisions["sqs"] == len(IDS)
    assert duplicates.duplicated["sqs"] == round(share * len(IDS))


def test_a_seed_replays_the_same_choices_in_any_order_and_another_seed_does_not() -> None:
    first = _chosen(AtLeastOnce(rate=0.05, seed=1), IDS)
    assert _chosen(AtLeastOnce(rate=0.05, seed=1), list(reversed(IDS))) == first
    assert _chosen(AtLeastOnce(rate=0.05, seed=2), IDS) != first


def test_no_duplicates_at_rate_zero_every_one_at_rate_one_and_forcing_is_scoped() -> None:
    duplicates = AtLeastOnce(rate=0.0)
    assert not _chosen(duplicates, IDS[:100])
    with duplicates.forcing("sqs"):
        assert len(_chosen(duplicates, IDS[:100])) == 100
        assert not any(duplicates.chosen("sns", i) for i in IDS[:100])
    assert not _chosen(duplicates, IDS[:100])
    with pytest.raises(ValueError, match="within"):
        AtLeastOnce(rate=1.5)
