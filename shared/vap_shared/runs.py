"""Which run of a job counts: the one whose result, failure or progress may change it."""

from __future__ import annotations

from .jobs import Job


def superseded(job: Job, backend: str, call_id: str, attempt: int | None = None) -> str | None:
    """Why a run (`call_id` on `backend`, GPU attempt `attempt`) no longer counts for `job` (None:
    it does): the job moved to another backend, another call is recorded, or a newer attempt of the
    call (a preempted GPU input run again) has been heard from."""
    if job.backend is not None and job.backend != backend:
        return f"the job has moved to {job.backend}"
    if job.backend_call_id and job.backend_call_id != call_id:
        return "another run of the job is recorded"
    if attempt is not None and job.gpu_attempt is not None and attempt < job.gpu_attempt:
        return f"attempt {attempt} of the call was superseded by attempt {job.gpu_attempt}"
    return None
