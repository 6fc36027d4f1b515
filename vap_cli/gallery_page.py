"""`vap gallery`, rendering: one self-contained HTML page, one card per job, runs of one sidecar
name grouped together. Every value from a job is escaped; the only URLs are the media links."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from html import escape
from urllib.parse import urlsplit

from .costs import format_usd
from .gallery_jobs import SETTING_ORDER, GalleryJob, MediaSource
from .gallery_media import Link
from .gallery_template import CONTROLS, CSP, FOOTER, SCRIPT, STYLE


@dataclass(frozen=True)
class PageInfo:
    stack: str  # StackInfo.describe()
    generated_at: datetime
    filters: str  # the selection, in words
    links_expire_at: datetime | None  # None: media saved beside the page


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _when(moment: datetime | None) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC" if moment else "-"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 120:
        return f"{value:.1f} s"
    return f"{int(value // 60)} min {int(value % 60):02d} s"


def _number(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def _figure(caption: str, body: str) -> str:
    return f"<figure><figcaption>{_e(caption)}</figcaption>{body}</figure>"


def _slot(text: str, css: str = "slot") -> str:
    return f'<div class="{css}"><p>{_e(text)}</p></div>'


def _medium(
    job: GalleryJob,
    slot: str,
    caption: str,
    links: Mapping[MediaSource, Link],
    video: bool,
    missing: str,
) -> str:
    source = job.media.get(slot)
    if source is None:
        return _figure(caption, _slot(missing))
    link = links.get(source, Link(None, f"{source.ref} was not linked"))
    if link.href is None:
        return _figure(caption, _slot(link.problem or f"{source.ref} is not available"))
    note = f'<p class="note">{_e(link.problem)}</p>' if link.problem else ""
    if not video:
        alt = f"{caption} of job {job.job_id}"
        return _figure(caption, f'<img src="{_e(link.href)}" alt="{_e(alt)}" loading="lazy">{note}')
    poster = ""
    poster_source = job.media.get("poster") if slot == "output" else None
    if poster_source is not None and links.get(poster_source, Link(None)).href:
        poster = f' poster="{_e(links[poster_source].href)}"'
    flags = "muted loop playsinline controls"
    return _figure(caption, f'<video src="{_e(link.href)}"{poster} {flags} preload="metadata"></video>{note}')


def _outcome(job: GalleryJob, links: Mapping[MediaSource, Link]) -> str:
    """The generated video, or why there is none."""
    if job.state == "succeeded":
        return _medium(job, "output", "generated video", links, True, "The result has no video key.")
    if job.errors:
        items = "".join(f"<li>{_e(m)}</li>" for m in job.errors)
        title = "cancelled" if job.state == "cancelled" else "failed"
        errors = f'<div class="slot errors"><p>Job {title}:</p><ul>{items}</ul></div>'
        return _figure("generated video", errors)
    progress = job.status.get("progress") or {}
    where = str(job.status.get("phase") or job.state)
    if where == "running" and progress.get("total"):
        where = f"running, step {progress.get('step', 0)} of {progress['total']}"
    return _figure("generated video", _slot(f"Not finished yet: {where}."))


def _setting(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _fact(label: str, value: str) -> str:
    return f"<div><dt>{_e(label)}</dt><dd>{value}</dd></div>"


def _facts(job: GalleryJob, job_ids: set[str]) -> str:
    status, settings = job.status, job.settings
    facts = [_fact(n.replace("_", " "), _e(_setting(settings[n]))) for n in SETTING_ORDER if n in settings]
    backend = str(status.get("backend") or ("none (result reused)" if status.get("reused_from") else "-"))
    if status.get("fallback_from"):
        backend += f" (fell back from {status['fallback_from']})"
    facts.append(_fact("backend", _e(backend)))
    gpus = str(status.get("gpus") or "-")
    if job.device:
        gpus += f" × {job.device}"
    facts.append(_fact("GPUs", _e(gpus)))
    facts.append(_fact("took", _e(_seconds(job.duration_s))))
    generation = (status.get("timings") or {}).get("generation_s")
    if isinstance(generation, int | float):
        facts.append(_fact("generating", _e(_seconds(float(generation)))))
    facts.append(_fact("estimated cost", _e(format_usd(job.cost))))
    reused = status.get("reused_from")
    if reused:
        target = f'<a href="#job-{_e(reused)}">{_e(reused)}</a>' if reused in job_ids else _e(reused)
        facts.append(_fact("result reused from job", target))
    return f'<dl class="facts">{"".join(facts)}</dl>'


def _search_text(job: GalleryJob) -> str:
    words = [
        job.name,
        job.job_id,
        job.state,
        str(job.status.get("backend") or ""),
        str(job.settings.get("prompt") or ""),
        str(job.settings.get("video_description") or ""),
        f"seed {job.settings.get('seed')}" if job.settings.get("seed") is not None else "",
        str(job.status.get("reused_from") or ""),
        *job.errors,
    ]
    return " ".join(w for w in words if w).lower()


def card(job: GalleryJob, links: Mapping[MediaSource, Link], job_ids: set[str]) -> str:
    uploaded = job.uploaded_at
    attrs = {
        "id": f"job-{job.job_id}",
        "class": f"card state-{job.state or 'unknown'}",
        "data-time": _number(uploaded.timestamp() if uploaded else None),
        "data-name": job.name,
        "data-duration": _number(job.duration_s),
        "data-cost": _number(job.cost_total),
        "data-state": job.state,
        "data-search": _search_text(job),
    }
    head = (
        f'<header class="card-head"><span class="badge">{_e(job.state or "?")}</span>'
        f"<code>{_e(job.job_id)}</code><time>{_e(_when(uploaded))}</time></header>"
    )
    no_inputs = (
        "Not recorded: the job ended before its inputs were checked."
        if job.state in ("failed", "cancelled")
        else "Not recorded yet."
    )
    media = (
        '<div class="media">'
        + _medium(job, "reference", "reference video", links, True, no_inputs)
        + _medium(job, "target", "target image", links, False, no_inputs)
        + _outcome(job, links)
        + "</div>"
    )
    text = "".join(
        f"<dt>{label}</dt><dd>{_e(job.settings[key])}</dd>"
        for key, label in (("prompt", "prompt"), ("video_description", "video description"))
        if job.settings.get(key)
    )
    body = f'<dl class="text">{text}</dl>' if text else ""
    attributes = " ".join(f'{k}="{_e(v)}"' for k, v in attrs.items())
    return f"<article {attributes}>{head}{media}{body}{_facts(job, job_ids)}</article>"


def groups(jobs: list[GalleryJob]) -> dict[str, list[GalleryJob]]:
    """Runs of one sidecar name together, in the order of their newest run."""
    grouped: dict[str, list[GalleryJob]] = {}
    for job in jobs:
        grouped.setdefault(job.name, []).append(job)
    return grouped


def _media_sources(links: Mapping[MediaSource, Link]) -> str:
    """The CSP's media sources: the origins of the links (plus files beside the page)."""
    origins = {"'self'"}
    for link in links.values():
        if link.href and "://" in link.href:
            parts = urlsplit(link.href)
            origins.add(f"{parts.scheme}://{parts.netloc}")
        elif link.href:
            origins.add("file:")
    return " ".join(sorted(origins))


