"""`vap_shared.settings_parser`: every reader's default, and one error that names the variable, what it
allows and what it got."""

from __future__ import annotations

import pytest
from vap_shared.budget import local_time_scale
from vap_shared.config import Settings
from vap_shared.cost import Prices
from vap_shared.settings_parser import SettingsError, choice, flag, integer, names, number, require, text

from gpu.service.modal_settings import read_settings


def test_unset_or_blank_is_the_default() -> None:
    for env in ({}, {"X": "  "}):
        assert text(env, "X", "d") == "d" and integer(env, "X", 7) == 7 and number(env, "X", 0.5) == 0.5
        assert choice(env, "X", ("a", "b"), "b") == "b" and flag(env, "X") is False
    assert text({"X": " v "}, "X") == "v" and names(" A, ,b ", lower=True) == ("a", "b")


@pytest.mark.parametrize(
    ("read", "message"),
    [
        (lambda: integer({"N": "ten"}, "N", 1), "N must be a whole number of at least 1, got 'ten'"),
        (lambda: integer({"N": "0"}, "N", 1), "N must be a whole number of at least 1, got '0'"),
        (lambda: integer({"N": "9"}, "N", 1, 1, 8), "N must be a whole number from 1 to 8, got '9'"),
        (lambda: integer({"N": "3"}, "N", 1, allowed=(1, 2, 4)), "N must be one of 1, 2, 4, got '3'"),
        (lambda: number({"P": "-1"}, "P", 0.0, low=0), "P must be a number of at least 0, got '-1'"),
        (lambda: number({"P": "inf"}, "P", 0.0, low=0), "P must be a number of at least 0, got 'inf'"),
        (
            lambda: number({"S": "0"}, "S", 1.0, above=0, high=1),
            "S must be a number greater than 0 and at most 1, got '0'",
        ),
        (lambda: choice({"B": "gpu"}, "B", ("auto", "fal"), "auto"), "B must be one of auto, fal, got 'gpu'"),
        (lambda: flag({"F": "yes"}, "F"), "F must be 0 or 1, got 'yes'"),
        (lambda: require({"A": "1", "B": " "}, ("A", "B", "C")), "missing environment variables: B, C"),
    ],
)
def test_a_malformed_setting_names_itself_and_what_it_allows(read: object, message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        read()  # type: ignore[operator]
    assert str(caught.value) == message


def test_choices_match_case_insensitively() -> None:
    assert choice({"B": " FAL "}, "B", ("auto", "fal"), "auto") == "fal"
    assert integer({"N": " 4 "}, "N", 1, allowed=(1, 2, 4)) == 4


def test_every_settings_reader_raises_the_one_error() -> None:
    base = {"BUCKET_NAME": "b", "JOBS_TABLE": "t", "TOPIC_ARN": "a"}
    readers = [
        lambda: Settings.from_env({**base, "MAX_GPUS": "3"}),
        lambda: Settings.from_env({**base, "JOB_BUDGET_SECONDS": "60"}),
        lambda: Prices.from_env({"MODAL_PRICE_PER_SECOND_H100": "free"}),
        lambda: local_time_scale({"VAP_LOCAL_TIME_SCALE": "fast"}),
        lambda: read_settings({"VAP_MODAL_MIN_CONTAINERS": "-1"}),
    ]
    names_seen = ["MAX_GPUS", "JOB_BUDGET_SECONDS", "MODAL_PRICE_PER_SECOND_H100", "VAP_LOCAL_TIME_SCALE"]
    for read, name in zip(readers, [*names_seen, "VAP_MODAL_MIN_CONTAINERS"], strict=True):
        with pytest.raises(SettingsError, match=f"^{name} must be "):
            read()
