"""Build a sidecar from files/options, validate it like ingest does, upload media then sidecar."""

from __future__ import annotations

import contextlib
import json
import mimetypes
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vap_shared.errors import FieldError, field_error
from vap_shared.media import MediaRef, resolve_reference, sniff
from vap_shared.sidecar import SidecarInvalid, decode_json_object, validate_object

from .config import StackInfo
from .errors import EXIT_INVALID, CliError

MEDIA_FIELDS = ("video_url", "image_url")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")
# Options that map 1:1 onto sidecar fields (the sidecar's own names).
SETTING_FIELDS = (
    "seed",
    "num_frames",
    "fps",
    "aspect_ratio",
    "resolution",
    "guidance_scale",
    "backend",
    "reuse",
    "gpus",
)


@dataclass
class Submission:
    """One job: where its sidecar goes, the sidecar, and the local files to upload first."""

    name: str  # <dir>/<name>: the sidecar is inbox/<name>.json, results outputs/<name>/<job_id>/
    sidecar: dict[str, Any]
    uploads: list[tuple[Path, str]] = field(default_factory=list)  # (local file, key relative to inbox)

    def sidecar_key(self, stack: StackInfo) -> str:
        return f"{stack.inbox_prefix}{self.name}.json"

    def outputs_folder(self, stack: StackInfo) -> str:
        return f"{stack.outputs_prefix}{self.name}/"


class InvalidSubmission(CliError):
    def __init__(self, errors: list[FieldError], what: str = "The sidecar") -> None:
        lines = "\n".join(f"  - {e['message']}" for e in errors)
        super().__init__(f"{what} is not valid (nothing was uploaded):\n{lines}", EXIT_INVALID)
        self.errors = errors


def clean_name(raw: str) -> str:
    name = raw.strip().strip("/")
    name = name.removeprefix("inbox/").removesuffix(".json")
    if not _NAME.match(name) or ".." in name.split("/"):
        raise CliError(
            f"--name {raw!r} is not usable: letters, digits, '.', '_', '-' and '/' between folders.",
            EXIT_INVALID,
        )
    return name


def default_name(path_or_url: str) -> str:
    stem = Path(path_or_url.split("?", 1)[0]).stem or "job"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "job"


def is_url(value: str) -> bool:
    return bool(_SCHEME.match(value))


def attach_media(sub: Submission, field_name: str, value: str, base: Path | None = None) -> None:
    """A local file is uploaded to inbox/<name>/<file> and referenced relative to the sidecar;
    URLs (https, s3, data) and keys already in the bucket are passed through unchanged."""
    if is_url(value):
        sub.sidecar[field_name] = value
        return
    path = Path(value).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    if not path.is_file():
        if base is not None:  # a sidecar may name a key that is already in the bucket
            sub.sidecar[field_name] = value
            return
        raise CliError(f"{field_name.removesuffix('_url')} file {value!r} does not exist.", EXIT_INVALID)
    leaf = sub.name.rsplit("/", 1)[-1]
    sub.sidecar[field_name] = f"{leaf}/{path.name}"
    sub.uploads.append((path, f"{sub.name}/{path.name}"))


def from_files(
    video: str,
    image: str,
    prompt: str | None,
    description: str | None,
    settings: dict[str, Any],
    name: str | None,
) -> Submission:
    sub = Submission(name=clean_name(name) if name else default_name(image), sidecar={})
    if prompt is not None:
        sub.sidecar["prompt"] = prompt
    if description is not None:
        sub.sidecar["video_description"] = description
    attach_media(sub, "video_url", video)
    attach_media(sub, "image_url", image)
    sub.sidecar.update({k: v for k, v in settings.items() if v is not None})
    return sub


def from_sidecar_file(path: Path, name: str | None, max_bytes: int) -> Submission:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CliError(f"Cannot read {path}: {exc.strerror}", EXIT_INVALID) from None
    try:
        data = decode_json_object(raw, max_bytes)
    except SidecarInvalid as exc:
        raise InvalidSubmission(exc.errors, f"The sidecar {path}") from None
    sub = Submission(name=clean_name(name) if name else default_name(path.name), sidecar=dict(data))
    for field_name in MEDIA_FIELDS:
        value = data.get(field_name)
        if isinstance(value, str) and value.strip():
            attach_media(sub, field_name, value.strip(), base=path.parent)
    return sub


