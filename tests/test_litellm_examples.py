"""The README's LiteLLM snippets say what examples/litellm/ configures (the configs that the LiteLLM tests start
as shipped), so the README cannot drift from what is tested."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from tests.litellm_serving import EXAMPLES, ROOT


def _readme_guardrails() -> dict[str, dict[str, Any]]:
    """The README's guardrail snippets, by the guardrail they configure."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", readme, re.S)]
    found = [block["guardrails"][0] for block in blocks if isinstance(block, dict) and "guardrails" in block]
    return {entry["litellm_params"]["guardrail"]: entry for entry in found}


@pytest.mark.parametrize(
    ("config", "guardrail"),
    [("generic-api.yaml", "generic_guardrail_api"), ("python-guardrail.yaml", "rsafe_guardrail.RSafeGuardrail")],
)
def test_the_readme_snippet_is_part_of_the_example(config: str, guardrail: str) -> None:
    shipped = yaml.safe_load((EXAMPLES / config).read_text(encoding="utf-8"))["guardrails"][0]
    snippet = _readme_guardrails()[guardrail]
    assert snippet["guardrail_name"] == shipped["guardrail_name"]
    assert snippet["litellm_params"].items() <= shipped["litellm_params"].items()
