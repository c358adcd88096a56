"""adapters/train/: every accelerate config loads with accelerate's own loader, and every command in its README
parses with `accelerate launch`'s parser and with the train command's (so no flag is misspelt or gone)."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

pytest.importorskip("accelerate")

from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import launch_command_parser
from accelerate.utils import DistributedType

from rsafe_proxy.train.options import TrainOptions, add_train_arguments

ROOT = Path(__file__).resolve().parent.parent
ADAPTERS = ROOT / "adapters" / "train"
CONFIGS = sorted(ADAPTERS.glob("*.yaml"))


def commands(markdown: Path) -> list[list[str]]:
    """The `accelerate launch ...` commands of the fenced sh blocks, as argument lists."""
    blocks = re.findall(r"```(?:sh|bash)\n(.*?)```", markdown.read_text(encoding="utf-8"), re.DOTALL)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    found = [shlex.split(line, comments=True) for line in lines]
    return [words for words in found if words[:2] == ["accelerate", "launch"]]


def test_the_three_configs_are_there_and_load() -> None:
    loaded = {path.stem: load_config_from_file(str(path)) for path in CONFIGS}
    assert set(loaded) == {"single-gpu", "zero3-4gpu", "multi-node"}
    assert all(isinstance(config, ClusterConfig) for config in loaded.values())
    assert loaded["single-gpu"].distributed_type == DistributedType.NO and loaded["single-gpu"].num_processes == 1
    for name, machines in (("zero3-4gpu", 1), ("multi-node", 2)):
        config = loaded[name]
        assert config.distributed_type == DistributedType.DEEPSPEED
        assert config.deepspeed_config["zero_stage"] == 3 and config.num_machines == machines
        assert config.num_processes == 4 * machines and config.mixed_precision == "bf16"


@pytest.mark.parametrize("launch", commands(ADAPTERS / "README.md"), ids=lambda words: words[3])
def test_each_documented_command_parses(launch: list[str]) -> None:
    parsed = launch_command_parser().parse_args(launch[2:])
    assert parsed.module and parsed.training_script == "rsafe_proxy.train"
    config = load_config_from_file(str(ROOT / parsed.config_file))
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    options = TrainOptions.from_namespace(parser.parse_args(parsed.training_script_args))
    # the step's completions split evenly over the processes and micro-batches the config gives
    assert options.completions_per_step % (config.num_processes * options.grad_accum) == 0


def test_the_readme_shows_the_three_settings() -> None:
    found = {words[3] for words in commands(ROOT / "README.md")}
    assert {f"adapters/train/{name}.yaml" for name in ("single-gpu", "zero3-4gpu", "multi-node")} <= found
    for launch in commands(ROOT / "README.md"):
        test_each_documented_command_parses(launch)