def render(jobs: list[GalleryJob], links: Mapping[MediaSource, Link], info: PageInfo) -> str:
    job_ids = {job.job_id for job in jobs}
    sections = []
    for name, runs in groups(jobs).items():
        count = f"{len(runs)} run" + ("s" if len(runs) != 1 else "")
        cards = "".join(card(job, links, job_ids) for job in runs)
        sections.append(
            f'<section class="group" data-name="{_e(name)}"><h2>{_e(name or "(no name)")} '
            f'<span class="runs">{count}</span></h2><div class="cards">{cards}</div></section>'
        )
    expires = _when(info.links_expire_at) if info.links_expire_at else ""
    expires_ms = int(info.links_expire_at.timestamp() * 1000) if info.links_expire_at else ""
    where = (
        f"links valid until {_e(expires)}"
        if info.links_expire_at
        else "media saved beside this page (the folder can be zipped and shared)"
    )
    empty = "" if jobs else "<p>No jobs match.</p>"
    csp = CSP.format(media=_media_sources(links))
    title = f"VAP gallery: {len(jobs)} job" + ("s" if len(jobs) != 1 else "")
    return (
        "<!doctype html>\n"
        f'<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_e(csp)}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{STYLE}</style></head>\n"
        f'<body data-expires="{_e(expires)}" data-expires-ms="{expires_ms}"><header><h1>{_e(title)}</h1>'
        f'<p class="meta">{_e(info.stack)} · {_e(info.filters)} · written {_e(_when(info.generated_at))} · '
        f"{where}</p>"
        f"{CONTROLS}</header>\n"
        f'<main id="groups">{empty}{"".join(sections)}</main>\n'
        f"{FOOTER}<script>{SCRIPT}</script></body></html>\n"
    )
