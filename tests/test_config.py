"""proxy.yaml: interpolation, errors that name the file and line, engine selection."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from rsafe_proxy.config import GuardSettings, Settings, load_settings, packaged_config_path
from rsafe_proxy.yamlsource import FileInvalid


def write(directory: Path, text: str) -> Path:
    path = directory / "proxy.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def problems(path: Path, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(FileInvalid) as caught:
        load_settings(path, env=env or {})
    return [str(problem) for problem in caught.value.problems]


# -- interpolation ---------------------------------------------------------------------------------------------

CONFIG = """\
upstream:
  base_url: ${UPSTREAM_URL}
  api_key: ${UPSTREAM_KEY:-}
guard:
  url: ${GUARD_URL:-http://127.0.0.1:9000/v1}
  model: prefix-${GUARD_MODEL:-rsafe}-suffix
"""


def test_variables_and_defaults_are_interpolated(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, CONFIG), env={"UPSTREAM_URL": "http://up:1/v1", "GUARD_MODEL": "m7"})
    assert settings.upstream.base_url == "http://up:1/v1"
    assert settings.upstream.api_key is None  # empty means unset
    assert settings.guard.url == "http://127.0.0.1:9000/v1"
    assert settings.guard.model == "prefix-m7-suffix"


def test_an_empty_variable_takes_the_default(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, CONFIG), env={"UPSTREAM_URL": "http://up/v1", "GUARD_URL": ""})
    assert settings.guard.url == "http://127.0.0.1:9000/v1"


def test_values_are_substituted_once_and_stay_strings(tmp_path: Path) -> None:
    env = {"UPSTREAM_URL": "http://up/v1", "UPSTREAM_KEY": "${GUARD_URL}\nserver: {port: 1}"}
    settings = load_settings(write(tmp_path, CONFIG), env=env)
    assert settings.upstream.api_key is not None
    assert settings.upstream.api_key.get_secret_value() == "${GUARD_URL}\nserver: {port: 1}"
    assert settings.server.port == 8080


def test_a_missing_variable_names_the_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, CONFIG)
    assert problems(path) == [f"{path}:2: environment variable UPSTREAM_URL is not set (or is empty)"]


# -- errors with their line ------------------------------------------------------------------------------------


def test_bad_yaml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: 8080\n  host: a: b\nguard: {}\n")
    [problem] = problems(path)
    assert problem.startswith(f"{path}:3: not valid YAML")


def test_an_unknown_field_names_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: 8080\n  max_body_byte: 10\n")
    assert problems(path) == [f"{path}:3: server.max_body_byte is not a known field (did you mean 'max_body_bytes'?)"]


def test_a_wrong_value_names_its_line_and_every_problem_is_listed(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: high\nupstream:\n  base_url: ftp://x\n")
    found = problems(path)
    assert len(found) == 2
    assert found[0].startswith(f"{path}:2: server.port must be a whole number (got 'high')")
    assert found[1].startswith(f"{path}:4: upstream.base_url must be an http(s) URL")


def test_a_plain_key_in_the_file_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "tenants:\n  - id: acme\n    keys: [sk-live-123]\n")
    [problem] = problems(path)
    assert problem.startswith(f"{path}:3: tenants[acme].keys: ")
    assert "never the key itself" in problem


def test_a_file_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- just\n- a list\n")
    assert problems(path) == [f"{path}:1: the file must hold a mapping of fields (key: value)"]


def test_a_missing_file(tmp_path: Path) -> None:
    [problem] = problems(tmp_path / "absent.yaml")
    assert problem.startswith(f"{tmp_path / 'absent.yaml'}: cannot read the file")


# -- the result ------------------------------------------------------------------------------------------------


def test_settings_are_frozen_and_know_their_directory(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "server: {port: 9001}\n"), env={})
    assert settings.base_dir == str(tmp_path.resolve())
    with pytest.raises(pydantic.ValidationError):
        settings.server.port = 1  # type: ignore[misc]


def test_the_packaged_config_needs_no_variables() -> None:
    settings = load_settings(packaged_config_path(), env={})
    assert settings.upstream.base_url == "https://api.openai.com/v1"
    assert settings.upstream.api_key is None
    assert settings.guard.engine_name() == "transformers"
    assert settings.guard.effective_mode() == "score"
    assert [tenant.id for tenant in settings.tenants] == ["default"]
    assert settings.tenants[0].anonymous


def test_the_packaged_config_uses_a_guard_server_when_one_is_named() -> None:
    env = {"RSAFE_GUARD_URL": "http://guard:8000/v1", "OPENAI_API_KEY": "sk-x", "RSAFE_GUARD_MODEL": "rsafe-7b"}
    settings = load_settings(packaged_config_path(), env=env)
    assert settings.guard.engine_name() == "openai"
    assert settings.guard.effective_mode() == "generate"
    assert settings.guard.model == "rsafe-7b"
    assert settings.upstream.api_key is not None
    assert settings.upstream.api_key.get_secret_value() == "sk-x"


@pytest.mark.parametrize(
    ("guard", "engine", "mode"),
    [
        ({}, "transformers", "score"),
        ({"url": ""}, "transformers", "score"),
        ({"url": "http://g/v1"}, "openai", "generate"),
        ({"engine": "vllm", "url": "http://g/v1"}, "vllm", "generate"),
        ({"options": {"model": "/models/rsafe-7b"}}, "transformers", "generate"),
        ({"options": {"model": "embedded"}}, "transformers", "score"),
        ({"engine": "vllm"}, "vllm", "generate"),  # vLLM on the packaged model is no embedded guard: it generates
        ({"mode": "generate"}, "transformers", "generate"),
        ({"url": "http://g/v1", "mode": "score"}, "openai", "score"),
    ],
)
def test_engine_and_mode_selection(guard: dict[str, object], engine: str, mode: str) -> None:
    settings = GuardSettings.model_validate(guard)
    assert settings.engine_name() == engine
    assert settings.effective_mode() == mode


def test_tenants_must_be_unique_with_one_anonymous_at_most() -> None:
    with pytest.raises(pydantic.ValidationError, match="unique"):
        Settings.model_validate({"tenants": [{"id": "a"}, {"id": "a"}]})
    with pytest.raises(pydantic.ValidationError, match="anonymous"):
        Settings.model_validate({"tenants": [{"id": "a", "anonymous": True}, {"id": "b", "anonymous": True}]})


@pytest.mark.parametrize(
    ("guard", "template"),
    [
        ({}, "rsafe-compact"),
        ({"template": "rsafe"}, "rsafe"),
        ({"engine": "openai", "url": "http://guard/v1"}, None),
        ({"engine": "transformers", "options": {"model": "/models/rsafe-7b"}}, None),
    ],
)
def test_the_embedded_model_gets_the_compact_template(guard: dict[str, object], template: str | None) -> None:
    assert GuardSettings.model_validate(guard).effective_template() == template


def test_score_mode_refuses_a_family_read_in_generate_mode_only(tmp_path: Path) -> None:
    path = write(tmp_path, "guard:\n  mode: score\n  template: gpt-oss-safeguard\n")
    assert problems(path) == [
        f"{path}:3: guard.template: score mode reads \\boxed{{safe|unsafe}}; template family 'gpt-oss-safeguard' "
        "is read in generate mode only"
    ]
    embedded = write(tmp_path, "guard:\n  template: llama-guard\n")  # the embedded model scores by default
    assert "llama-guard" in problems(embedded)[0]
    served = GuardSettings.model_validate({"url": "http://guard/v1", "template": "gpt-oss-safeguard"})
    assert served.effective_mode() == "generate"
    assert GuardSettings.model_validate({"mode": "score", "template": "rsafe"}).effective_template() == "rsafe"


def test_an_unknown_template_family_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "guard:\n  url: http://guard/v1\n  template: llama_guard\n")
    [problem] = problems(path)
    assert problem.startswith(f"{path}:3: guard.template: ")
    assert "unknown template family 'llama_guard'" in problem
