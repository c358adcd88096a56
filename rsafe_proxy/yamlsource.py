"""YAML files read with their line numbers, and validation errors told as `file:line: problem`.

Compliance teams edit policy files and operators edit proxy.yaml by hand; a mistake must point at its line
in plain words, never at a traceback.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml

Model = TypeVar("Model", bound=pydantic.BaseModel)


@dataclass(frozen=True)
class Problem:
    """One mistake in a file."""

    path: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        return f"{where}: {self.message}"


class FileInvalid(Exception):
    """A file that cannot be used, with every problem found in it."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))


def _lines(node: yaml.Node, path: tuple[str | int, ...], into: dict[tuple[str | int, ...], int]) -> None:
    into[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            into[(*path, f"{key.value}\0key")] = key.start_mark.line + 1
            _lines(value, (*path, key.value), into)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _lines(item, (*path, index), into)


@dataclass(frozen=True)
class YamlDocument:
    """Parsed YAML data and the line of every key and value in it."""

    path: str
    data: Any
    lines: Mapping[tuple[str | int, ...], int]

    def line_of(self, location: Sequence[str | int]) -> int | None:
        """The line of the deepest part of `location` that exists in the file."""
        loc = tuple(location)
        while loc:
            if loc in self.lines:
                return self.lines[loc]
            loc = loc[:-1]
        return self.lines.get(())


def read_yaml(path: str | Path, transform: Callable[[str], str] | None = None) -> YamlDocument:
    """Parse the YAML file at `path` (after `transform` of its text, e.g. env interpolation)."""
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise FileInvalid([Problem(name, None, f"cannot read the file: {error.strerror or error}")]) from None
    except UnicodeDecodeError:
        raise FileInvalid([Problem(name, None, "the file is not UTF-8 text")]) from None
    if transform is not None:
        text = transform(text)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        line = mark.line + 1 if mark is not None else None
        raise FileInvalid([Problem(name, line, f"not valid YAML: {error.problem or error}")]) from None
    except yaml.YAMLError as error:
        raise FileInvalid([Problem(name, None, f"not valid YAML: {error}")]) from None
    lines: dict[tuple[str | int, ...], int] = {}
    if node is not None:
        _lines(node, (), lines)
    return YamlDocument(name, data, lines)


def _plain(error: Mapping[str, Any]) -> str:
    loc = ".".join(str(part) for part in error["loc"]) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"unknown field '{loc}' (check its spelling)"
    if kind == "missing":
        return f"missing required field '{loc}'"
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"'{loc}': {message}"


def validate(document: YamlDocument, model: type[Model], context: Mapping[str, Any] | None = None) -> Model:
    """The document as `model`, or FileInvalid listing every problem with its line."""
    if not isinstance(document.data, dict):
        raise FileInvalid([Problem(document.path, 1, "the file must hold a mapping of fields (key: value)")])
    try:
        return model.model_validate(document.data, context=dict(context or {}))
    except pydantic.ValidationError as error:
        problems = []
        for item in error.errors():
            loc = list(item["loc"])
            line = document.line_of([*loc[:-1], f"{loc[-1]}\0key"]) if item["type"] == "extra_forbidden" else None
            problems.append(Problem(document.path, line or document.line_of(loc), _plain(item)))
        raise FileInvalid(problems) from None
