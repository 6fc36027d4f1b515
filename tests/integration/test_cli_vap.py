"""The `vap` command against the local stack, driven in-process through `main([...])`."""

from __future__ import annotations

import contextlib
import io
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from stack_helpers import DESCRIPTION, PROMPT, jobs_for, settle
from vap_shared.job_store import JobStore
from vap_shared.sidecar import SidecarInvalid, validate_object

from local_stack import LocalStack
from local_stack.fal_server import FalServer
from vap_cli.__main__ import main

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def state(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `make local` writes (.local/stack.json), for this stack."""
    path = tmp_path_factory.mktemp("vap") / "stack.json"
    path.write_text(json.dumps(stack.describe()), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def media(sample_media: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("media")
    paths = {}
    for name, data in sample_media.items():
        (folder / name).write_bytes(data)
        paths[name] = folder / name
    return paths


@pytest.fixture
def name() -> str:
    return f"cli-{uuid.uuid4().hex[:10]}/horse"


def vap(state: Path, *args: str) -> int:
    return main([*args, "--local-state", str(state)])


def submit_args(media: dict[str, Path], name: str, *extra: str) -> list[str]:
    return [
        "submit",
        str(media["clip.mp4"]),
        str(media["image.png"]),
        "--prompt",
        PROMPT,
        "--video-description",
        DESCRIPTION,
        "--num-frames",
        "9",
        "--seed",
        "7",
        "--no-reuse",  # the stack tests share media and seed; each of these jobs must run
        "--name",
        name,
        *extra,
    ]


def job_id_from(output: str) -> str:
    return next(line.split()[1] for line in output.splitlines() if line.startswith("job "))


@pytest.fixture(scope="module")
def finished(
    stack: LocalStack, state: Path, media: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
):
    """One job submitted with --wait on the GPU path (Modal API, local GPU server)."""
    out_dir = tmp_path_factory.mktemp("out")
    name = f"cli-{uuid.uuid4().hex[:10]}/horse"
    out, err = io.StringIO(), io.StringIO()
    args = submit_args(media, name, "--backend", "modal", "--wait", "--out", str(out_dir), "--poll", "0.1")
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = vap(state, *args)
    out, err = out.getvalue(), err.getvalue()
    return {"rc": rc, "out": out, "err": err, "name": name, "out_dir": out_dir}


def test_submit_wait_shows_progress_and_saves_the_mp4(finished: dict[str, Any]) -> None:
    assert finished["rc"] == 0, finished["out"] + finished["err"]
    out = finished["out"]
    job_id = job_id_from(out)
    assert f"outputs/{finished['name']}/{job_id}/" in out
    assert "running [" in out and "succeeded" in out, out
    mp4 = finished["out_dir"] / f"horse-{job_id}.mp4"
    assert f"saved {mp4}" in out
    assert mp4.read_bytes()[4:8] == b"ftyp"
    metadata = json.loads(mp4.with_suffix(".metadata.json").read_text())
    assert metadata["job_id"] == job_id and metadata["seed"] == 7


def test_status_by_job_and_by_name(stack: LocalStack, state: Path, finished, capsys) -> None:
    job_id = job_id_from(finished["out"])
    assert vap(state, "status", job_id) == 0
    out = capsys.readouterr().out
    assert f"job      {job_id}" in out and "state    succeeded" in out and "backend  modal" in out
    assert vap(state, "status", finished["name"], "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert status["job_id"] == job_id and status["state"] == "succeeded" and status["version"] == "1"
    assert status["output_key"] == f"outputs/{finished['name']}/{job_id}/video.mp4"
    # The status object agrees with the job table (operators' view).
    (item,) = jobs_for(stack, f"inbox/{finished['name']}.json")
    assert item["state"]["S"] == "succeeded"


def test_list_and_filter(state: Path, finished, capsys) -> None:
    job_id = job_id_from(finished["out"])
    assert vap(state, "list", "--limit", "500") == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["JOB", "STATE", "BACKEND", "COST", "NAME", "UPDATED"]
    assert any(line.startswith(job_id) and "succeeded" in line for line in out.splitlines())
    assert vap(state, "list", "--status", "failed,cancelled", "--limit", "500") == 0
    assert job_id not in capsys.readouterr().out


def test_get_downloads_the_result(state: Path, finished, tmp_path: Path, capsys) -> None:
    job_id = job_id_from(finished["out"])
    assert vap(state, "get", job_id, "--out", str(tmp_path)) == 0
    assert (tmp_path / f"horse-{job_id}.mp4").read_bytes()[4:8] == b"ftyp"
    assert (tmp_path / f"horse-{job_id}.metadata.json").exists()


def test_local_validation_errors_match_ingest_and_upload_nothing(
    stack: LocalStack, state: Path, media, name: str, capsys
) -> None:
    rc = vap(state, *submit_args(media, name, "--aspect-ratio", "4:3", "--fps", "0"))
    assert rc == 2
    err = capsys.readouterr().err
    bad = {
        "prompt": PROMPT,
        "video_description": DESCRIPTION,
        "video_url": "horse/clip.mp4",
        "image_url": "horse/image.png",
        "num_frames": 9,
        "seed": 7,
        "aspect_ratio": "4:3",
        "fps": 0,
    }
    with pytest.raises(SidecarInvalid) as expected:
        validate_object(bad)
    assert len(expected.value.errors) == 2
    for error in expected.value.errors:
        assert error["message"] in err
    assert "nothing was uploaded" in err
    listed = stack.s3.list_objects_v2(Bucket=stack.bucket, Prefix=f"inbox/{name.split('/')[0]}/")
    assert listed.get("KeyCount", 0) == 0


def test_missing_prompt_and_not_a_video(state: Path, media, name: str, tmp_path: Path, capsys) -> None:
    fake = tmp_path / "clip.mp4"
    fake.write_bytes(b"hello, this is not a video at all" * 4)
    rc = vap(state, "submit", str(fake), str(media["image.png"]), "--name", name)
    assert rc == 2
    err = capsys.readouterr().err
    assert "`prompt`" in err and "`video_description`" in err and "`video_url`" in err


def test_submit_sidecar_file_with_relative_media(
    stack: LocalStack, state: Path, media, tmp_path: Path, capsys
) -> None:
    folder = tmp_path / "job"
    folder.mkdir()
    (folder / "clip.mp4").write_bytes(media["clip.mp4"].read_bytes())
    (folder / "image.png").write_bytes(media["image.png"].read_bytes())
    sidecar = {
        "prompt": PROMPT,
        "video_description": DESCRIPTION,
        "video_url": "clip.mp4",
        "image_url": "image.png",
        "num_frames": 9,
        "backend": "fal",
    }
    (folder / "balloon.json").write_text(json.dumps(sidecar))
    name = f"cli-{uuid.uuid4().hex[:10]}/balloon"
    rc = vap(
        state,
        "submit",
        "--sidecar",
        str(folder / "balloon.json"),
        "--name",
        name,
        "--wait",
        "--out",
        str(tmp_path),
        "--poll",
        "0.2",
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    job_id = job_id_from(out)
    assert (tmp_path / f"balloon-{job_id}.mp4").exists()
    uploaded = json.loads(stack.s3.get_object(Bucket=stack.bucket, Key=f"inbox/{name}.json")["Body"].read())
    assert uploaded["video_url"] == "balloon/clip.mp4" and uploaded["backend"] == "fal"


def test_cancel_stops_the_backend_and_marks_the_job(
    stack: LocalStack, state: Path, media, name: str, fal: FalServer, capsys
) -> None:
    fal.behaviour.queue_s = 6.0  # fal removes only queued requests
    before = set(fal.requests)
    assert vap(state, *submit_args(media, name, "--backend", "fal")) == 0
    job_id = job_id_from(capsys.readouterr().out)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # until ingest recorded the dispatch
        assert vap(state, "status", job_id, "--json") == 0
        if json.loads(capsys.readouterr().out)["state"] == "dispatched":
            break
        time.sleep(0.2)
    assert vap(state, "cancel", job_id) == 0
    out = capsys.readouterr().out
    assert "cancelled" in out and "CANCELLATION_REQUESTED (removed from fal's queue)" in out
    (request,) = [r for key, r in fal.requests.items() if key not in before]
    assert request.cancelled
    assert vap(state, "status", job_id, "--json") == 1
    status = json.loads(capsys.readouterr().out)
    assert status["state"] == "cancelled" and status["errors"][0]["message"].startswith("Cancelled")
    # Settled: its terminal status is recorded as written, so the sweeper's catch-up skips it.
    store = JobStore(stack.client("dynamodb"), stack.jobs_table)
    assert store.get(job_id).status_written_at and job_id not in store.unsettled_terminal(1000)
    assert vap(state, "cancel", job_id) == 0  # idempotent
    assert "already cancelled" in capsys.readouterr().out
    settle(1.0)
    assert stack.notifications_for(f"inbox/{name}.json") == []


def test_batch_csv_with_summary_and_an_invalid_manifest(
    stack: LocalStack, state: Path, media, tmp_path: Path, capsys
) -> None:
    run = uuid.uuid4().hex[:8]
    manifest = tmp_path / f"b{run}.csv"
    rows = [
        "video,image,prompt,video_description,num_frames,backend,name",
        f"{media['clip.mp4']},{media['image.png']},{PROMPT},{DESCRIPTION},9,fal,b{run}/one",
        f"{media['clip.mp4']},{media['image.png']},{PROMPT},{DESCRIPTION},13,fal,b{run}/two",
    ]
    manifest.write_text("\n".join(rows) + "\n")
    assert vap(state, "batch", str(manifest), "--wait", "--poll", "0.2") == 0
    out = capsys.readouterr().out
    table = out[out.index("NAME") :].splitlines()
    assert table[0].split() == ["NAME", "JOB", "STATE", "RESULT"]
    assert [line.split()[2] for line in table[1:3]] == ["succeeded", "succeeded"]
    assert "2 job(s); 0 failed" in out

    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps(
            {
                "video": str(media["clip.mp4"]),
                "image": str(media["image.png"]),
                "prompt": PROMPT,
                "video_description": DESCRIPTION,
                "name": f"c{run}/ok",
            }
        )
        + "\n"
        + json.dumps(
            {
                "video": str(media["clip.mp4"]),
                "image": str(media["image.png"]),
                "prompt": PROMPT,
                "video_description": DESCRIPTION,
                "num_frame": 9,
                "name": f"c{run}/typo",
            }
        )
        + "\n"
    )
    assert vap(state, "batch", str(bad)) == 2
    err = capsys.readouterr().err
    assert "row 2:" in err and "num_frame" in err and "nothing was uploaded" in err
    assert stack.s3.list_objects_v2(Bucket=stack.bucket, Prefix=f"inbox/c{run}/").get("KeyCount", 0) == 0


def test_helpful_stack_errors(stack: LocalStack, state: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    assert main(["list", "--local-state", str(tmp_path / "nope.json")]) == 3
    assert "local stack is not running" in capsys.readouterr().err
    stale = tmp_path / "stale.json"
    stale.write_text(json.dumps({**json.loads(state.read_text()), "endpoint_url": "http://127.0.0.1:9"}))
    assert main(["list", "--local-state", str(stale)]) == 3
    assert "is stale" in capsys.readouterr().err
    # Deployed-stack discovery (CloudFormation outputs by stack name), here against the emulator.
    assert main(["list", "--stack", "no-such-stack", "--region", "us-east-1"]) == 3
    assert "was not found" in capsys.readouterr().err
    assert main(["list", "--stack", stack.config.stack_name, "--region", "us-east-1"]) == 0
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert main(["list", "--stack", "any", "--region", "us-east-1"]) == 3
    assert "No AWS credentials" in capsys.readouterr().err
