"""Stored training results are keyed by what produced them, read from the files, not named by their paths: a
model retrained in place gets other verdict-head features; a head copied beside it does not."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from rsafe_proxy.datasets import Row
from rsafe_proxy.train.fingerprint import folder_digest, rows_digest
from rsafe_proxy.train.head import HeadOptions, producer


def model_folder(root: Path, weights: bytes) -> Path:
    root.mkdir()
    (root / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
    (root / "model.safetensors").write_bytes(weights)
    return root


def test_a_folder_digest_follows_its_files_not_its_path(tmp_path: Path) -> None:
    first = model_folder(tmp_path / "a", b"weights one")
    digest = folder_digest(first)
    assert folder_digest(model_folder(tmp_path / "b", b"weights one")) == digest  # same files elsewhere
    (first / "model.safetensors").write_bytes(b"weights two")  # retrained in place
    assert folder_digest(first) != digest
    retrained = folder_digest(first)
    (first / "head.json").write_text("{}", encoding="utf-8")  # a verdict head beside it changes no hidden state
    (first / "head.safetensors").write_bytes(b"head")
    assert folder_digest(first) == retrained
    (first / "tokenizer.json").write_text("{}", encoding="utf-8")  # a new tokenizer file does
    assert folder_digest(first) != retrained


def test_rows_digest_follows_every_field_a_row_is_used_with() -> None:
    row = Row("a", "prompt", "answer", "safe", "response", template="rsafe")
    digest = rows_digest([row])
    assert rows_digest([Row("a", "prompt", "answer", "safe", "response", template="rsafe")]) == digest
    for other in (
        Row("b", "prompt", "answer", "safe", "response", template="rsafe"),
        Row("a", "prompt!", "answer", "safe", "response", template="rsafe"),
        Row("a", "prompt", None, "safe", "response", template="rsafe"),
        Row("a", "prompt", "answer", "unsafe", "response", template="rsafe"),
        Row("a", "prompt", "answer", "safe", "prompt", template="rsafe"),
        Row("a", "prompt", "answer", "safe", "response", template="rsafe-compact"),
    ):
        assert rows_digest([other]) != digest, other
    assert rows_digest([row, row]) != digest


def test_head_features_are_keyed_by_the_model_and_adapter_files(tmp_path: Path) -> None:
    model = model_folder(tmp_path / "model", b"base")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}", encoding="utf-8")
    (adapter / "adapter_model.safetensors").write_bytes(b"lora one")
    options = HeadOptions(data=(), evaluate=(), out=tmp_path / "out", model=str(model), adapter=str(adapter))
    key = producer(options)
    assert producer(options) == key
    (adapter / "adapter_model.safetensors").write_bytes(b"lora two")  # the adapter retrained in place
    assert producer(options) != key
    with_new_adapter = producer(options)
    (model / "model.safetensors").write_bytes(b"base, retrained")
    assert producer(options) != with_new_adapter
    assert producer(HeadOptions(data=(), evaluate=(), out=tmp_path, model=str(model), adapter=None))["adapter"] is None
    assert producer(HeadOptions(data=(), evaluate=(), out=tmp_path, model=str(model), layers=(1,))) != producer(
        HeadOptions(data=(), evaluate=(), out=tmp_path, model=str(model), layers=(2,))
    )
