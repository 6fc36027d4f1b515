"""`make deploy`'s orchestration with `modal` and `sam` replaced by recorders: the exact commands, the
environment of `modal deploy`, the parameter overrides of `sam deploy`, the deploy template, and the
secrets report. What the recorders answer is produced by modal 1.6.4's own output code."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from moto import mock_aws

from local_stack.cfn import load_template
from vap_cli import deploy, layer
from vap_cli.runner import Completed, SubprocessRunner

ROOT = Path(__file__).resolve().parents[2]
MODAL_URL = "https://acme--vap-gpu-api.modal.run"
BUDGET_PARAMETERS = ("JobBudgetSeconds", "ModalContainers", "FalMaxOutstanding")


def modal_deploy_output(urls: Sequence[str] = (MODAL_URL,)) -> str:
    """What `modal deploy` prints, rendered by modal's own status rows (modal._output)."""
    import modal
    from modal._output.manager import OutputManager
    from modal._output.status import FunctionCreationStatus
    from modal_proto import api_pb2

    buffer = io.StringIO()
    # Entered left to right: the output manager exists once enable_output() has run.
    with (
        contextlib.redirect_stdout(buffer),
        modal.enable_output(),
        OutputManager.get().display_object_tree(),
    ):
        functions = [("VapGenerator.*", None), ("download_weights", None)]
        functions += [(f"api{i or ''}", url) for i, url in enumerate(urls)]
        for name, url in functions:
            with FunctionCreationStatus("function", name) as status:
                response = api_pb2.FunctionCreateResponse()
                if url:
                    response.handle_metadata.web_url = url
                    response.function.webhook_config.requires_proxy_auth = True
                status.set_response(response)
    return buffer.getvalue() + "✓ App deployed in 12.345s! 🎉\n"


def modal_volume_ls_json(names: Sequence[str]) -> str:
    """What `modal volume ls VOLUME / --json` prints (modal.cli.utils.display_table)."""
    import modal
    from modal.cli.utils import display_table

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), modal.enable_output():
        rows = [(n, "dir" if n == "hf" else "file", "2026-11-30 10:00 UTC", 123) for n in names]
        display_table(["Filename", "Type", "Created/Modified", "Size"], rows, json=True)
    return buffer.getvalue()


