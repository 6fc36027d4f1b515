"""The scheduled sweeper: what settles jobs whose callback, webhook or ingest never finished.

One class per job, and one function that runs them (the handler calls `sweep`):

- `deadline.DeadlineSweep`: dispatched/running jobs with no result after a while are settled with
  their backend (stored as the webhook would, fallen back once, or failed with a clear reason);
- `dead_letters.DeadLetterDrain`: sidecars whose ingest crashed on every delivery end failed;
- `catch_up.NotificationCatchUp`: finished jobs whose notification a crash skipped are notified.

Every step goes through `lifecycle`, so a sweeper racing a late webhook still ends in one terminal
state and one notification.
"""

from .catch_up import NotificationCatchUp
from .dead_letters import DeadLetterDrain
from .deadline import DeadlineSweep, deadline_action
from .report import SweepReport
from .run import sweep

__all__ = [
    "DeadLetterDrain",
    "DeadlineSweep",
    "NotificationCatchUp",
    "SweepReport",
    "deadline_action",
    "sweep",
]
