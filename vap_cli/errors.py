"""One exception type for everything the user can fix; `main` prints it without a traceback."""

from __future__ import annotations

# Exit codes: 0 done, 1 the job failed or was cancelled, 2 bad input (nothing uploaded), 3 stack/AWS.
EXIT_JOB_FAILED = 1
EXIT_INVALID = 2
EXIT_STACK = 3


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_STACK) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
