"""`make deploy`: the GPU side on Modal, then the AWS stack wired to it, in one command.

1. The budget/pool settings (vap_shared.budget) and every parameter override (against the template's
   own constraints, and whether `sam deploy` can pass it as written) are checked before anything is
   touched.
2. Weights: the Modal volume must hold what `download_weights` records (`--download-weights` fills it).
3. `modal deploy gpu/service/modal_app.py` with the budget and pool in its environment; its output names the
   endpoint URL.
4. The Lambda layer is built and checked for arm64/python3.13 (vap_cli.layer: no python3.13 or Docker
   needed), then `sam deploy` with ModalEndpointUrl and the same budget/pool as parameter overrides.
5. The stack's secrets still holding their placeholders are reported, with the command to set each.

    python -m vap_cli.deploy --stack vap [--region R] [--profile P] [--job-budget-s 9000]
        [--modal-containers 2] [--fal-max-outstanding 20] [--download-weights] [--parameter K=V ...]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import boto3
from botocore.exceptions import BotoCoreError, ClientError
from vap_shared.budget import (
    DEFAULT_BUDGET_S,
    DEFAULT_FAL_MAX_OUTSTANDING,
    DEFAULT_MODAL_CONTAINERS,
    Budget,
    BudgetError,
)

from local_stack.cfn import load_template
from vap_cli import layer
from vap_cli.runner import REPO_ROOT, Runner, SubprocessRunner

TEMPLATE = REPO_ROOT / "template.yaml"
MODAL_APP_FILE = "gpu/service/modal_app.py"
# Written by `download_weights` into the volume's root once the checkpoint is complete.
WEIGHTS_MARKER = "vap-revision.json"
PLACEHOLDER = "REPLACE_WITH_"
_MODAL_URL = re.compile(r"https://[A-Za-z0-9.-]+\.modal\.run\b")


class DeployError(RuntimeError):
    pass


@dataclass
class DeployOptions:
    stack: str
    region: str | None = None
    profile: str | None = None
    job_budget_s: int = DEFAULT_BUDGET_S
    modal_containers: int = DEFAULT_MODAL_CONTAINERS
    fal_max_outstanding: int = DEFAULT_FAL_MAX_OUTSTANDING
    modal_app: str = "vap-gpu"
    volume: str = "vap-weights"
    modal_url: str | None = None  # an app already deployed: skip the Modal steps
    download_weights: bool = False
    parameters: dict[str, str] = field(default_factory=dict)  # further overrides, e.g. DefaultBackend
    build_dir: Path = REPO_ROOT / ".aws-sam" / "vap"
    template: Path = TEMPLATE

    def budget(self) -> Budget:
        try:
            return Budget(self.job_budget_s, self.modal_containers, self.fal_max_outstanding)
        except BudgetError as exc:
            raise DeployError(f"Invalid settings, nothing was deployed: {exc}.") from None

    def modal_env(self) -> dict[str, str]:
        """What `modal deploy` reads at deploy time (gpu/service/modal_app.py) to size the pool and limits."""
        return {
            "VAP_JOB_BUDGET_S": str(self.job_budget_s),
            "VAP_MODAL_MAX_CONTAINERS": str(self.modal_containers),
            "VAP_MODAL_APP": self.modal_app,
            "VAP_MODAL_VOLUME": self.volume,
        }

    def overrides(self, modal_url: str) -> dict[str, str]:
        """Parameter overrides for `sam deploy`: the Modal side's URL and the same budget/pool."""
        return {
            **self.parameters,
            "ModalEndpointUrl": modal_url,
            "JobBudgetSeconds": str(self.job_budget_s),
            "ModalContainers": str(self.modal_containers),
            "FalMaxOutstanding": str(self.fal_max_outstanding),
        }


@dataclass
class SecretStatus:
    what: str
    arn: str
    state: str  # "set" | "placeholder" | "unreadable: ..."
    how: str  # the command that sets it


@dataclass
class DeployResult:
    modal_url: str
    outputs: dict[str, str]
    secrets: list[SecretStatus]


# ---------------------------------------------------------------------------------------------- Modal


def weights_check(modal: Runner, options: DeployOptions) -> tuple[bool, str]:
    """Whether the volume holds the weights, and what Modal said when it could not be listed (no
    such volume yet, or no Modal token on this machine: only Modal's words tell them apart)."""
    done = modal(["modal", "volume", "ls", options.volume, "/", "--json"])
    if done.returncode != 0:
        return False, done.output.strip()[-500:] or f"exit status {done.returncode}"
    start = done.output.find("[")
    try:
        entries = json.loads(done.output[start:]) if start >= 0 else []
    except ValueError:
        return False, ""
    return any(isinstance(e, dict) and e.get("filename") == WEIGHTS_MARKER for e in entries), ""


