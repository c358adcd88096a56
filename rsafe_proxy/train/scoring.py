"""Evaluation of a training run: score mode (P(unsafe) at the forced `\\boxed{`) on held-out rows and extra sets,
before training (the base model) and after (the written output, loaded as the engines load it).

A result is cached in `OUT/eval-LABEL.json` under a key of what it was computed from (the model's files and the
adapter's, by content; the rows, templates, policy, max length and dtype), so a resumed run reuses it only when
nothing it depends on changed; a file that is merely there is never enough.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rsafe_proxy.datasets import Row
from rsafe_proxy.evaluation import compute_metrics, roc_auc
from rsafe_proxy.train import modeling
from rsafe_proxy.train.fingerprint import folder_digest, rows_digest


def content_key(
    model_digest: str,
    adapter: Path | None,
    sets: Mapping[str, Sequence[Row]],
    encoder: modeling.Encoder,
    dtype: str,
) -> str:
    """A digest of everything an evaluation result depends on: the model's files (`model_digest`, from
    fingerprint.folder_digest), the adapter's, the prompts as the encoder builds them, the rows and the dtype."""
    digest = hashlib.sha256()
    digest.update(model_digest.encode())
    if adapter is not None:
        digest.update(folder_digest(adapter).encode())
    digest.update(repr(sorted(encoder.builders.items())).encode())
    digest.update(f"{encoder.max_length}\0{dtype}".encode())
    for name, rows in sets.items():
        digest.update(f"{name}\0{rows_digest(rows)}\0".encode())
    return digest.hexdigest()


def load_for_scoring(model_path: Path, adapter: Path | None, dtype: Any, device: str) -> Any:
    """The model as the transformers engine runs it: the base, with `adapter` merged in when given."""
    model = modeling.load_model(model_path, dtype, device)
    if adapter is not None:
        import warnings

        from peft import PeftModel

        with warnings.catch_warnings():  # peft 0.21 reads a property transformers 5 deprecated
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.train(False)
    return model


def score_sets(
    model: Any,
    encoder: modeling.Encoder,
    sets: Mapping[str, Sequence[Row]],
    batch_size: int,
    device: str,
    predictions: Path,
    progress: bool,
) -> dict[str, dict[str, Any]]:
    """Metrics (with AUROC and seconds) of each set; every row's P(unsafe) goes to `predictions` (JSONL)."""
    from tqdm.auto import tqdm

    results: dict[str, dict[str, Any]] = {}
    with predictions.open("w", encoding="utf-8") as written:
        for name, rows in sets.items():
            with tqdm(total=len(rows), desc=f"eval {name}", disable=not progress, dynamic_ncols=True) as bar:
                begun = time.monotonic()
                probabilities = modeling.unsafe_probabilities(model, encoder, rows, batch_size, device, bar)
            labels = [row.label for row in rows]
            metrics = compute_metrics(labels, ["unsafe" if p >= 0.5 else "safe" for p in probabilities])
            results[name] = {
                **metrics.as_dict(),
                "auroc": roc_auc(labels, probabilities),
                "seconds": round(time.monotonic() - begun, 1),
            }
            for row, probability in zip(rows, probabilities, strict=True):
                record = {"set": name, "id": row.id, "label": row.label, "p_unsafe": round(probability, 5)}
                written.write(json.dumps(record) + "\n")
    return results


def evaluate(
    label: str,
    out: Path,
    model_path: Path,
    adapter: Path | None,
    sets: Mapping[str, Sequence[Row]],
    encoder: modeling.Encoder,
    *,
    model_digest: str,
    dtype: Any,
    device: str,
    batch_size: int,
    progress: bool,
) -> dict[str, dict[str, Any]]:
    """The results of `label` (before / after), computed or read back from a cache with the same key
    (`model_digest` is that of `model_path`'s files, computed once by the caller: weights can be gigabytes)."""
    if not sets:
        return {}
    key = content_key(model_digest, adapter, sets, encoder, str(dtype))
    cached = out / f"eval-{label}.json"
    if cached.is_file():
        stored = json.loads(cached.read_text(encoding="utf-8"))
        if stored.get("key") == key:
            return dict(stored["results"])
    model = load_for_scoring(model_path, adapter, dtype, device)
    results = score_sets(model, encoder, sets, batch_size, device, out / f"predictions-{label}.jsonl", progress)
    del model
    cached.write_text(json.dumps({"key": key, "results": results}, indent=2), encoding="utf-8")
    return results
