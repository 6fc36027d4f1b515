"""Operations in template.yaml, checked on the SAM-transformed template: the metrics namespace, the
operator topic and its alarms (metric, threshold, action, runbook link), and a dashboard that only
draws metrics the code emits (vap_shared.metrics.SPECS is the one list both sides use)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from template_kit import transformed_template
from vap_shared import cost, metrics

from local_stack.cfn import Resolver, Template, load_template, parameter_defaults

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "template.yaml"
README = ROOT / "README.md"
CONTRACTS = ROOT / "docs" / "contracts.md"
NAMESPACE = {"Fn::Sub": "VAP/${AWS::StackName}"}
STACK = "vap-test"
FUNCTIONS = ("IngestFunction", "WebhookFunction", "SweeperFunction", "StoreFunction")


@pytest.fixture(scope="module")
def sam() -> Template:
    return load_template(TEMPLATE)


@pytest.fixture(scope="module")
def cfn(sam: Template) -> Template:
    return transformed_template(sam)


def of_type(template: Template, kind: str) -> dict[str, dict[str, Any]]:
    return {k: r for k, r in template["Resources"].items() if r["Type"] == kind}


def resolver(template: Template, **params: str) -> Resolver:
    refs: dict[str, Any] = {
        **parameter_defaults(template, params),
        "AWS::StackName": STACK,
        "AWS::Region": "us-east-1",
        "AWS::AccountId": "123456789012",
        "AWS::Partition": "aws",
    }
    refs.update({logical_id: f"{STACK}-{logical_id}" for logical_id in template["Resources"]})
    queues = ("IngestQueue", "IngestDeadLetterQueue", "StoreQueue", "StoreDeadLetterQueue")
    attrs = {(q, "QueueName"): f"{STACK}-{q}" for q in queues}
    return Resolver(template, refs, attrs)


# ---------------------------------------------------------------------------------------------- namespace


def test_one_metrics_namespace_reaches_every_function(cfn: Template) -> None:
    functions = of_type(cfn, "AWS::Lambda::Function")
    assert len(functions) == len(FUNCTIONS)
    for logical_id, function in functions.items():
        env = function["Properties"]["Environment"]["Variables"]
        # Globals are merged into each function's own variables, not replacing them.
        assert env[metrics.NAMESPACE_ENV] == NAMESPACE, logical_id
        assert "BUCKET_NAME" in env and "POWERTOOLS_SERVICE_NAME" in env
        assert env["FAL_PRICE_PER_VIDEO"] == {"Ref": "FalPricePerVideo"}
    namespaces = []
    for alarm in of_type(cfn, "AWS::CloudWatch::Alarm").values():
        p = alarm["Properties"]
        namespaces += [p["Namespace"]] if "Namespace" in p else []
        namespaces += [
            m["MetricStat"]["Metric"]["Namespace"] for m in p.get("Metrics", []) if "MetricStat" in m
        ]
    ours = [json.dumps(n) for n in namespaces if not str(n).startswith("AWS/")]
    assert ours and set(ours) == {json.dumps(NAMESPACE)}


def test_price_parameters_feed_the_cost_estimate(sam: Template) -> None:
    params = sam["Parameters"]
    assert params["ModalPricePerSecondH100"]["Default"] == cost.DEFAULT_MODAL_PER_SECOND["H100"]
    assert params["ModalPricePerSecondH200"]["Default"] == cost.DEFAULT_MODAL_PER_SECOND["H200"]
    assert params["FalPricePerVideo"]["Default"] == cost.DEFAULT_FAL_PER_VIDEO
    env = sam["Globals"]["Function"]["Environment"]["Variables"]
    # What the template sets is what the code reads, and the contract names it.
    names = {metrics.NAMESPACE_ENV, cost.ENV_FAL_PRICE} | {
        cost.ENV_MODAL_PRICE.format(gpu=g) for g in cost.DEFAULT_MODAL_PER_SECOND
    }
    assert set(env) == names
    prices = cost.Prices.from_env({k: str(v) for k, v in resolver(sam).resolve(env).items()})
    assert prices == cost.Prices()
    section = CONTRACTS.read_text(encoding="utf-8").split("## Lambda environment", 1)[1].split("\n## ", 1)[0]
    assert names <= set(re.findall(r"`([A-Z][A-Z0-9_]+)`", section))


# ---------------------------------------------------------------------------------------------- topic


def test_operator_topic_is_encrypted_with_a_key_cloudwatch_may_use(cfn: Template) -> None:
    topic = cfn["Resources"]["OperatorTopic"]["Properties"]
    assert topic["KmsMasterKeyId"] == {"Ref": "OperatorKey"}  # not alias/aws/sns: alarms could not publish
    key = cfn["Resources"]["OperatorKey"]["Properties"]
    assert key["EnableKeyRotation"] is True
    (grant,) = [
        s
        for s in key["KeyPolicy"]["Statement"]
        if s.get("Principal") == {"Service": "cloudwatch.amazonaws.com"}
    ]
    assert set(grant["Action"]) == {"kms:Decrypt", "kms:GenerateDataKey*"}
    alarm_arns = grant["Condition"]["ArnLike"]["aws:SourceArn"]["Fn::Sub"]
    assert alarm_arns.endswith(":alarm:${AWS::StackName}-*")
    policy = cfn["Resources"]["OperatorTopicPolicy"]["Properties"]
    assert policy["Topics"] == [{"Ref": "OperatorTopic"}]
    (publish,) = [s for s in policy["PolicyDocument"]["Statement"] if s["Effect"] == "Allow"]
    assert (
        publish["Principal"] == {"Service": "cloudwatch.amazonaws.com"} and publish["Action"] == "sns:Publish"
    )
    assert publish["Condition"]["ArnLike"]["aws:SourceArn"]["Fn::Sub"] == alarm_arns
    # Every alarm's name matches what the key and topic policies allow.
    r = resolver(cfn)
    pattern = re.escape(r.resolve({"Fn::Sub": alarm_arns}).rsplit(":", 1)[1]).replace(r"\*", ".+")
    for logical_id, alarm in of_type(cfn, "AWS::CloudWatch::Alarm").items():
        assert re.fullmatch(pattern, r.resolve(alarm["Properties"]["AlarmName"])), logical_id


def test_operator_email_is_optional(sam: Template) -> None:
    subscription = sam["Resources"]["OperatorEmailSubscription"]
    assert subscription["Condition"] == "HasOperatorEmail"
    assert subscription["Properties"] == {
        "TopicArn": {"Ref": "OperatorTopic"},
        "Protocol": "email",
        "Endpoint": {"Ref": "OperatorEmail"},
    }
    assert sam["Parameters"]["OperatorEmail"]["Default"] == ""
    assert not resolver(sam).condition("HasOperatorEmail")
    assert resolver(sam, OperatorEmail="ops@example.com").condition("HasOperatorEmail")
    allowed = re.compile(sam["Parameters"]["OperatorEmail"]["AllowedPattern"])
    assert allowed.match("") and allowed.match("ops@example.com") and not allowed.match("not an email")


# ---------------------------------------------------------------------------------------------- alarms

SQS = "AWS/SQS"
LAMBDA = "AWS/Lambda"
# logical id -> (namespace, metric, dimensions, statistic, period, threshold, comparison, anchor)
EXPECTED: dict[str, tuple[Any, ...]] = {
    "IngestDeadLetterAlarm": (
        SQS,
        "ApproximateNumberOfMessagesVisible",
        {"QueueName": {"Fn::GetAtt": ["IngestDeadLetterQueue", "QueueName"]}},
        "Maximum",
        300,
        1,
        "GreaterThanOrEqualToThreshold",
        "alarm-ingest-dlq-not-empty",
    ),
    "IngestQueueAgeAlarm": (
        SQS,
        "ApproximateAgeOfOldestMessage",
        {"QueueName": {"Fn::GetAtt": ["IngestQueue", "QueueName"]}},
        "Maximum",
        300,
        {"Ref": "IngestQueueAgeAlarmSeconds"},
        "GreaterThanThreshold",
        "alarm-ingest-queue-backlog",
    ),
    "IngestRecordCrashesAlarm": (
        NAMESPACE,
        metrics.INGEST_RECORD_CRASHES,
        {},
        "Sum",
        300,
        1,
        "GreaterThanOrEqualToThreshold",
        "alarm-ingest-record-crashes",
    ),
    "StoreDeadLetterAlarm": (
        SQS,
        "ApproximateNumberOfMessagesVisible",
        {"QueueName": {"Fn::GetAtt": ["StoreDeadLetterQueue", "QueueName"]}},
        "Maximum",
        300,
        1,
        "GreaterThanOrEqualToThreshold",
        "alarm-store-dlq-not-empty",
    ),
    "StuckJobsAlarm": (
        NAMESPACE,
        metrics.STUCK_JOBS,
        {},
        "Sum",
        900,
        1,
        "GreaterThanOrEqualToThreshold",
        "alarm-stuck-jobs",
    ),
    **{
        f"{fn.removesuffix('Function')}{kind}Alarm": (
            LAMBDA,
            kind,
            {"FunctionName": {"Ref": fn}},
            "Sum",
            300,
            1,
            "GreaterThanOrEqualToThreshold",
            f"alarm-function-{kind.lower()}",
        )
        for fn in FUNCTIONS
        for kind in ("Errors", "Throttles")
    },
}


def _anchors() -> set[str]:
    readme = README.read_text(encoding="utf-8")
    troubleshooting = readme.split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r'<a id="([a-z0-9-]+)"></a>', troubleshooting))


def _runbook_anchor(alarm: dict[str, Any]) -> str:
    description = alarm["Properties"]["AlarmDescription"]["Fn::Sub"]
    found = re.findall(r"\$\{RunbookUrl\}#([a-z0-9-]+)", description)
    assert len(found) == 1, description
    assert len(description) <= 1024 - 200  # AlarmDescription max 1024 after substitution
    return str(found[0])


def test_at_least_five_alarms_all_to_the_operator_topic(cfn: Template) -> None:
    alarms = of_type(cfn, "AWS::CloudWatch::Alarm")
    assert len(alarms) >= 5
    assert set(alarms) == set(EXPECTED) | {"FailedJobsAlarm"}
    for logical_id, alarm in alarms.items():
        p = alarm["Properties"]
        assert p["AlarmActions"] == [{"Ref": "OperatorTopic"}], logical_id
        assert p["OKActions"] == [{"Ref": "OperatorTopic"}], logical_id
        assert p["TreatMissingData"] == "notBreaching", logical_id  # EMF metrics exist only when emitted
        assert _runbook_anchor(alarm) in _anchors(), logical_id


@pytest.mark.parametrize("logical_id", sorted(EXPECTED))
def test_alarm_metric_threshold_and_action(cfn: Template, logical_id: str) -> None:
    namespace, metric, dims, stat, period, threshold, comparison, anchor = EXPECTED[logical_id]
    p = cfn["Resources"][logical_id]["Properties"]
    assert p["Namespace"] == namespace
    assert p["MetricName"] == metric
    assert {d["Name"]: d["Value"] for d in p.get("Dimensions", [])} == dims
    assert (p["Statistic"], p["Period"], p["Threshold"], p["ComparisonOperator"]) == (
        stat,
        period,
        threshold,
        comparison,
    )
    assert _runbook_anchor(cfn["Resources"][logical_id]) == anchor
    if namespace == NAMESPACE:  # our EMF metric, with a dimension set the code emits
        assert tuple(sorted(dims)) in metrics.SPECS[metric].dimension_sets


def test_every_function_has_errors_and_throttles_alarms(cfn: Template) -> None:
    watched = {
        (p["Properties"]["MetricName"], p["Properties"]["Dimensions"][0]["Value"]["Ref"])
        for p in of_type(cfn, "AWS::CloudWatch::Alarm").values()
        if p["Properties"].get("Namespace") == LAMBDA
    }
    functions = set(of_type(cfn, "AWS::Lambda::Function"))
    assert watched == {(kind, fn) for fn in functions for kind in ("Errors", "Throttles")}


def test_failed_jobs_alarm_counts_service_failures(cfn: Template, sam: Template) -> None:
    p = cfn["Resources"]["FailedJobsAlarm"]["Properties"]
    assert p["Threshold"] == {"Ref": "FailedJobsAlarmThreshold"}
    assert p["ComparisonOperator"] == "GreaterThanOrEqualToThreshold"
    assert sam["Parameters"]["FailedJobsAlarmThreshold"]["Default"] >= 1
    queries = {q["Id"]: q for q in p["Metrics"]}
    (returned,) = [q for q in p["Metrics"] if q.get("ReturnData", True)]
    assert returned["Expression"] == "FILL(internal, 0) + FILL(timeout, 0)"
    for kind in ("internal", "timeout"):
        stat = queries[kind]["MetricStat"]
        assert stat["Metric"]["Namespace"] == NAMESPACE
        assert stat["Metric"]["MetricName"] == metrics.JOBS_FAILED
        assert stat["Metric"]["Dimensions"] == [{"Name": metrics.ERROR_KIND, "Value": kind}]
        assert (stat["Stat"], stat["Period"]) == ("Sum", 900)
        assert kind in metrics.ERROR_KINDS
    assert (metrics.ERROR_KIND,) in metrics.SPECS[metrics.JOBS_FAILED].dimension_sets
    assert _runbook_anchor(cfn["Resources"]["FailedJobsAlarm"]) == "alarm-jobs-failing"


# ---------------------------------------------------------------------------------------------- dashboard


def _dashboard(cfn: Template) -> dict[str, Any]:
    (dashboard,) = of_type(cfn, "AWS::CloudWatch::Dashboard").values()
    return dict(json.loads(resolver(cfn).resolve(dashboard["Properties"]["DashboardBody"])))


def _metric_rows(widget: dict[str, Any]) -> list[tuple[str, str, dict[str, str], dict[str, Any]]]:
    rows = []
    for row in widget["properties"]["metrics"]:
        options = row[-1] if isinstance(row[-1], dict) else {}
        plain = row[:-1] if options else row
        assert len(plain) % 2 == 0, row  # namespace, name, then name/value pairs ("..." not used)
        rows.append((plain[0], plain[1], dict(zip(plain[2::2], plain[3::2], strict=True)), options))
    return rows


def test_dashboard_draws_only_metrics_the_code_emits(cfn: Template) -> None:
    widgets = [w for w in _dashboard(cfn)["widgets"] if w["type"] == "metric"]
    drawn: set[str] = set()
    for widget in widgets:
        for namespace, name, dims, _options in _metric_rows(widget):
            if namespace.startswith("AWS/"):
                continue
            assert namespace == f"VAP/{STACK}"
            spec = metrics.SPECS[name]
            assert tuple(sorted(dims)) in spec.dimension_sets, (name, dims)
            assert dims.get(metrics.BACKEND, "modal") in metrics.BACKENDS
            assert dims.get(metrics.ERROR_KIND, "input") in metrics.ERROR_KINDS
            drawn.add(name)
    assert drawn == set(metrics.METRIC_NAMES)  # and every metric the code emits is on it


def test_dashboard_has_the_views_operators_need(cfn: Template) -> None:
    widgets = {w["properties"].get("title", ""): w for w in _dashboard(cfn)["widgets"]}

    def rows(fragment: str) -> list[tuple[str, str, dict[str, str], dict[str, Any]]]:
        (title,) = [t for t in widgets if fragment in t]
        return _metric_rows(widgets[title])

    state = {name for _ns, name, dims, _o in rows("by state") if not dims}
    assert {metrics.JOBS_RECEIVED, metrics.JOBS_SUCCEEDED, metrics.JOBS_FAILED} <= state
    assert {dims["backend"] for _ns, _n, dims, _o in rows("by backend")} >= {"modal", "fal"}
    for fragment, metric in (
        ("Upload to dispatch", metrics.QUEUE_SECONDS),
        ("Generation", metrics.GENERATION_SECONDS),
    ):
        stats = {o.get("stat") for _ns, name, _d, o in rows(fragment) if name == metric}
        assert stats == {"p50", "p99"}, fragment
    kinds = {dims["error_kind"] for _ns, _n, dims, _o in rows("Failures by kind")}
    assert kinds == set(metrics.ERROR_KINDS)
    (title,) = [t for t in widgets if "cost per day" in t]
    assert widgets[title]["properties"]["period"] == 86400
    assert {n for _ns, n, _d, _o in rows("cost per day")} == {metrics.JOB_COST_USD}
    dlq = [r for r in rows("dead-letter") if r[1] == "ApproximateNumberOfMessagesVisible"]
    assert [r[2] for r in dlq] == [{"QueueName": f"{STACK}-IngestDeadLetterQueue"}]
    (alarms,) = [w for w in _dashboard(cfn)["widgets"] if w["type"] == "alarm"]
    r = resolver(cfn)
    names = {r.resolve(a["Properties"]["AlarmName"]) for a in of_type(cfn, "AWS::CloudWatch::Alarm").values()}
    assert {arn.rsplit(":", 1)[1] for arn in alarms["properties"]["alarms"]} == names


def test_readme_operations_lists_the_metrics_and_alarms(cfn: Template) -> None:
    section = README.read_text(encoding="utf-8").split("## Operations", 1)[1].split("\n## ", 1)[0]
    metric_rows = re.findall(r"^\| (`[A-Za-z]+`(?:, `[A-Za-z]+`)*) \|", section, re.M)
    documented = {name for row in metric_rows for name in re.findall(r"`([A-Za-z]+)`", row)}
    assert documented == set(metrics.METRIC_NAMES)
    r = resolver(cfn)
    names = {
        r.resolve(a["Properties"]["AlarmName"]).removeprefix(f"{STACK}-")
        for a in of_type(cfn, "AWS::CloudWatch::Alarm").values()
    }
    alarm_rows = re.findall(r"^\| (`[a-z-]+`(?:, `[a-z-]+`)*) \| \S", section, re.M)
    assert {name for row in alarm_rows for name in re.findall(r"`([a-z-]+)`", row)} == names