def modal_endpoint(output: str) -> str:
    """The web endpoint `modal deploy` printed (the app has one: `api`)."""
    urls = sorted(set(_MODAL_URL.findall(output)))
    if len(urls) != 1:
        found = ", ".join(urls) or "none"
        raise DeployError(
            f"`modal deploy` printed {len(urls)} web endpoint URLs ({found}); expected the app's one `api` "
            "endpoint. Pass it with --modal-url."
        )
    return urls[0]


def deploy_modal(modal: Runner, options: DeployOptions) -> str:
    env = options.modal_env()
    present, modal_said = weights_check(modal, options)
    if not present:
        if not options.download_weights:
            listing = (
                f"`modal volume ls {options.volume}` failed ({modal_said}); if Modal is not logged in on "
                "this machine, run `.venv/bin/modal token new` first. Otherwise the"
                if modal_said
                else "The"
            )
            raise DeployError(
                f"{listing} Modal volume {options.volume!r} has no weights ({WEIGHTS_MARKER} is missing). "
                "Fill it once (about 66 GB, up to an hour): `make deploy ... DOWNLOAD_WEIGHTS=1`, or "
                f"`modal run {MODAL_APP_FILE}::download_weights`. Nothing was deployed."
            )
        fill = modal(["modal", "run", f"{MODAL_APP_FILE}::download_weights"], env)
        if fill.returncode != 0 or not weights_check(modal, options)[0]:
            raise DeployError("Downloading the weights into the Modal volume failed (see the output above).")
    done = modal(["modal", "deploy", MODAL_APP_FILE], env)
    if done.returncode != 0:
        raise DeployError("`modal deploy` failed (see its output above); the AWS stack was not touched.")
    return modal_endpoint(done.output)


# ---------------------------------------------------------------------------------------------- AWS


def template_parameters(path: Path) -> set[str]:
    return set(load_template(path).get("Parameters", {}))


