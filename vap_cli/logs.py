"""`vap logs [FUNCTION]`: the names of the stack's log groups, read from its outputs.

CloudFormation names each function's log group (`<stack>-IngestLogGroup-<random>`), so no name can
be guessed; the stack outputs one `<Function>LogGroupName` per function. With a FUNCTION the name
alone is printed, for `aws logs tail "$(vap logs ingest --stack vap)" --since 1h`.
"""

from __future__ import annotations

import argparse

from .config import StackInfo, discover
from .errors import EXIT_INVALID, CliError

OUTPUT_SUFFIX = "LogGroupName"


def log_groups(outputs: dict[str, str]) -> dict[str, str]:
    """Function ("ingest", "webhook", …) -> its log group, from every output ending in LogGroupName."""
    return {
        key.removesuffix(OUTPUT_SUFFIX).lower(): value
        for key, value in sorted(outputs.items())
        if key.endswith(OUTPUT_SUFFIX) and key != OUTPUT_SUFFIX and value
    }


def _groups(stack: StackInfo) -> dict[str, str]:
    if stack.kind == "local":
        raise CliError(
            "The local stack's functions log to the terminal running `make local` (it has no CloudWatch "
            "log groups); name a deployed stack with --stack NAME."
        )
    groups = log_groups(stack.outputs)
    if not groups:
        raise CliError(
            f"The stack {stack.name!r} outputs no log group names (*{OUTPUT_SUFFIX}); deploy the current "
            "template (`make deploy`) to add them."
        )
    return groups


def logs(args: argparse.Namespace) -> int:
    groups = _groups(discover(args.stack, args.profile, args.region, args.local_state))
    if args.function:
        wanted = args.function.lower().removesuffix("function")
        if wanted not in groups:
            raise CliError(
                f"The stack has no function {args.function!r}; it has: {', '.join(groups)}.", EXIT_INVALID
            )
        print(groups[wanted], flush=True)
        return 0
    width = max(len(name) for name in groups)
    for name, group in groups.items():
        print(f"{name.ljust(width)}  {group}", flush=True)
    return 0
