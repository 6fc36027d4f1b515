"""Reading `template.yaml`: CloudFormation YAML tags, the SAM transform, and intrinsic functions.

The local stack builds everything from the one template that is deployed, so what runs here
cannot drift from what `sam deploy` creates.
"""

from __future__ import annotations

import base64
import copy
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

Template = dict[str, Any]

_SCALAR_TAGS = {"Ref": "Ref", "Condition": "Condition"}
_LIST_FN_TAGS = ("GetAtt", "Sub", "Select", "Split", "Join", "If", "Equals", "Not", "And", "Or", "FindInMap")


class _CfnLoader(yaml.SafeLoader):
    """SafeLoader that turns `!Ref x` into `{"Ref": "x"}` and `!Fn y` into `{"Fn::Fn": y}`."""


def _construct(tag: str) -> Callable[[yaml.SafeLoader, yaml.Node], Any]:
    def build(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
        if isinstance(node, yaml.ScalarNode):
            value: Any = loader.construct_scalar(node)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_mapping(node, deep=True)
        if tag in _SCALAR_TAGS:
            return {_SCALAR_TAGS[tag]: value}
        if tag == "GetAtt" and isinstance(value, str):
            value = value.split(".", 1)
        return {f"Fn::{tag}": value}

    return build


for _tag in (*_SCALAR_TAGS, *_LIST_FN_TAGS, "Base64", "ImportValue", "GetAZs", "Cidr", "Transform"):
    _CfnLoader.add_constructor(f"!{_tag}", _construct(_tag))


def load_template(path: Path) -> Template:
    with path.open(encoding="utf-8") as handle:
        loaded = yaml.load(handle, Loader=_CfnLoader)  # noqa: S506 - SafeLoader subclass
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} is not a template")
    return loaded


class _NoManagedPolicies:
    """The template names no managed policies by name, so the translator needs no IAM lookup."""

    def load(self) -> dict[str, str]:
        return {}


def translate_sam(template: Template, region: str, code_uris: Mapping[str, str]) -> Template:
    """Expand `AWS::Serverless::*` resources; `code_uris` maps logical ids to `s3://` code URIs."""
    from samtranslator.translator.transform import transform

    fragment = copy.deepcopy(template)
    for logical_id, resource in fragment.get("Resources", {}).items():
        props = resource.get("Properties", {})
        for key in ("CodeUri", "ContentUri"):
            if key in props:
                props[key] = code_uris[logical_id]
    # The translator reads the region from the environment (boto's resolution order).
    previous = os.environ.get("AWS_DEFAULT_REGION")
    os.environ["AWS_DEFAULT_REGION"] = region
    try:
        return transform(fragment, {}, _NoManagedPolicies())
    finally:
        if previous is None:
            os.environ.pop("AWS_DEFAULT_REGION", None)
        else:
            os.environ["AWS_DEFAULT_REGION"] = previous


def parameter_defaults(template: Template, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    values = {
        name: str(spec["Default"])
        for name, spec in template.get("Parameters", {}).items()
        if "Default" in spec
    }
    values.update(overrides or {})
    return values


class Resolver:
    """Evaluates the intrinsic functions the template uses, against known names and attributes.

    `refs` maps parameter names, pseudo parameters and logical ids to their `Ref` values;
    `attrs` maps `(logical_id, attribute)` to `Fn::GetAtt` values.
    """

    def __init__(
        self,
        template: Template,
        refs: Mapping[str, Any],
        attrs: Mapping[tuple[str, str], Any],
    ) -> None:
        self._template = template
        self._refs = dict(refs)
        self._attrs = dict(attrs)

    def condition(self, name: str) -> bool:
        return bool(self.resolve(self._template["Conditions"][name]))

    def resolve(self, value: Any) -> Any:
        if isinstance(value, list):
            return [self.resolve(item) for item in value]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            ((key, arg),) = value.items()
            if key == "Ref":
                return self._ref(arg)
            if key == "Condition":
                return self.condition(arg)
            if key.startswith("Fn::"):
                return self._function(key[4:], arg)
        return {key: self.resolve(item) for key, item in value.items()}

    def _ref(self, name: str) -> Any:
        if name not in self._refs:
            raise KeyError(f"cannot resolve Ref {name}")
        return self._refs[name]

    def _function(self, name: str, arg: Any) -> Any:
        if name == "GetAtt":
            logical_id, attribute = arg if isinstance(arg, list) else arg.split(".", 1)
            return self._attrs[(logical_id, attribute)]
        if name == "Sub":
            return self._sub(arg)
        args = self.resolve(arg)
        if name == "Select":
            return args[1][int(args[0])]
        if name == "Split":
            return str(args[1]).split(args[0])
        if name == "Join":
            return str(args[0]).join(str(item) for item in args[1])
        if name == "If":
            return args[1] if self.condition(arg[0]) else args[2]
        if name == "Equals":
            return str(args[0]) == str(args[1])
        if name == "Not":
            return not args[0]
        if name == "And":
            return all(args)
        if name == "Or":
            return any(args)
        if name == "Base64":
            return base64.b64encode(str(args).encode()).decode()
        raise NotImplementedError(f"Fn::{name}")

    def _sub(self, arg: Any) -> str:
        text, extra = (arg, {}) if isinstance(arg, str) else (arg[0], self.resolve(arg[1]))
        out: list[str] = []
        i = 0
        while i < len(text):
            start = text.find("${", i)
            if start < 0:
                out.append(text[i:])
                break
            end = text.index("}", start)
            out.append(text[i:start])
            name = text[start + 2 : end]
            if name.startswith("!"):  # "${!Literal}" stands for "${Literal}"
                out.append("${" + name[1:] + "}")
            elif name in extra:
                out.append(str(extra[name]))
            elif "." in name:
                logical_id, attribute = name.split(".", 1)
                out.append(str(self._attrs[(logical_id, attribute)]))
            else:
                out.append(str(self._ref(name)))
            i = end + 1
        return "".join(out)
