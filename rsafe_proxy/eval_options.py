"""`rsafe-proxy eval`'s options: argparse declares them, `EvalOptions.from_namespace` reads them once, checked.

Everything after parsing takes an `EvalOptions` (frozen), never the `argparse.Namespace`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from rsafe_proxy.arguments import at_least_one


@dataclass(frozen=True)
class EvalOptions:
    """One evaluation, as asked for on the command line (see `add_eval_arguments` for each field's meaning).

    Built only from files that are there: a missing --data file, or an output folder that does not exist, is a
    ValueError (the command's exit 2) here, before the model loads or a row is judged.
    """

    data: tuple[Path, ...]
    config: str | None = None
    policy: Path | None = None
    limit: int | None = None
    concurrency: int = 4
    predictions: Path | None = None
    json: Path | None = None

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("--data: at least one file is needed")
        for path in self.data:
            if not path.is_file():
                raise ValueError(f"--data {path}: {'is a directory' if path.is_dir() else 'no such file'}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be at least 1, not {self.limit}")
        if self.concurrency < 1:
            raise ValueError(f"--concurrency must be at least 1, not {self.concurrency}")
        # checked now, not when the run ends and the results would be lost
        outputs: tuple[tuple[str, Path | None], ...] = (("--predictions", self.predictions), ("--json", self.json))
        for option, output in outputs:
            if output is not None and not output.parent.is_dir():
                raise ValueError(f"{option} {output}: the folder {output.parent} does not exist")

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> EvalOptions:
        """The options of a parsed `rsafe-proxy eval` command line."""
        return cls(
            data=tuple(Path(path) for path in args.data),
            config=args.config,
            policy=Path(args.policy) if args.policy else None,
            limit=args.limit,
            concurrency=args.concurrency,
            predictions=Path(args.predictions) if args.predictions else None,
            json=Path(args.json) if args.json else None,
        )


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `rsafe-proxy eval`."""
    parser.add_argument(
        "--data",
        action="append",
        required=True,
        type=Path,
        metavar="FILE.jsonl",
        help="labelled rows, one JSON object a line: {id, prompt, response, label: safe|unsafe, task: "
        "prompt|response}; repeat for more files (one table row each); every file is checked before the model loads",
    )
    parser.add_argument(
        "--limit",
        type=at_least_one,
        metavar="N",
        help="judge N rows of each file, evenly spaced through it (default: all)",
    )
    parser.add_argument(
        "--policy", metavar="FILE", help="the policy to judge under (default: the first tenant's policy in proxy.yaml)"
    )
    parser.add_argument(
        "--concurrency",
        type=at_least_one,
        default=4,
        metavar="N",
        help="rows screened at once; the latency columns are measured under it (default: %(default)s)",
    )
    parser.add_argument(
        "--predictions",
        type=Path,
        metavar="OUT.jsonl",
        help="write one line per row: gold label, prediction, P(unsafe), reasoning, seconds, error",
    )
    parser.add_argument(
        "--json", type=Path, metavar="METRICS.json", help="write the table's metrics as JSON, by file name"
    )
