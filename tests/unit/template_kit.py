"""template.yaml as the tests read it: as written (SAM) and as CloudFormation receives it."""

from __future__ import annotations

from pathlib import Path

from local_stack.cfn import Template, load_template, translate_sam

TEMPLATE = Path(__file__).resolve().parents[2] / "template.yaml"


def sam_template() -> Template:
    return load_template(TEMPLATE)


def transformed_template(sam: Template | None = None, region: str = "us-east-1") -> Template:
    """The SAM transform's output, with placeholder code URIs (the template's own are local paths)."""
    sam = sam_template() if sam is None else sam
    uris = {
        k: f"s3://artifacts/{k}.zip"
        for k, r in sam["Resources"].items()
        if {"CodeUri", "ContentUri"} & set(r.get("Properties", {}))
    }
    return translate_sam(sam, region, uris)
