"""The local stack as a session fixture: one moto server + stack + servers for all stack tests."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from local_stack import LocalStack, LocalStackConfig
from local_stack.fal_server import FalBehaviour, FalServer
from local_stack.media import synth_image, synth_mp4
from tests.notification_schema import problems as notification_problems

# Small limits so the oversize cases stay small; a short visibility timeout so redeliveries
# (missing media) take seconds, not the template's 6 minutes.
STACK_PARAMETERS = {"MaxSidecarBytes": "65536", "MaxDataUriBytes": "65536"}
VISIBILITY_TIMEOUT_S = 5
# "tiny" runs the real VAP code path with random weights; "fake" skips the model (load tests).
GPU_ENGINE = os.environ.get("VAP_LOCAL_GPU_ENGINE", "tiny")
# What makes the stack as hard as AWS is on (LocalStackConfig's defaults). To watch the tests that
# guard a behaviour fail, switch it off: VAP_LOCAL_LAMBDA_ISOLATION=thread (no process per execution
# environment, no kill at the timeout), VAP_LOCAL_IAM=0 (no authorization), VAP_LOCAL_DUPLICATE_RATE=0
# (exactly-once delivery), VAP_LOCAL_GPU_FAULTS=0 (a GPU server that never fails or preempts).
LAMBDA_ISOLATION = os.environ.get("VAP_LOCAL_LAMBDA_ISOLATION", "process")
IAM = os.environ.get("VAP_LOCAL_IAM", "1") != "0"
DUPLICATE_RATE = float(os.environ.get("VAP_LOCAL_DUPLICATE_RATE", LocalStackConfig.duplicate_rate))
# VAP_LOCAL_GPU_FAULTS=0: the local GPU server never answers 5xx and never preempts.
GPU_FAULTS = os.environ.get("VAP_LOCAL_GPU_FAULTS", "1") != "0"


@pytest.fixture(scope="session")
def stack() -> Iterator[LocalStack]:
    for noisy in ("botocore", "urllib3", "werkzeug", "moto"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    config = LocalStackConfig(
        parameters=dict(STACK_PARAMETERS),
        visibility_timeout_s=VISIBILITY_TIMEOUT_S,
        gpu_engine=GPU_ENGINE,
        lambda_isolation="thread" if LAMBDA_ISOLATION == "thread" else "process",
        iam=IAM,
        duplicate_rate=DUPLICATE_RATE,
        gpu_error_rate=LocalStackConfig.gpu_error_rate if GPU_FAULTS else 0.0,
        gpu_preempt_rate=LocalStackConfig.gpu_preempt_rate if GPU_FAULTS else 0.0,
    )
    local = LocalStack(config)
    _OPEN.append(local)
    local.__enter__()
    yield local
    _close_stacks()


# The stack sets process-wide environment (AWS_ENDPOINT_URL, BUCKET_NAME, ...) for the handlers:
# stop it right after the last test here, so tests collected after this folder see a clean env.
_OPEN: list[LocalStack] = []


def _close_stacks() -> None:
    while _OPEN:
        _OPEN.pop().stop()


@pytest.hookimpl(trylast=True)  # after the test's own fixtures are torn down
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    if nextitem is None or Path(nextitem.path).parent != Path(__file__).parent:
        _close_stacks()


@pytest.fixture(autouse=True)
def _notifications_match_the_schema() -> Iterator[None]:
    """Every notification a stack test receives is checked against docs/notification.schema.json
    (body, Subject, message attributes) after the test."""
    yield
    for local in _OPEN:
        reader = local.notifications
        if reader is None:
            continue
        start = _CHECKED.get(id(reader), 0)
        received = reader.matching(lambda n: True)
        _CHECKED[id(reader)] = len(received)
        for note in received[start:]:
            found = notification_problems(note.body, note.subject, note.attributes)
            assert not found, f"notification {note.body.get('job_id')} breaks the schema: {found}"


_CHECKED: dict[int, int] = {}


@pytest.fixture(autouse=True)
def _functions_have_the_permissions_they_use() -> Iterator[None]:
    """No call a template function makes is refused by IAM during a stack test (each refusal is a
    permission its policy in template.yaml lacks; tests of denials use the probe function)."""
    start = {id(local): len(local.denied) for local in _OPEN}
    yield
    for local in _OPEN:
        refused = local.denials_of_functions(start.get(id(local), 0))
        assert not refused, f"IAM refused calls of the functions (missing in template.yaml?): {refused}"


@pytest.fixture(scope="session")
def sample_media() -> dict[str, bytes]:
    """A tiny reference clip and target image, made with ffmpeg (nothing downloaded)."""
    return {
        "clip.mp4": synth_mp4(width=160, height=288, frames=17),
        "image.png": synth_image(width=160, height=288),
    }


@pytest.fixture
def folder() -> str:
    """A fresh inbox folder per test, so tests sharing the stack never see each other's jobs."""
    return f"inbox/t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def fal(stack: LocalStack) -> Iterator[FalServer]:
    """The local fal server; a test may change `fal.behaviour` (faults), restored afterwards."""
    server = stack.fal
    assert server is not None
    yield server
    server.behaviour = FalBehaviour()
