"""Reading policy files: the packaged default, or a tenant's YAML, validated with line-numbered errors."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from rsafe_proxy.policy.schema import Policy
from rsafe_proxy.yamlsource import read_yaml, validate

PACKAGED = "rsafe-default"


def packaged_policy_path(name: str = PACKAGED) -> Path:
    """Path of a policy shipped inside the package (`rsafe_proxy/policies/NAME.yaml`)."""
    return Path(str(resources.files("rsafe_proxy").joinpath("policies", f"{name}.yaml")))


def resolve_policy_path(reference: str, base: Path | None = None) -> Path:
    """A policy reference from config: a packaged name (no slash, no suffix) or a path relative to `base`."""
    if "/" not in reference and not reference.endswith((".yaml", ".yml")):
        return packaged_policy_path(reference)
    path = Path(reference).expanduser()
    return path if path.is_absolute() or base is None else base / path


def load_policy(path: str | Path) -> Policy:
    """The policy in `path`; raises yamlsource.FileInvalid with every problem and its line."""
    return validate(read_yaml(path), Policy)
