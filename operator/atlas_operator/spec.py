"""Defaulting and validation of AtlasEndpoint specs, driven by the CRD's own schema.

The apiserver defaults and validates with the CRD's openAPIV3Schema before the operator
sees an object; the operator does it again with the same schema (crd.py) because it cannot
trust that: an apiserver without CEL, a CR stored before a schema change, or the test
emulator (which validates nothing) would let a bad spec through.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from functools import cache
from typing import Any

import jsonschema

from atlas_operator.crd import (
    CROSS_FIELD_RULES,
    MAX_NAME_LENGTH,
    NAME_PATTERN,
    NAME_RULE,
    QUANTITY_PATTERN,
    Schema,
    openapi_schema,
)

Spec = dict[str, Any]


class InvalidSpecError(ValueError):
    """A spec the operator refuses to act on; `errors` are short `path: problem` lines."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


def apply_defaults(value: Any, schema: Schema) -> Any:
    """Structural-schema defaulting as the apiserver does it: an absent field with a
    `default` gets it, then defaulting recurses into objects and arrays (so `default: {}`
    on an object fills in its children's defaults too). Returns a new value."""
    value = copy.deepcopy(value)
    if isinstance(value, dict):
        props: Mapping[str, Schema] = schema.get("properties", {})
        for key, sub in props.items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = apply_defaults(value[key], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in value:
                if key not in props:
                    value[key] = apply_defaults(value[key], extra)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        value = [apply_defaults(item, schema["items"]) for item in value]
    return value


def _strict(schema: Schema) -> Schema:
    """The schema as a JSON-schema validator should see it: unknown fields are errors (as
    `kubectl apply --validate=strict` reports them; the apiserver would silently prune
    them, hiding a typo), and int-or-string quantities must parse."""
    out: Schema = {}
    for key, sub in schema.items():
        if key == "properties":
            out[key] = {name: _strict(s) for name, s in sub.items()}
        elif key in ("items", "additionalProperties") and isinstance(sub, dict):
            out[key] = _strict(sub)
        elif key.startswith("x-kubernetes-"):
            continue
        else:
            out[key] = sub
    if schema.get("type") == "object" and "properties" in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if schema.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string", "pattern": QUANTITY_PATTERN}]
    return out


@cache
def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(_strict(openapi_schema()["properties"]["spec"]))


def _path(error: jsonschema.ValidationError) -> str:
    return ".".join(["spec", *(str(p) for p in error.absolute_path)])


def _message(error: jsonschema.ValidationError) -> str:
    if error.validator == "additionalProperties":
        # jsonschema says "Additional properties are not allowed ('x' was unexpected)".
        found = re.findall(r"'([^']+)'", error.message)
        return f"unknown field {found[0]!r}" if found else error.message
    if error.validator == "anyOf":
        return f"{error.instance!r} is not a valid quantity (e.g. 8, 500m, 64Gi)"
    return error.message


def validate_spec(spec: Mapping[str, Any]) -> Spec:
    """Default `spec` and validate it against the CRD schema and the cross-field rules.
    Returns the defaulted spec or raises InvalidSpecError listing every problem."""
    schema = openapi_schema()["properties"]["spec"]
    defaulted = apply_defaults(dict(spec), schema)
    errors = sorted(f"{_path(e)}: {_message(e)}" for e in _validator().iter_errors(defaulted))
    if not errors:  # the cross-field rules assume the per-field ones hold
        errors = [f"spec: {message}" for _, message, holds in CROSS_FIELD_RULES
                  if not holds(defaulted)]
    if errors:
        raise InvalidSpecError(errors)
    return defaulted


def validate_endpoint(body: Mapping[str, Any]) -> Spec:
    """validate_spec() plus the rule on metadata.name; returns the defaulted spec."""
    name = str((body.get("metadata") or {}).get("name") or "")
    name_ok = len(name) <= MAX_NAME_LENGTH and re.match(NAME_PATTERN, name) is not None
    try:
        spec = validate_spec(body.get("spec") or {})
    except InvalidSpecError as e:
        if not name_ok:
            raise InvalidSpecError([NAME_RULE[1], *e.errors]) from e
        raise
    if not name_ok:
        raise InvalidSpecError([NAME_RULE[1]])
    return spec