class Recorder:
    """Stands in for a command: records argv + env, answers from `replies` by argv prefix."""

    def __init__(self, replies: Mapping[tuple[str, ...], list[Completed] | Completed]) -> None:
        self.replies = {k: (list(v) if isinstance(v, list) else [v]) for k, v in replies.items()}
        self.calls: list[tuple[list[str], dict[str, str] | None]] = []

    def __call__(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> Completed:
        self.calls.append((list(argv), dict(env) if env is not None else None))
        for prefix, answers in self.replies.items():
            if tuple(argv[: len(prefix)]) == prefix:
                return answers.pop(0) if len(answers) > 1 else answers[0]
        raise AssertionError(f"unexpected command {argv}")


def ok(output: str = "", rc: int = 0) -> Completed:
    return Completed((), rc, output)


@pytest.fixture(scope="module")
def prebuilt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return layer.build(tmp_path_factory.mktemp("layer") / "out")


@pytest.fixture(autouse=True)
def _one_layer_build(prebuilt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each deploy copies one real build (pip once per module); the checks still run every time."""

    def build(out: Path) -> Path:
        shutil.copytree(prebuilt, out)
        return out

    monkeypatch.setattr(layer, "build", build)


@pytest.fixture
def template(tmp_path: Path) -> Path:
    """template.yaml, with the budget parameters declared as PLAN.md defines them where the branch
    that adds them has not landed yet (so this orchestration test does not depend on merge order)."""
    text = (ROOT / "template.yaml").read_text()
    declared = set(load_template(ROOT / "template.yaml")["Parameters"])
    extra = "".join(
        f"  {name}:\n    Type: Number\n    Default: 1\n" for name in BUDGET_PARAMETERS if name not in declared
    )
    path = tmp_path / "template.yaml"
    path.write_text(text.replace("\nParameters:\n", "\nParameters:\n" + extra, 1))
    return path


@pytest.fixture
def aws() -> Any:
    """Real boto3 against moto: the stack's outputs and its two secrets (fal placeholder, Modal set)."""
    with mock_aws():
        session = boto3.session.Session(region_name="eu-west-1")
        sm = session.client("secretsmanager")
        fal = sm.create_secret(Name="vap-prod/fal-key", SecretString="REPLACE_WITH_FAL_KEY")["ARN"]
        token = json.dumps({"key": "wk-real", "secret": "ws-real"})
        modal_arn = sm.create_secret(Name="vap-prod/modal-token", SecretString=token)["ARN"]
        body = {
            "Resources": {"Topic": {"Type": "AWS::SNS::Topic"}},
            "Outputs": {
                "BucketName": {"Value": "vap-123456789012-eu-west-1-1c2fa620"},
                "TopicArn": {"Value": "arn:aws:sns:eu-west-1:123456789012:topic"},
                "FalKeySecretArn": {"Value": fal},
                "ModalTokenSecretArn": {"Value": modal_arn},
            },
        }
        session.client("cloudformation").create_stack(StackName="VapProd", TemplateBody=json.dumps(body))
        yield session


def options(tmp_path: Path, template: Path, **kw: Any) -> deploy.DeployOptions:
    base: dict[str, Any] = {
        "stack": "VapProd",
        "region": "eu-west-1",
        "profile": "ops",
        "job_budget_s": 5400,
        "modal_containers": 3,
        "fal_max_outstanding": 7,
        "parameters": {"DefaultBackend": "auto"},
        "build_dir": tmp_path / "build",
        "template": template,
    }
    return deploy.DeployOptions(**{**base, **kw})


MODAL_ENV = {
    "VAP_JOB_BUDGET_S": "5400",
    "VAP_MODAL_MAX_CONTAINERS": "3",
    "VAP_MODAL_APP": "vap-gpu",
    "VAP_MODAL_VOLUME": "vap-weights",
}
VOLUME_LS = ["modal", "volume", "ls", "vap-weights", "/", "--json"]


def test_deploy_runs_modal_then_sam_with_the_same_budget_and_reports_secrets(
    tmp_path: Path, template: Path, aws: Any
) -> None:
    modal = Recorder(
        {
            ("modal", "volume", "ls"): ok(modal_volume_ls_json(["hf", "vap-revision.json"])),
            ("modal", "deploy"): ok(modal_deploy_output()),
        }
    )
    sam = Recorder({("sam", "deploy"): ok("Successfully created/updated stack - VapProd in eu-west-1\n")})
    opts = options(tmp_path, template)
    out = io.StringIO()
    result = deploy.deploy(opts, modal, sam, aws, out)

    assert modal.calls == [(VOLUME_LS, None), (["modal", "deploy", "gpu/service/modal_app.py"], MODAL_ENV)]
    built = tmp_path / "build" / "template.json"
    assert sam.calls == [
        (
            ["sam", "deploy", "--template-file", str(built), "--stack-name", "VapProd",
             "--capabilities", "CAPABILITY_IAM", "CAPABILITY_AUTO_EXPAND", "--resolve-s3",
             "--no-confirm-changeset", "--no-fail-on-empty-changeset", "--parameter-overrides",
             'DefaultBackend="auto"', 'FalMaxOutstanding="7"', 'JobBudgetSeconds="5400"',
             'ModalContainers="3"', f'ModalEndpointUrl="{MODAL_URL}"', "--region", "eu-west-1",
             "--profile", "ops"],
            {"SAM_CLI_TELEMETRY": "0"},
        )
    ]  # fmt: skip
    assert result.modal_url == MODAL_URL and f"endpoint {MODAL_URL}" in out.getvalue()
    assert [(s.what, s.state) for s in result.secrets] == [
        ("fal key", "placeholder"),
        ("Modal proxy-auth token", "set"),
    ]
    text = deploy.summary(opts, result)
    assert f"--secret-id {result.secrets[0].arn} --secret-string '<FAL_KEY>'" in text
    assert result.secrets[1].arn not in text.split("placeholders")[-1]  # a set secret needs nothing
    assert "make smoke STACK=VapProd" in text and "job budget 5400 s (Modal run limit 1200 s)" in text


def test_the_deploy_template_uses_the_checked_layer_and_absolute_code_paths(
    tmp_path: Path, template: Path, aws: Any
) -> None:
    modal = Recorder({("modal",): ok()})
    sam = Recorder({("sam", "deploy"): ok()})
    deploy.deploy(options(tmp_path, template, modal_url=MODAL_URL), modal, sam, aws, io.StringIO())
    assert modal.calls == []  # --modal-url: an app already deployed
    built = json.loads((tmp_path / "build" / "template.json").read_text())
    source = load_template(template)
    layer = built["Resources"]["SharedLayer"]
    assert layer["Properties"]["ContentUri"] == str(tmp_path / "build" / "layer")
    assert (tmp_path / "build" / "layer" / "python" / "vap_shared" / "__init__.py").is_file()
    assert list((tmp_path / "build" / "layer" / "python").glob("pydantic_core/*aarch64*.so"))
    assert "Metadata" not in layer  # built already: sam deploy packages it as is
    for logical_id in ("IngestFunction", "WebhookFunction", "SweeperFunction", "StoreFunction"):
        uri = built["Resources"][logical_id]["Properties"]["CodeUri"]
        assert uri == str(ROOT / source["Resources"][logical_id]["Properties"]["CodeUri"])
        assert Path(uri).is_dir()
    # Nothing else changed: the deployed template is template.yaml.
    for resources in (built["Resources"], source["Resources"]):
        resources["SharedLayer"]["Properties"].pop("ContentUri")
        resources["SharedLayer"].pop("Metadata", None)
        for logical_id in ("IngestFunction", "WebhookFunction", "SweeperFunction", "StoreFunction"):
            resources[logical_id]["Properties"].pop("CodeUri")
    assert built == json.loads(json.dumps(source))


def test_missing_weights_stop_before_anything_is_deployed(tmp_path: Path, template: Path, aws: Any) -> None:
    modal = Recorder({("modal", "volume", "ls"): ok(modal_volume_ls_json(["hf"]))})
    sam = Recorder({})
    with pytest.raises(deploy.DeployError, match=r"no weights.*DOWNLOAD_WEIGHTS=1"):
        deploy.deploy(options(tmp_path, template), modal, sam, aws, io.StringIO())
    assert modal.calls == [(VOLUME_LS, None)] and sam.calls == []
    # No volume at all (modal exits non-zero): the same answer.
    modal = Recorder({("modal", "volume", "ls"): ok("Volume 'vap-weights' not found\n", rc=1)})
    with pytest.raises(deploy.DeployError, match="no weights"):
        deploy.deploy(options(tmp_path, template), modal, sam, aws, io.StringIO())
    # Not logged in to Modal: the answer quotes Modal and names the login, not only the download.
    modal = Recorder({("modal", "volume", "ls"): ok("Token missing. Could not authenticate client.\n", rc=1)})
    with pytest.raises(deploy.DeployError, match=r"\(Token missing\..*modal token new") as raised:
        deploy.deploy(options(tmp_path, template), modal, sam, aws, io.StringIO())
    assert "DOWNLOAD_WEIGHTS=1" in str(raised.value) and sam.calls == []


def test_settings_deploy_sets_itself_are_refused_as_extra_parameters(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A --parameter JobBudgetSeconds would be overwritten by the budget given to Modal (or the
    # reverse): the two sides must agree, so only the dedicated setting is accepted.
    for key, flag in (("JobBudgetSeconds", "JOB_BUDGET_S="), ("ModalEndpointUrl", "--modal-url")):
        modal, sam = Recorder({}), Recorder({})
        code = deploy.main(
            ["--stack", "vap", "--parameter", f"{key}=3600"], modal=modal, sam=sam, aws=object()
        )
        assert code == 1 and modal.calls == [] and sam.calls == []
        assert key in capsys.readouterr().err and flag in deploy.OWN_PARAMETERS[key]


def test_download_weights_fills_the_volume_first(tmp_path: Path, template: Path, aws: Any) -> None:
    modal = Recorder(
        {
            ("modal", "volume", "ls"): [ok("[]\n"), ok(modal_volume_ls_json(["vap-revision.json"]))],
            ("modal", "run"): ok("recorded …\n"),
            ("modal", "deploy"): ok(modal_deploy_output()),
        }
    )
    sam = Recorder({("sam", "deploy"): ok()})
    deploy.deploy(options(tmp_path, template, download_weights=True), modal, sam, aws, io.StringIO())
    assert [c[0][:3] for c in modal.calls] == [
        ["modal", "volume", "ls"],
        ["modal", "run", "gpu/service/modal_app.py::download_weights"],
        ["modal", "volume", "ls"],
        ["modal", "deploy", "gpu/service/modal_app.py"],
    ]
    assert modal.calls[1][1] == MODAL_ENV and len(sam.calls) == 1


def test_a_failed_modal_deploy_leaves_aws_alone(tmp_path: Path, template: Path, aws: Any) -> None:
    modal = Recorder(
        {
            ("modal", "volume", "ls"): ok(modal_volume_ls_json(["vap-revision.json"])),
            ("modal", "deploy"): ok("Error: token missing\n", rc=1),
        }
    )
    sam = Recorder({})
    with pytest.raises(deploy.DeployError, match="modal deploy` failed"):
        deploy.deploy(options(tmp_path, template), modal, sam, aws, io.StringIO())
    assert sam.calls == []


def test_invalid_settings_fail_before_any_command(tmp_path: Path, template: Path, aws: Any) -> None:
    modal, sam = Recorder({}), Recorder({})
    for bad in ({"job_budget_s": 1200}, {"modal_containers": 0}):
        with pytest.raises(deploy.DeployError, match="nothing was deployed"):
            deploy.deploy(options(tmp_path, template, **bad), modal, sam, aws, io.StringIO())
    assert modal.calls == [] and sam.calls == []


def test_a_template_without_a_passed_parameter_is_refused(tmp_path: Path, aws: Any) -> None:
    sam_template = load_template(ROOT / "template.yaml")
    for name in BUDGET_PARAMETERS:
        sam_template["Parameters"].pop(name, None)
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(sam_template))
    modal, sam = Recorder({}), Recorder({})
    with pytest.raises(deploy.DeployError, match="no parameter"):
        deploy.deploy(options(tmp_path, path), modal, sam, aws, io.StringIO())
    assert modal.calls == [] and sam.calls == []


def test_template_declares_every_parameter_deploy_passes() -> None:
    declared = deploy.template_parameters(ROOT / "template.yaml")
    assert set(deploy.DeployOptions("s").overrides(MODAL_URL)) <= declared


def test_the_endpoint_is_read_from_modal_deploys_output() -> None:
    assert deploy.modal_endpoint(modal_deploy_output()) == MODAL_URL
    with pytest.raises(deploy.DeployError, match="printed 0"):
        deploy.modal_endpoint(modal_deploy_output(urls=()))
    with pytest.raises(deploy.DeployError, match="printed 2"):
        deploy.modal_endpoint(modal_deploy_output(urls=(MODAL_URL, "https://acme--other.modal.run")))


def test_the_subprocess_runner_echoes_and_keeps_output(tmp_path: Path) -> None:
    echo = io.StringIO()
    done = SubprocessRunner(echo=echo, cwd=tmp_path)(
        ["sh", "-c", 'echo "$VAP_X"; echo err >&2; exit 3'], {"VAP_X": "hello"}
    )
    assert done.returncode == 3 and done.output.splitlines() == ["hello", "err"]
    assert echo.getvalue().startswith("$ VAP_X=hello sh -c ") and "hello\nerr\n" in echo.getvalue()
    missing = SubprocessRunner(echo=echo)(["vap-no-such-command-here"])
    assert missing.returncode == 127


def test_sam_packages_the_deploy_template_as_lambda_expects(tmp_path: Path, template: Path) -> None:
    """`sam package` (what `sam deploy` does first) on the deploy template, against moto's S3: the
    layer zip has python/ at its root with the arm64 build, each function zip its handler."""
    import io as _io
    import os
    import subprocess
    import zipfile

    from moto.server import ThreadedMotoServer

    from local_stack.net import LOOPBACK, free_port

    sam_cli = ROOT / ".tools" / "sam" / "bin" / "sam"
    if not sam_cli.exists():
        pytest.skip("aws-sam-cli is not installed (make venv builds .tools/sam)")
    port = free_port()
    server = ThreadedMotoServer(ip_address=LOOPBACK, port=port, verbose=False)
    server.start()
    try:
        env = {
            **os.environ, "AWS_ENDPOINT_URL": f"http://{LOOPBACK}:{port}", "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "SAM_CLI_TELEMETRY": "0",
        }  # fmt: skip
        s3 = boto3.client(
            "s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing",
        )  # fmt: skip
        s3.create_bucket(Bucket="artifacts")
        built = deploy.build_template(options(tmp_path, template))
        packaged = tmp_path / "packaged.json"
        done = subprocess.run(
            [str(sam_cli), "package", "--template-file", str(built), "--s3-bucket", "artifacts",
             "--output-template-file", str(packaged), "--use-json", "--region", "us-east-1"],
            env=env, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        resources = json.loads(packaged.read_text())["Resources"]

        def archive(uri: str) -> zipfile.ZipFile:
            bucket, key = uri.removeprefix("s3://").split("/", 1)
            return zipfile.ZipFile(_io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read()))

        names = archive(resources["SharedLayer"]["Properties"]["ContentUri"]).namelist()
        assert "python/vap_shared/__init__.py" in names
        assert any(n.startswith("python/pydantic_core/") and "aarch64" in n for n in names)
        for logical_id, handler in (("IngestFunction", "ingest.py"), ("WebhookFunction", "webhook.py")):
            assert handler in archive(resources[logical_id]["Properties"]["CodeUri"]).namelist()
    finally:
        server.stop()


def test_the_modal_app_reads_what_deploy_sets() -> None:
    """gpu/service/modal_app.py imported under `modal deploy`'s environment (as the modal CLI imports it)."""
    import os
    import subprocess
    import sys

    options = deploy.DeployOptions("s", modal_app="vap-x", modal_containers=3, job_budget_s=5400)
    env = {**os.environ, **options.modal_env()}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "shared")])
    code = (
        "import json, warnings; warnings.simplefilter('ignore'); import gpu.service.modal_app as m; "
        "s = m.SETTINGS; print(json.dumps([m.app.name, s.max_containers, s.budget.job_s, s.volume, "
        "m.REVISION_RECORD, m.MODELS_DIR]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=True
    )
    app, containers, budget, volume, record, models = json.loads(done.stdout.strip().splitlines()[-1])
    assert (app, containers, budget, volume) == ("vap-x", 3, 5400, options.volume)
    # The weights check looks for the file download_weights records, at the volume's root.
    assert Path(record).relative_to(models).as_posix() == deploy.WEIGHTS_MARKER


def test_deploy_sets_only_settings_the_modal_app_reads() -> None:
    """Every variable `make deploy` hands `modal deploy` is one the app forwards to its containers."""
    from gpu.service.modal_settings import SETTING_NAMES

    assert set(deploy.DeployOptions("s").modal_env()) <= set(SETTING_NAMES)