def _number(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def parameter_problem(name: str, spec: dict[str, Any], value: str) -> str | None:
    """What CloudFormation would refuse about `value` for the parameter `spec` (its type, bounds,
    allowed values and pattern), with the template's ConstraintDescription when it has one; checked
    before Modal or AWS is touched, so a typo costs nothing."""
    problem = None
    if spec.get("Type") == "Number":
        number = _number(value)
        if number is None:
            problem = f"{name} must be a number, got {value!r}"
        elif "MinValue" in spec and number < float(spec["MinValue"]):
            problem = f"{name}={value} is below its minimum {spec['MinValue']}"
        elif "MaxValue" in spec and number > float(spec["MaxValue"]):
            problem = f"{name}={value} is above its maximum {spec['MaxValue']}"
    elif "MinLength" in spec and len(value) < int(spec["MinLength"]):
        problem = f"{name} must be at least {spec['MinLength']} characters"
    elif "MaxLength" in spec and len(value) > int(spec["MaxLength"]):
        problem = f"{name} must be at most {spec['MaxLength']} characters"
    if problem is None and "AllowedValues" in spec:
        allowed = [str(v) for v in spec["AllowedValues"]]
        matches = value in allowed or (
            spec.get("Type") == "Number" and _number(value) in [_number(a) for a in allowed]
        )
        if not matches:
            problem = f"{name}={value!r} is not one of {', '.join(allowed)}"
    if problem is None and "AllowedPattern" in spec and not re.fullmatch(str(spec["AllowedPattern"]), value):
        problem = f"{name}={value!r} does not match {spec['AllowedPattern']}"
    if problem and spec.get("ConstraintDescription"):
        problem += f": {' '.join(str(spec['ConstraintDescription']).split())}"
    return problem


def check_overrides(path: Path, overrides: dict[str, str]) -> None:
    declared = load_template(path).get("Parameters", {})
    missing = sorted(set(overrides) - set(declared))
    if missing:
        raise DeployError(f"template.yaml has no parameter(s) {missing}; nothing was deployed.")
    problems = [
        p for name in sorted(overrides) if (p := parameter_problem(name, declared[name], overrides[name]))
    ]
    if problems:
        raise DeployError(
            "Invalid parameters, nothing was deployed:\n" + "\n".join(f"  {p}" for p in problems)
        )


# How `sam deploy --parameter-overrides` reads one argument (samcli.cli.types.CfnParameterOverridesType):
# `KEY=VALUE` with an unquoted VALUE ends at the first space and must not be empty, so each value is
# passed double-quoted with its `"` escaped. SAM then strips the quotes and turns `\"`, `\'` and `\ `
# into the bare character; it has no escape for a backslash itself, so a backslash right before a
# space, a quote or the end cannot be passed, nor a value that itself reads as `ParameterKey=...`
# (SAM's other form, which it looks for first).
_UNPASSABLE = re.compile(r"\\(?=[ \"']|\Z)|ParameterKey=")


def sam_override(key: str, value: str) -> str:
    """One `--parameter-overrides` argument that SAM reads back as exactly `key` = `value`."""
    if _UNPASSABLE.search(value):
        raise DeployError(
            f"{key}: sam deploy cannot pass this value as written (a backslash before a space, a quote or "
            f"the end, or the text 'ParameterKey='): {value!r}; nothing was deployed."
        )
    escaped = value.replace('"', '\\"')
    return f'{key}="{escaped}"'


def build_template(options: DeployOptions) -> Path:
    """The deploy template: template.yaml with the layer built by vap_cli.layer (checked) and the
    functions' folders as absolute paths, so `sam deploy` packages them without `sam build`."""
    out = options.build_dir
    if out.exists():
        shutil.rmtree(out)
    built = layer.build(out / "layer")
    report = layer.check(built)
    if not report.ok:
        raise DeployError("The Lambda layer failed its checks; nothing was deployed:\n" + report.text())
    template = load_template(options.template)
    for resource in template["Resources"].values():
        props = resource.get("Properties", {})
        if resource["Type"] == "AWS::Serverless::LayerVersion":
            props["ContentUri"] = str(built)
            resource.pop("Metadata", None)  # built already: no BuildMethod for sam
        elif isinstance(props.get("CodeUri"), str):
            props["CodeUri"] = str(REPO_ROOT / props["CodeUri"])
    path = out / "template.json"
    path.write_text(json.dumps(template, indent=1), encoding="utf-8")
    return path


def sam_deploy_command(options: DeployOptions, template: Path, modal_url: str) -> list[str]:
    overrides = [sam_override(k, v) for k, v in sorted(options.overrides(modal_url).items())]
    command = [
        "sam", "deploy", "--template-file", str(template), "--stack-name", options.stack,
        "--capabilities", "CAPABILITY_IAM", "CAPABILITY_AUTO_EXPAND", "--resolve-s3",
        "--no-confirm-changeset", "--no-fail-on-empty-changeset", "--parameter-overrides", *overrides,
    ]  # fmt: skip
    if options.region:
        command += ["--region", options.region]
    if options.profile:
        command += ["--profile", options.profile]
    return command


def session(options: DeployOptions) -> Any:
    return boto3.session.Session(profile_name=options.profile, region_name=options.region)


def stack_outputs(aws: Any, stack: str) -> dict[str, str]:
    (description,) = aws.client("cloudformation").describe_stacks(StackName=stack)["Stacks"]
    return {o["OutputKey"]: o.get("OutputValue", "") for o in description.get("Outputs", [])}


def secrets_report(aws: Any, outputs: dict[str, str]) -> list[SecretStatus]:
    """Which of the stack's secrets still hold the placeholders the template creates them with."""
    wanted = [
        ("fal key", "FalKeySecretArn", "'<FAL_KEY>'"),
        ("Modal proxy-auth token", "ModalTokenSecretArn", '\'{"key":"wk-…","secret":"ws-…"}\''),
    ]
    client = aws.client("secretsmanager")
    found: list[SecretStatus] = []
    for what, output, value in wanted:
        arn = outputs.get(output, "")
        how = f"aws secretsmanager put-secret-value --secret-id {arn} --secret-string {value}"
        try:
            secret = str(client.get_secret_value(SecretId=arn)["SecretString"])
            state = "placeholder" if PLACEHOLDER in secret else "set"
        except (ClientError, BotoCoreError) as exc:
            state = f"unreadable: {exc}"
        found.append(SecretStatus(what, arn, state, how))
    return found


# ---------------------------------------------------------------------------------------------- all


def deploy(options: DeployOptions, modal: Runner, sam: Runner, aws: Any, out: TextIO) -> DeployResult:
    options.budget()  # invalid settings fail before anything is touched
    planned = options.overrides(options.modal_url or "https://x.modal.run")
    check_overrides(options.template, planned)
    for key, value in planned.items():
        sam_override(key, value)
    if options.modal_url:
        modal_url = options.modal_url
        out.write(f"Modal: using {modal_url} (no Modal steps)\n")
    else:
        modal_url = deploy_modal(modal, options)
        out.write(f"Modal: {options.modal_app} deployed, endpoint {modal_url}\n")
    template = build_template(options)
    done = sam(sam_deploy_command(options, template, modal_url), {"SAM_CLI_TELEMETRY": "0"})
    if done.returncode != 0:
        raise DeployError("`sam deploy` failed (see its output above).")
    outputs = stack_outputs(aws, options.stack)
    return DeployResult(modal_url, outputs, secrets_report(aws, outputs))


def summary(options: DeployOptions, result: DeployResult) -> str:
    budget = options.budget()
    lines = [
        f"Deployed stack {options.stack}: bucket {result.outputs.get('BucketName')}, "
        f"topic {result.outputs.get('TopicArn')}",
        f"  GPU endpoint {result.modal_url}; job budget {budget.job_s} s (Modal run limit {budget.run_s} s), "
        f"{options.modal_containers} Modal containers, fal capacity {options.fal_max_outstanding}",
    ]
    pending = [s for s in result.secrets if s.state != "set"]
    for secret in result.secrets:
        lines.append(f"  secret {secret.what}: {secret.state}")
    if pending:
        lines.append("Set the secrets still holding placeholders (jobs fail with `auth` errors until then):")
        lines += [f"  {s.how}" for s in pending]
    lines.append(f"Then check the deploy end to end: make smoke STACK={options.stack}")
    return "\n".join(lines)


# Parameters `make deploy` sets itself, so both sides get the same value: never via --parameter.
OWN_PARAMETERS = {
    "ModalEndpointUrl": "--modal-url (or let the Modal step find it)",
    "JobBudgetSeconds": "JOB_BUDGET_S= (--job-budget-s)",
    "ModalContainers": "MODAL_CONTAINERS= (--modal-containers)",
    "FalMaxOutstanding": "FAL_MAX_OUTSTANDING= (--fal-max-outstanding)",
}


def _pairs(values: Sequence[str]) -> dict[str, str]:
    pairs = {}
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"--parameter wants KEY=VALUE, got {value!r}")
        if not key.isascii() or not key.isalnum():
            raise argparse.ArgumentTypeError(
                f"--parameter {key!r}: a template parameter name is A-Z, a-z, 0-9"
            )
        if key in OWN_PARAMETERS:
            raise argparse.ArgumentTypeError(
                f"{key} is set by deploy itself (the Modal app gets the same value): use "
                f"{OWN_PARAMETERS[key]}, not --parameter"
            )
        pairs[key] = rest
    return pairs


