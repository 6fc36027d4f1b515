"""Cost per video, computed: Modal H100 GPU seconds + AWS requests, versus fal's price per video.

The generation time is an estimate (no GPU here): `gpu.tools.scaling`'s for the default job on
one H100 (the model's counted FLOPs at 60 % of peak, the README's cost table), beside 4-6 minutes
for the reference code.
AWS request counts come from the per-job benchmark (calls made inside the handlers) plus the
requests that happen outside them (user uploads, S3 -> SQS, the event source mapping, the GPU's
presigned GET/PUT), at us-east-1 list prices (November 2026), free tiers ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vap_shared.cost import DEFAULT_FAL_PER_VIDEO, DEFAULT_MODAL_PER_SECOND

from gpu.tools.scaling import JobShape, estimate

MODAL_H100_PER_S = DEFAULT_MODAL_PER_SECOND["H100"]
FAL_PER_VIDEO = DEFAULT_FAL_PER_VIDEO
# The default job's generation time on one H100 as estimated from the model's FLOPs: the figure
# the other benchmarks use where one generation time is needed.
GENERATION_S_ESTIMATE = estimate(JobShape(), 1).total_s
GENERATION_S = {
    "estimate (gpu.tools.scaling, 60 % of H100 peak)": GENERATION_S_ESTIMATE,
    "reference code, low": 300.0,
    "reference code, high": 360.0,
}
# Model load on a cold container (README: +$0.05-0.15); not per video when the container is warm.
COLD_EXTRA = (0.05, 0.15)

LAMBDA_REQUEST = 0.20 / 1e6
LAMBDA_GB_S_ARM = 0.0000133334
S3_PUT = 0.005 / 1000  # PUT, COPY, POST, LIST
S3_GET = 0.0004 / 1000  # GET, HEAD
SQS_REQUEST = 0.40 / 1e6
SNS_PUBLISH = 0.50 / 1e6
DDB_WRITE_UNIT = 0.625 / 1e6
DDB_READ_UNIT = 0.125 / 1e6
SECRETS_CALL = 0.05 / 10_000
EGRESS_PER_GB = 0.09
# Assumptions where nothing here measures them.
JOB_ITEM_WRITE_UNITS = 2  # job records are ~1-2 KB: 2 write units per write, 1 read unit per read
INPUT_MB = 5.0  # reference clip + image the GPU fetches from S3 over the internet (egress)
OUTSIDE_S3_PUTS = 3 + 1  # user uploads (clip, image, sidecar) + the GPU's presigned PUT
OUTSIDE_S3_GETS = 2  # the GPU's presigned GETs of the inputs
OUTSIDE_SQS = 3  # S3 -> SendMessage, event source mapping ReceiveMessage + DeleteMessageBatch


@dataclass
class CostResult:
    gpu_usd: dict[str, float]
    aws_items: dict[str, float] = field(default_factory=dict)
    aws_usd: float = 0.0
    fal_usd: float = FAL_PER_VIDEO
    cold_extra_usd: tuple[float, float] = COLD_EXTRA

    @property
    def modal_total_target(self) -> float:
        return next(iter(self.gpu_usd.values())) + self.aws_usd


def compute(
    api_calls_per_job: dict[str, float], invocations_per_job: float, gb_s_per_job: float
) -> CostResult:
    """`api_calls_per_job`: "service:Operation" -> calls per job made inside the handlers."""

    def calls(service: str, *operations: str) -> float:
        return sum(
            v
            for k, v in api_calls_per_job.items()
            if k.split(":")[0] == service and (not operations or k.split(":")[1] in operations)
        )

    s3_put = calls("s3", "PutObject", "CopyObject", "CreateMultipartUpload", "UploadPart",
                   "CompleteMultipartUpload", "ListObjectsV2") + OUTSIDE_S3_PUTS  # fmt: skip
    s3_get = calls("s3", "GetObject", "HeadObject") + OUTSIDE_S3_GETS
    items = {
        "Lambda requests": invocations_per_job * LAMBDA_REQUEST,
        "Lambda compute (arm64)": gb_s_per_job * LAMBDA_GB_S_ARM,
        "S3 requests": s3_put * S3_PUT + s3_get * S3_GET,
        "DynamoDB": calls("dynamodb", "PutItem", "UpdateItem") * JOB_ITEM_WRITE_UNITS * DDB_WRITE_UNIT
        + calls("dynamodb", "GetItem") * DDB_READ_UNIT,
        "SQS": (calls("sqs") + OUTSIDE_SQS) * SQS_REQUEST,
        "SNS publish": calls("sns") * SNS_PUBLISH,
        "Secrets Manager": calls("secretsmanager") * SECRETS_CALL,
        "S3 egress of the inputs to Modal": INPUT_MB / 1024 * EGRESS_PER_GB,
    }
    return CostResult(
        gpu_usd={name: seconds * MODAL_H100_PER_S for name, seconds in GENERATION_S.items()},
        aws_items=items,
        aws_usd=sum(items.values()),
    )
