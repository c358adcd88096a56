"""The run's output, in forms that serve: a PEFT LoRA adapter (the transformers engine's `adapter:`, vLLM's
`--lora-modules`), or a whole model folder (`--finetune full`, or `--merge`: base + adapter merged) that
`adapters/vllm/serve.sh` and the engines load as `model:`."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def finish_adapter(folder: Path, dtype_name: str, base_name: str) -> Path:
    """Rewrite an adapter the trainer saved: weights in `dtype_name`, the base named as on the command line
    (`embedded`, not a local cache path), and nothing but PEFT's two files."""
    import torch
    from safetensors.torch import load_file, save_file

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype_name]
    weights_path = folder / "adapter_model.safetensors"
    weights = {name: tensor.to(dtype).contiguous() for name, tensor in load_file(str(weights_path)).items()}
    save_file(weights, str(weights_path), metadata={"format": "pt"})
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base_name
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for path in folder.iterdir():
        if path.name in ADAPTER_FILES:
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return folder


def copy_output(source: Path, target: Path) -> Path:
    """`source` (a stage's adapter or model) copied to `target`, replacing what was there."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    return target


def write_generation_config(folder: Path, stop_ids: Sequence[int]) -> None:
    """The model folder's generation config with the end-of-turn token among the stops (a base model's config
    lacks it, and generation would run on into invented turns)."""
    path = folder / "generation_config.json"
    config: dict[str, Any] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    existing = config.get("eos_token_id")
    stops = [existing] if isinstance(existing, int) else list(existing or [])
    config["eos_token_id"] = list(dict.fromkeys([*stops, *stop_ids]))
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def merge(model_path: Path, adapter: Path, target: Path, tokenizer: Any, stop_ids: Sequence[int]) -> Path:
    """`model_path` with `adapter` merged in, saved with its tokenizer to `target` (bf16 safetensors)."""
    import warnings

    import torch
    from peft import PeftModel

    from rsafe_proxy.train.modeling import load_model

    with warnings.catch_warnings():  # peft 0.21 reads a property transformers 5 deprecated
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        merged = PeftModel.from_pretrained(load_model(model_path, torch.bfloat16, "cpu"), str(adapter))
        model = merged.merge_and_unload()
    shutil.rmtree(target, ignore_errors=True)
    model.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))
    write_generation_config(target, stop_ids)
    return target