def main(
    argv: list[str] | None = None, modal: Runner | None = None, sam: Runner | None = None, aws: Any = None
) -> int:
    parser = argparse.ArgumentParser(
        prog="make deploy", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stack", required=True, help="CloudFormation stack name (any valid name)")
    parser.add_argument("--region")
    parser.add_argument("--profile")
    parser.add_argument("--job-budget-s", type=int, default=DEFAULT_BUDGET_S, help="JobBudgetSeconds")
    parser.add_argument("--modal-containers", type=int, default=DEFAULT_MODAL_CONTAINERS)
    parser.add_argument("--fal-max-outstanding", type=int, default=DEFAULT_FAL_MAX_OUTSTANDING)
    parser.add_argument("--modal-app", default="vap-gpu")
    parser.add_argument("--volume", default="vap-weights", help="Modal volume with the weights")
    parser.add_argument("--modal-url", help="use this endpoint and skip the Modal steps")
    parser.add_argument("--download-weights", action="store_true", help="fill the volume first if empty")
    parser.add_argument(
        "--parameter",
        action="append",
        default=[],
        help="more overrides, KEY=VALUE (KEY= sets an empty value; a value may hold spaces)",
    )
    args = parser.parse_args(argv)
    try:
        options = DeployOptions(
            stack=args.stack,
            region=args.region or None,
            profile=args.profile or None,
            job_budget_s=args.job_budget_s,
            modal_containers=args.modal_containers,
            fal_max_outstanding=args.fal_max_outstanding,
            modal_app=args.modal_app,
            volume=args.volume,
            modal_url=args.modal_url or None,
            download_weights=args.download_weights,
            parameters=_pairs(args.parameter),
        )
        modal, sam = modal or SubprocessRunner(), sam or SubprocessRunner()
        result = deploy(options, modal, sam, aws or session(options), sys.stdout)
    except (DeployError, layer.LayerError, argparse.ArgumentTypeError) as exc:
        print(f"deploy: {exc}", file=sys.stderr)
        return 1
    except (ClientError, BotoCoreError) as exc:
        print(f"deploy: AWS: {exc}", file=sys.stderr)
        return 3
    print(summary(options, result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
