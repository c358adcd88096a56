"""Training the guard model: labelled data -> supervised warm-up -> GRPO with RSafe's reward -> LoRA adapter.

Importing this package loads no model; torch, transformers and peft are imported when a run starts.
"""

from rsafe_proxy.train.command import add_train_arguments, run_train

__all__ = ["add_train_arguments", "run_train"]
