"""A learned verdict head: P(unsafe) from the guard model's hidden states at the verdict position.

In score mode the engine runs the guard prompt up to the forced `\\boxed{` once. The model's own answer there is
one direction of its final hidden state (the `unsafe` minus the `safe` token's output embedding). A verdict head
is a logistic regression over that position's hidden states of a few layers, trained on labelled guard prompts
(rsafe_proxy/train/head.py): it reads the same forward pass, so a verdict costs what it cost before.

A head is two files beside its model or adapter: `head.safetensors` (the weights; features are standardised
with the stored `mean` and `scale` before the dot product) and `head.json` (the layers it reads, and the
thresholds chosen per side on a validation split). Pure arithmetic on plain lists and tensors: the engine
decides where the hidden states come from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

WEIGHTS = "head.safetensors"
META = "head.json"


@dataclass(frozen=True)
class HeadInfo:
    """What a head reads and how its scores are meant to be thresholded (no tensors: cheap to read anywhere)."""

    layers: tuple[int, ...]  # indices into the model's hidden states (0: embeddings, n: after layer n)
    thresholds: dict[str, float]  # per side ("input", "output"): P(unsafe) at or above this is unsafe
    template: str  # the template family the head was trained with
    hidden_size: int

    @classmethod
    def read(cls, folder: Path) -> HeadInfo | None:
        """The head beside a model or adapter in `folder`, or None when there is none."""
        path = folder / META
        if not path.is_file():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        thresholds = {str(side): float(value) for side, value in data["thresholds"].items()}
        if not all(0 < value < 1 for value in thresholds.values()):
            raise ValueError(f"{path}: every threshold must lie strictly between 0 and 1")
        return cls(
            tuple(int(layer) for layer in data["layers"]), thresholds, str(data["template"]), int(data["hidden_size"])
        )


class VerdictHead:
    """Scores hidden states: sigmoid(w . (x - mean) / scale + b), x the chosen layers' states side by side."""

    def __init__(
        self, info: HeadInfo, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor
    ) -> None:
        width = len(info.layers) * info.hidden_size
        if weight.shape != (width,) or mean.shape != (width,) or scale.shape != (width,) or bias.numel() != 1:
            raise ValueError(f"head tensors do not match {len(info.layers)} layers of {info.hidden_size}")
        self.info = info
        self.weight = (weight / scale).float()  # folded: w . (x - m) / s = (w / s) . x - (w / s) . m
        self.bias = float(bias.item()) - float((self.weight * mean.float()).sum().item())

    @classmethod
    def load(cls, folder: Path) -> VerdictHead | None:
        """The head in `folder`, or None when it has none."""
        info = HeadInfo.read(folder)
        if info is None:
            return None
        from safetensors.torch import load_file

        tensors = load_file(str(folder / WEIGHTS))
        return cls(info, tensors["weight"], tensors["bias"], tensors["mean"], tensors["scale"])

    def features(self, hidden_states: Any, index: int = -1) -> torch.Tensor:
        """The chosen layers' states at position `index` of each row, side by side: (rows, width), float32."""
        import torch

        return torch.cat([hidden_states[layer][:, index].float() for layer in self.info.layers], dim=-1)

    def score(self, features: torch.Tensor) -> list[float]:
        """P(unsafe) of each row of `features`."""
        import torch

        weight = self.weight.to(features.device)
        return [float(p) for p in torch.sigmoid(features.float() @ weight + self.bias).tolist()]


def save_head(folder: Path, info: HeadInfo, weight: Any, bias: float, mean: Any, scale: Any) -> None:
    """Write a head (float32 tensors or arrays) and its description to `folder`."""
    import torch
    from safetensors.torch import save_file

    def tensor(value: Any) -> torch.Tensor:
        return torch.as_tensor(value, dtype=torch.float32).contiguous()

    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {"weight": tensor(weight), "bias": tensor([bias]), "mean": tensor(mean), "scale": tensor(scale)},
        str(folder / WEIGHTS),
    )
    meta = {
        "layers": list(info.layers),
        "thresholds": info.thresholds,
        "template": info.template,
        "hidden_size": info.hidden_size,
    }
    (folder / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