def validate(sub: Submission, stack: StackInfo) -> None:
    """Every problem at once, with ingest's own checks and messages (vap_shared.sidecar/media)."""
    raw = json.dumps(sub.sidecar).encode("utf-8")
    errors: list[FieldError] = []
    try:
        data = decode_json_object(raw, stack.max_sidecar_bytes)
    except SidecarInvalid as exc:
        raise InvalidSubmission(exc.errors) from None
    try:
        validate_object(data)
    except SidecarInvalid as exc:
        errors.extend(exc.errors)
    bad = {e["field"] for e in errors}
    uploads = {key: path for path, key in sub.uploads}
    key = sub.sidecar_key(stack)
    for field_name in MEDIA_FIELDS:
        value = data.get(field_name)
        if field_name in bad or not isinstance(value, str) or value.strip().lower().startswith("https:"):
            continue  # https hosts are checked by ingest against the stack's allow-list
        resolved = resolve_reference(
            field_name,
            value.strip(),
            sidecar_key=key,
            bucket=stack.bucket,
            allowed_hosts=(),
            max_data_bytes=1 << 62,  # the stack's cap is checked by ingest
            inbox_prefix=stack.inbox_prefix,
        )
        if not isinstance(resolved, MediaRef):
            errors.append(resolved)
            continue
        local = uploads.get((resolved.key or "").removeprefix(stack.inbox_prefix))
        if local is not None:
            with local.open("rb") as handle:
                head = handle.read(64)
            problem = sniff(field_name, head) if head else f"`{field_name}`: the file {local} is empty."
            if problem:
                errors.append(field_error(field_name, problem.replace("the file", f"the file {local}")))
    if errors:
        raise InvalidSubmission(errors)


def upload(sub: Submission, stack: StackInfo) -> str:
    """Media first, then the sidecar (whose upload starts the job); the sidecar's ETag."""
    s3 = stack.client("s3")
    for path, rel in sub.uploads:
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        s3.upload_file(
            str(path), stack.bucket, stack.inbox_prefix + rel, ExtraArgs={"ContentType": content_type}
        )
    body = json.dumps(sub.sidecar, indent=2).encode("utf-8")
    response = s3.put_object(
        Bucket=stack.bucket, Key=sub.sidecar_key(stack), Body=body, ContentType="application/json"
    )
    return str(response["ETag"]).strip('"')


def coerce_row(row: dict[str, Any]) -> dict[str, Any]:
    """CSV cells are strings: turn the numeric/boolean sidecar fields into their types (JSONL rows
    keep theirs). Empty cells are dropped."""
    ints = {"seed", "num_frames", "fps", "gpus"}
    booleans = {"enable_safety_checker", "reuse"}
    out: dict[str, Any] = {}
    for key, value in row.items():
        if key is None:
            continue
        key = key.strip()
        if isinstance(value, str):
            value = value.strip()
            if value == "":
                continue
            if key in ints and re.fullmatch(r"-?\d+", value):
                value = int(value)
            elif key == "guidance_scale":
                with contextlib.suppress(ValueError):
                    value = float(value)
            elif key in booleans and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                value = value.lower() in ("true", "1", "yes")
        out[key] = value
    return out


def from_row(row: dict[str, Any], base: Path, default: str) -> Submission:
    """A manifest row: `video`, `image` (paths relative to the manifest, or URLs), `name`
    (optional) and any sidecar field (prompt, video_description, seed, ...)."""
    row = coerce_row(row)
    video = row.pop("video", None) or row.pop("video_url", None)
    image = row.pop("image", None) or row.pop("image_url", None)
    name = row.pop("name", None)
    sub = Submission(name=clean_name(str(name)) if name else default, sidecar={})
    for field_name, value in (("video_url", video), ("image_url", image)):
        if isinstance(value, str) and value:
            path = Path(value).expanduser()
            if not is_url(value) and not path.is_absolute():
                value = str(base / path)
            attach_media(sub, field_name, value)
    sub.sidecar.update(row)  # unknown columns reach validation and are reported by name
    return sub
