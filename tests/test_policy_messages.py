"""What a compliance officer reads for a broken policy (and an operator for a broken proxy.yaml): the exact line,
the entry named by its id, and our own plain words, never pydantic's ("Input should be", "Field required")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rsafe_proxy.config import Settings, load_settings
from rsafe_proxy.plainerrors import field_names, where
from rsafe_proxy.policy.loading import load_policy
from rsafe_proxy.policy.schema import Policy
from rsafe_proxy.yamlsource import FileInvalid

HEAD = "id: demo\ncategories:\n  - {id: U1, name: Violence}\n"

# (case, the policy file, every line `rsafe-proxy policy validate` prints for it, after the file's name)
POLICIES: list[tuple[str, str, list[str]]] = [
    (
        "a misspelt action",
        HEAD + "  - id: U2\n    name: Weapons\n    action: blok\n",
        ["6: categories[U2].action must be one of: flag, rewrite, block (got 'blok')"],
    ),
    (
        "a category without an id is named by its position",
        HEAD + "  - name: Weapons\n    side: inputs\n",
        ["4: categories[1].id is required", "5: categories[1].side must be one of: input, output, both (got 'inputs')"],
    ),
    (
        "a misspelt field, with the field meant",
        HEAD + "  - id: U2\n    name: Weapons\n    descripton: knives\n",
        ["6: categories[U2].descripton is not a known field (did you mean 'description'?)"],
    ),
    (
        "a field that is nothing like one, with the fields there are",
        "id: demo\ncategories: [{id: U1, name: V}]\nreasoning: {keep: true}\n",
        ["3: reasoning.keep is not a known field (the fields here are: capture, return_to_client)"],
    ),
    ("no categories at all", "id: demo\n", ["1: categories is required"]),
    ("an empty list of categories", "id: demo\ncategories: []\n", ["2: categories must not be empty"]),
    (
        "the same id twice (ids are read without regard to case)",
        HEAD + "  - {id: u1, name: Weapons}\n",
        ["4: categories[1].id: 'u1' is already the id of categories[U1] (ids are compared without regard to case)"],
    ),
    (
        "a number where text belongs",
        "id: 2024\ncategories: [{id: U1, name: V}]\n",
        ["1: id must be text (got 2024): write it in quotes"],
    ),
    (
        "yes, read by YAML as true",
        "id: demo\ncategories: [{id: U1, name: V, description: yes}]\n",
        ["2: categories[U1].description must be text (got true): write it in quotes"],
    ),
    (
        "an empty value",
        "id: demo\ncategories: [{id: U1, name: V}]\non_guard_error:\n",
        ["3: on_guard_error must be one of: block, allow (the value is empty)"],
    ),
    (
        "numbers out of range and not numbers",
        "id: demo\ncategories: [{id: U1, name: V}]\nstream:\n  window_chars: 8\n  overlap_chars: lots\n"
        "guard:\n  temperature: 9\n  top_p: 0\n",
        [
            "4: stream.window_chars must be at least 16 (got 8)",
            "5: stream.overlap_chars must be a whole number (got 'lots')",
            "7: guard.temperature must be at most 2 (got 9)",
            "8: guard.top_p must be more than 0 (got 0)",
        ],
    ),
    (
        "not true or false",
        "id: demo\ncategories: [{id: U1, name: V}]\nreasoning:\n  capture: maybe\n",
        ["4: reasoning.capture must be true or false (got 'maybe')"],
    ),
    (
        "a text where a mapping belongs, and one where a list belongs",
        "id: demo\ncategories: U1\nmessages: blocked\n",
        [
            "2: categories must be a list (got 'U1')",
            "3: messages must be a mapping of fields (key: value) (got 'blocked')",
        ],
    ),
    (
        "too long",
        "id: demo\ncategories: [{id: U1, name: " + "x" * 201 + "}]\n",
        ["2: categories[U1].name must be at most 200 characters (it has 201)"],
    ),
    (
        "examples and roles without ids",
        "id: demo\ncategories: [{id: U1, name: V}]\ninput_roles: [user, bot]\nexamples:\n"
        "  - {text: hi, expected: fine}\n  - {expected: safe}\n",
        [
            "3: input_roles[1] must be one of: system, developer, user, assistant, tool, function (got 'bot')",
            "5: examples[0].expected must be one of: safe, unsafe (got 'fine')",
            "6: examples[1].text is required",
        ],
    ),
    (
        "our own validators' words, after the entry's position when its id is the problem",
        "id: demo\ncategories:\n  - {id: 'U 1', name: V}\n  - {id: U2, name: '<b>'}\n",
        [
            "3: categories[0].id: 'U 1' is not a valid id: start with a letter, then only letters, digits, '_' or '-' "
            "(like U1 or H2)",
            "4: categories[U2].name must not contain markup like <...>: it would change the guard prompt",
        ],
    ),
    (
        "every problem, in the file's order",
        "id: demo\ncategories:\n  - {id: U1, name: V, action: deny}\ndefaut_action: block\n",
        [
            "3: categories[U1].action must be one of: flag, rewrite, block (got 'deny')",
            "4: defaut_action is not a known field (did you mean 'default_action'?)",
        ],
    ),
]

PYDANTIC_WORDS = ("Input should", "Field required", "Extra inputs", "String should", "Value error", "valid integer")


@pytest.mark.parametrize(("case", "text", "lines"), POLICIES, ids=[case[0] for case in POLICIES])
def test_a_broken_policy_reads_plainly(case: str, text: str, lines: list[str], tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(FileInvalid) as raised:
        load_policy(path)
    assert [str(problem) for problem in raised.value.problems] == [f"{path}:{line}" for line in lines]
    assert not any(words in str(raised.value) for words in PYDANTIC_WORDS)


# (case, proxy.yaml, every problem, after the file's name)
CONFIGS: list[tuple[str, str, list[str]]] = [
    (
        "tenants named by their ids",
        "tenants:\n  - id: acme\n    polcy: bank\n  - id: beta\n    anonymous: maybe\n",
        [
            "3: tenants[acme].polcy is not a known field (did you mean 'policy'?)",
            "5: tenants[beta].anonymous must be true or false (got 'maybe')",
        ],
    ),
    (
        "server numbers",
        "server:\n  port: high\n  max_body_byte: 3\npolicy_reload_s: -1\n",
        [
            "2: server.port must be a whole number (got 'high')",
            "3: server.max_body_byte is not a known field (did you mean 'max_body_bytes'?)",
            "4: policy_reload_s must be at least 0 (got -1)",
        ],
    ),
    ("an unknown section", "gaurd: {}\n", ["1: gaurd is not a known field (did you mean 'guard'?)"]),
    (
        "a key is never repeated",
        "upstream:\n  api_key: 123456789\nserver:\n  admin_keys: sk-admin-secret\n",
        [
            "2: upstream.api_key must be text (the value is not shown): write it in quotes",
            "4: server.admin_keys must be a list (the value is not shown)",
        ],
    ),
]


@pytest.mark.parametrize(("case", "text", "lines"), CONFIGS, ids=[case[0] for case in CONFIGS])
def test_a_broken_proxy_yaml_reads_plainly(case: str, text: str, lines: list[str], tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(FileInvalid) as raised:
        load_settings(path, env={})
    assert [str(problem) for problem in raised.value.problems] == [f"{path}:{line}" for line in lines]
    assert not any(words in str(raised.value) for words in PYDANTIC_WORDS)


def test_the_console_script_prints_the_plain_message(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(HEAD + "  - {id: U2, name: Weapons, action: blok}\n", encoding="utf-8")
    script = Path(sys.executable).with_name("rsafe-proxy")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "rsafe_proxy.cli"]
    run = subprocess.run([*command, "policy", "validate", str(path)], capture_output=True, text=True, check=False)
    assert run.returncode == 1
    assert run.stderr.strip() == f"{path}:4: categories[U2].action must be one of: flag, rewrite, block (got 'blok')"


@pytest.mark.parametrize(
    ("data", "location", "shown"),
    [
        ({"categories": [{"id": "U1"}, {"id": "U2"}]}, ("categories", 1, "action"), "categories[U2].action"),
        ({"categories": [{"id": "U1"}, {"name": "x"}]}, ("categories", 1, "name"), "categories[1].name"),
        ({"categories": [{"id": "U1"}, {"id": "u1"}]}, ("categories", 0, "id"), "categories[0].id"),
        ({"tenants": [{"id": "7"}]}, ("tenants", 0, "keys"), "tenants[0].keys"),
        ({"tenants": [{"id": "a]b"}]}, ("tenants", 0, "keys"), "tenants[0].keys"),
        ({"categories": "U1"}, ("categories", 0), "categories[0]"),
        ({}, (), "(top level)"),
    ],
)
def test_entries_are_named_by_a_unique_plain_id_else_by_position(
    data: dict[str, object], location: tuple[str | int, ...], shown: str
) -> None:
    assert where(location, data) == shown


def test_the_field_names_for_a_suggestion_come_from_the_model_at_that_place() -> None:
    assert "action" in field_names(Policy, ("categories", 3))
    assert "window_chars" in field_names(Policy, ("stream",))
    assert "max_tokens" in field_names(Policy, ("guard",))
    assert "policy" in field_names(Settings, ("tenants", 0))
    assert "base_url" in field_names(Settings, ("tenants", 0, "upstream"))
    assert field_names(Policy, ("categories", 0, "name")) == ()
    assert field_names(Policy, ("nothing",)) == ()
