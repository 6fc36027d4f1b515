"""The sidecar's service fields `gpus` and `reuse`: validated by hand, capped by the stack, carried to
the GPU request and the job, never sent to fal; and `vap submit --gpus N --no-reuse`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ops_flow import gpu_succeeds, submit
from vap_shared.config import Settings
from vap_shared.contract import GPU_COUNTS
from vap_shared.settings_parser import SettingsError
from vap_shared.sidecar import SidecarInvalid, validate_object
from vap_testkit import FakeServices, Stack, handlers_on, stack

from vap_cli.__main__ import build_parser
from vap_cli.commands import PREVIEW_FILES, download
from vap_cli.submission import SETTING_FIELDS, coerce_row, from_files

BASE: dict[str, Any] = {
    "prompt": "p",
    "video_description": "d",
    "video_url": "clip.mp4",
    "image_url": "face.png",
}
ENV = {"BUCKET_NAME": "b", "JOBS_TABLE": "t", "TOPIC_ARN": "arn:aws:sns:us-east-1:1:t"}


def _messages(fields: dict[str, Any]) -> list[str]:
    with pytest.raises(SidecarInvalid) as caught:
        validate_object({**BASE, **fields})
    return [e["message"] for e in caught.value.errors]


@pytest.mark.parametrize("value", [*GPU_COUNTS, None])
def test_gpus_takes_the_counts_a_job_can_be_split_over(value: int | None) -> None:
    assert validate_object({**BASE, "gpus": value}).gpus == value


@pytest.mark.parametrize("value", [3, 0, 16, "4", 4.0, True])
def test_other_gpu_counts_are_refused_in_plain_words(value: Any) -> None:
    (message,) = _messages({"gpus": value})
    assert message.startswith("`gpus` must be one of 1, 2, 4, 8 (or null for the stack's default); got ")


def test_reuse_is_a_boolean_like_enable_safety_checker() -> None:
    assert validate_object({**BASE, "reuse": False}).reuse is False
    assert validate_object({**BASE, "reuse": None}).reuse is None
    assert _messages({"reuse": "no"}) == ['`reuse` must be true or false; got the text "no".']
    assert _messages({"reuse": 0}) == ["`reuse` must be true or false; got the integer 0."]


def test_service_fields_are_not_generation_settings() -> None:
    sidecar = validate_object({**BASE, "gpus": 8, "reuse": False, "backend": "fal"})
    settings = sidecar.settings().model_dump()
    assert not {"gpus", "reuse", "backend"} & set(settings)


def test_stack_gpu_settings() -> None:
    assert (Settings.from_env(ENV).default_gpus, Settings.from_env(ENV).max_gpus) == (1, 8)
    capped = Settings.from_env({**ENV, "DEFAULT_GPUS": "8", "MAX_GPUS": "2"})
    assert capped.gpus_by_default == 2
    with pytest.raises(SettingsError, match="MAX_GPUS must be one of 1, 2, 4, 8, got '3'"):
        Settings.from_env({**ENV, "MAX_GPUS": "3"})


@pytest.fixture
def st(monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    with stack(monkeypatch, FakeServices(), DEFAULT_GPUS="2", MAX_GPUS="4") as s, handlers_on(s):
        yield s


def _modal_request(st: Stack) -> dict[str, Any]:
    return dict(json.loads(st.services.calls("modal.test")[-1].content))


def test_gpus_reach_the_gpu_request_the_job_and_metadata(st: Stack) -> None:
    job_id = submit(st, "a/horse", gpus=4)
    assert _modal_request(st)["gpus"] == 4 and st.store.get(job_id).gpus == 4
    gpu_succeeds(st, job_id)
    assert st.get_json(st.store.get(job_id).metadata_key)["gpus"] == 4


def test_a_sidecar_without_gpus_gets_the_stack_default(st: Stack) -> None:
    job_id = submit(st, "a/horse")
    assert _modal_request(st)["gpus"] == 2 and st.store.get(job_id).gpus == 2


def test_more_gpus_than_the_stack_allows_fail_naming_the_cap(st: Stack) -> None:
    job_id = submit(st, "a/horse", gpus=8)
    job = st.store.get(job_id)
    assert job.state == "failed" and st.services.calls("modal.test") == []
    (error,) = job.errors
    assert error["field"] == "gpus"
    assert error["message"] == (
        "`gpus` is 8, but this stack runs a job on at most 4 GPUs (its MaxGpus setting); use 4 or fewer."
    )


def test_gpus_and_reuse_are_never_sent_to_fal(st: Stack) -> None:
    job_id = submit(st, "a/horse", backend="fal", gpus=4, reuse=False)
    (request,) = [r for r in st.services.calls("queue.fal.test") if r.method == "POST"]
    sent = json.loads(request.content)
    assert not {"gpus", "reuse", "backend"} & set(sent) and sent["prompt"]
    assert st.store.get(job_id).gpus == 4  # recorded, in case it falls back to Modal


# ---------------------------------------------------------------------------------------------- vap


def test_vap_submit_flags_become_sidecar_fields(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        ["submit", "v.mp4", "i.png", "--prompt", "p", "--gpus", "4", "--no-reuse", "--seed", "3"]
    )
    assert {"reuse", "gpus"} <= set(SETTING_FIELDS)
    (tmp_path / "v.mp4").write_bytes(b"x")
    (tmp_path / "i.png").write_bytes(b"x")
    settings = {f: getattr(args, f) for f in SETTING_FIELDS}
    sub = from_files(str(tmp_path / "v.mp4"), str(tmp_path / "i.png"), "p", "d", settings, None)
    assert sub.sidecar["gpus"] == 4 and sub.sidecar["reuse"] is False and sub.sidecar["seed"] == 3
    # Without the flags the sidecar leaves both to the stack's defaults.
    plain = build_parser().parse_args(["submit", "v.mp4", "i.png"])
    assert plain.reuse is None and plain.gpus is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["submit", "v.mp4", "i.png", "--gpus", "3"])


def test_manifest_cells_for_the_service_fields() -> None:
    assert coerce_row({"gpus": "8", "reuse": "false"}) == {"gpus": 8, "reuse": False}


class _S3:
    def __init__(self) -> None:
        self.saved: dict[str, str] = {}

    def download_file(self, bucket: str, key: str, path: str) -> None:
        self.saved[key] = path
        Path(path).write_bytes(key.encode())


class _Stack:
    bucket = "b"

    def __init__(self) -> None:
        self.s3 = _S3()

    def client(self, service: str) -> _S3:
        return self.s3


def test_vap_get_saves_the_previews_next_to_the_video(tmp_path: Path) -> None:
    prefix = "outputs/a/horse/20261125T182301Z-3f9c0a1b2d/"
    status = {
        "job_id": "20261125T182301Z-3f9c0a1b2d",
        "name": "a/horse",
        "output_key": prefix + "video.mp4",
        "metadata_key": prefix + "metadata.json",
        "poster_key": prefix + "poster.jpg",
        "preview_key": prefix + "preview.webp",
    }
    fake = _Stack()
    target = download(fake, status, tmp_path)  # type: ignore[arg-type]
    stem = "horse-20261125T182301Z-3f9c0a1b2d"
    assert target == tmp_path / f"{stem}.mp4"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{stem}.mp4", f"{stem}.metadata.json", f"{stem}.poster.jpg", f"{stem}.preview.webp"]
    )
    assert (tmp_path / f"{stem}.poster.jpg").read_bytes() == (prefix + "poster.jpg").encode()
    # A job without previews (fal) saves just the video and metadata.
    fake = _Stack()
    download(fake, {k: v for k, v in status.items() if k not in dict(PREVIEW_FILES)}, tmp_path / "f")  # type: ignore[arg-type]
    assert len(fake.s3.saved) == 2
