"""The policy JSON Schema as editors read it: generated from the Policy model, with `$schema` and `$id`.

A copy ships beside the example policies (`rsafe_proxy/policies/policy.schema.json`, and `policies/` in the
repository); each example policy names it on its first line (`# yaml-language-server: $schema=...`), which
VS Code's YAML extension (and every editor using yaml-language-server) reads for completion and checking.
A test holds the shipped copies equal to what this module generates."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from rsafe_proxy.policy.schema import Policy

SCHEMA_FILE = "policy.schema.json"
DIALECT = "https://json-schema.org/draft/2020-12/schema"  # the dialect pydantic generates
# A name, not an address: the schema is read from the file beside the policies, never fetched.
SCHEMA_ID = "urn:rsafe-proxy:policy-schema:v1"
# The line that names the schema, for a policy file in the same folder as the shipped copy.
SCHEMA_LINE = f"# yaml-language-server: $schema={SCHEMA_FILE}"


def policy_schema() -> dict[str, Any]:
    """The JSON Schema of a policy file."""
    generated = Policy.model_json_schema()
    return {"$schema": DIALECT, "$id": SCHEMA_ID, **generated}


def schema_text() -> str:
    """The schema as the shipped file holds it (indented, one trailing newline)."""
    return json.dumps(policy_schema(), indent=2, ensure_ascii=False) + "\n"


def packaged_schema_path() -> Path:
    """The schema file shipped in the package, beside the packaged policies."""
    return Path(str(resources.files("rsafe_proxy").joinpath("policies", SCHEMA_FILE)))
