"""rsafe-proxy serve | check | policy validate/schema/test | decisions | eval | train | train-head."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from rsafe_proxy.arguments import at_least_one
from rsafe_proxy.audit import is_postgres
from rsafe_proxy.config import Settings, load_settings
from rsafe_proxy.extras import EMBEDDED, POSTGRES, require_engine_extra
from rsafe_proxy.guard.protocol import Label, Side
from rsafe_proxy.logs import LOG_FORMATS
from rsafe_proxy.logs import configure as configure_logs
from rsafe_proxy.policy.decide import decide
from rsafe_proxy.policy.loading import load_policy, resolve_policy_path
from rsafe_proxy.policy.schema import Policy
from rsafe_proxy.yamlsource import FileInvalid

if TYPE_CHECKING:
    from rsafe_proxy.eval_options import EvalOptions

# `rsafe-proxy check` exit status, so that a script can gate on the verdict
CHECK_SAFE, CHECK_UNSAFE, CHECK_ERROR = 0, 1, 2
_CHECK_STATUS = {Label.SAFE: CHECK_SAFE, Label.UNSAFE: CHECK_UNSAFE}
_TEXT_WIDTH = 70  # `policy test`: characters of each example's text shown


def version() -> str:
    """The installed package's version (from its metadata: pyproject.toml is the one place it is written)."""
    try:
        return metadata.version("rsafe-proxy")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def _policy(path: str | Path | None, settings: Settings) -> Policy:
    """The policy at `path`, else the first tenant's."""
    if path:
        return load_policy(path)
    tenant = settings.tenants[0]
    return load_policy(resolve_policy_path(tenant.policy, Path(settings.base_dir)))


def cmd_serve(args: argparse.Namespace) -> int:
    from rsafe_proxy.app import build_app
    from rsafe_proxy.server import bind, serve, url_of

    configure_logs(args.log_format, args.log_level)
    settings = _settings(args)
    require_engine_extra(settings.guard.engine_name())  # before the port and the workers: one line, no traceback
    if settings.audit.enabled and is_postgres(settings.audit.url or ""):
        POSTGRES.require("audit.url (a PostgreSQL audit log)")
    host = args.host or settings.server.host
    port = args.port if args.port is not None else settings.server.port
    workers = args.workers if args.workers is not None else settings.server.workers
    # the port first: a port in use is reported at once, before policies or the model are loaded
    listener = bind(host, port)
    app = build_app(settings)  # loads the policies: a bad one stops start-up here, before any worker starts
    if workers == 1:
        # uvicorn names the address only when it binds the socket itself; this one was bound above
        logging.getLogger(__name__).info("serving %s (pid %d)", url_of(listener), os.getpid())
        serve(settings, app, listener=listener, host=host, port=port, log_level=args.log_level)
        return 0
    from rsafe_proxy.workers import serve_workers

    options = {"host": host, "port": port, "log_level": args.log_level}
    return serve_workers(settings, listener, workers, options, args.log_format, args.log_level)


@dataclass(frozen=True)
class CheckOptions:
    """`rsafe-proxy check`'s command line, read once."""

    text: str
    side: Side = Side.INPUT
    prompt: str | None = None
    policy: str | None = None
    json: bool = False
    config: str | None = None

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> CheckOptions:
        """The options of a parsed `rsafe-proxy check` command line."""
        return cls(args.text, Side(args.side), args.prompt, args.policy, args.json, args.config)


async def _check(options: CheckOptions) -> int:
    from rsafe_proxy.guard.engine import GuardEngineError
    from rsafe_proxy.runtime import build_engine, build_screener

    settings = load_settings(options.config)
    policy = _policy(options.policy, settings)
    side = options.side
    engine = build_engine(settings.guard)
    try:
        # the model loads first, timed apart, so that the verdict's latency is the verdict's alone
        started = time.perf_counter()
        await engine.start()
        load_s = time.perf_counter() - started
        screener = build_screener(settings.guard, engine)
        prompt, response = (options.prompt or "", options.text) if side is Side.OUTPUT else (options.text, None)
        started = time.perf_counter()
        verdict = await screener.screen(policy, side, prompt, response)
        verdict_s = time.perf_counter() - started
    except GuardEngineError as error:
        print(f"rsafe-proxy: the guard could not judge the text: {error}", file=sys.stderr)
        return CHECK_ERROR
    finally:
        await engine.aclose()
    decision = decide(policy, side, verdict)
    if options.json:
        print(
            json.dumps(
                {
                    "verdict": verdict.label.value,
                    "action": decision.outcome.value,
                    "categories": list(decision.categories),
                    "policy": policy.id,
                    "policy_version": policy.version,
                    "engine": engine.name,
                    "unsafe_probability": verdict.unsafe_probability,
                    "seconds": round(verdict_s, 3),
                    "load_seconds": round(load_s, 3),
                    "reasoning": verdict.reasoning,
                    "error": verdict.error,
                }
            )
        )
    else:
        print(f"verdict:    {verdict.label.value}")
        print(f"action:     {decision.outcome.value}")
        print(f"categories: {', '.join(decision.categories) or '-'}")
        print(f"policy:     {policy.id}@{policy.version}")
        print(f"engine:     {engine.name}   verdict in {verdict_s:.2f} s   (model load {load_s:.2f} s, not counted)")
        if verdict.error:
            print(f"error:      {verdict.error}")
        print(f"reasoning:  {verdict.reasoning or '-'}")
    return _CHECK_STATUS.get(verdict.label, CHECK_ERROR) if verdict.error is None else CHECK_ERROR


def cmd_check(args: argparse.Namespace) -> int:
    return asyncio.run(_check(CheckOptions.from_namespace(args)))


def cmd_policy_validate(args: argparse.Namespace) -> int:
    failed = 0
    for path in args.files:
        try:
            policy = load_policy(path)
        except FileInvalid as error:
            failed += 1
            for problem in error.problems:
                print(problem, file=sys.stderr)
            continue
        print(f"{path}: ok ({policy.id}, {len(policy.categories)} categories, version {policy.version})")
    return 1 if failed else 0


def cmd_policy_schema(args: argparse.Namespace) -> int:
    from rsafe_proxy.policy.jsonschema import schema_text

    if args.output:
        Path(args.output).write_text(schema_text(), encoding="utf-8")
        print(f"wrote the policy JSON Schema to {args.output}", file=sys.stderr)
    else:
        print(schema_text(), end="")
    return 0


async def _policy_test(file: str, config: str | None) -> int:
    from rsafe_proxy.runtime import build_engine, build_screener

    settings = load_settings(config)
    policy = load_policy(file)
    if not policy.examples:
        print(f"{file}: no examples to run")
        return 0
    engine = build_engine(settings.guard)
    failures = 0
    if engine.info.loads_model:
        # loading takes seconds (minutes on the first run): say so rather than sit silent
        print(f"loading the guard model ({engine.name})...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        await engine.start()
        print(f"guard ready in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    print(f"{'result':<6} {'side':<6} {'expected':<8} {'verdict':<8} {'action (categories)':<24} text")
    try:
        screener = build_screener(settings.guard, engine)
        for example in policy.examples:
            if example.side is Side.OUTPUT:
                verdict = await screener.screen(policy, example.side, example.prompt or "", example.text)
            else:
                verdict = await screener.screen(policy, example.side, example.text)
            ok = verdict.label.value == example.expected
            failures += not ok
            text = _shortened(" ".join(example.text.split()), _TEXT_WIDTH)
            result = "PASS" if ok else "FAIL"
            # the action shows what the categories named in the reasoning make of the verdict
            decision = decide(policy, example.side, verdict)
            action = decision.outcome.value + (f" ({','.join(decision.categories)})" if decision.categories else "")
            label, side = verdict.label.value, example.side.value
            print(f"{result:<6} {side:<6} {example.expected:<8} {label:<8} {action:<24} {text}")
    finally:
        await engine.aclose()
    print(f"{len(policy.examples) - failures}/{len(policy.examples)} examples pass ({policy.id}@{policy.version})")
    return 1 if failures else 0


def _shortened(text: str, width: int) -> str:
    """`text` cut to `width` characters, an ellipsis showing where it was cut."""
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


def cmd_policy_test(args: argparse.Namespace) -> int:
    return asyncio.run(_policy_test(args.file, args.config))


def cmd_decisions(args: argparse.Namespace) -> int:
    from rsafe_proxy.audit.command import run_decisions

    return run_decisions(args)


async def _eval(options: EvalOptions) -> int:
    from rsafe_proxy.eval_command import read_datasets, run_eval, start_engine
    from rsafe_proxy.runtime import build_engine, build_screener, guard_description

    # the data first (the options hold that the files and output folders exist): a bad row is an error before
    # the model loads
    datasets = read_datasets(options)
    settings = load_settings(options.config)
    policy = _policy(options.policy, settings)
    engine = build_engine(settings.guard)
    try:
        await start_engine(engine, guard_description(settings.guard, engine))  # loaded before any row's clock starts
        return await run_eval(build_screener(settings.guard, engine), policy, datasets, options)
    finally:
        await engine.aclose()


def cmd_eval(args: argparse.Namespace) -> int:
    from rsafe_proxy.eval_options import EvalOptions

    return asyncio.run(_eval(EvalOptions.from_namespace(args)))


def cmd_train(args: argparse.Namespace) -> int:
    from rsafe_proxy.train.command import run_train

    EMBEDDED.require("rsafe-proxy train")  # TRL is imported later, once the options are checked

    return run_train(args)


def cmd_train_head(args: argparse.Namespace) -> int:
    from rsafe_proxy.train.head import run_command

    EMBEDDED.require("rsafe-proxy train-head")

    return run_command(args)


def parser() -> argparse.ArgumentParser:
    """The command line. Every argument carries help (tests/test_first_hour.py holds it to that, and the
    README's command list to it)."""
    top = argparse.ArgumentParser(
        prog="rsafe-proxy",
        description="An OpenAI-compatible proxy that screens prompts and answers with an RSafe guard.",
    )
    top.add_argument("--version", action="version", version=f"rsafe-proxy {version()}")
    config_help = "proxy.yaml (default: ./proxy.yaml, else the packaged default)"
    top.add_argument("--config", help=config_help)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, help=config_help)
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", parents=[common], help="run the proxy")
    serve.add_argument("--host", help="address to listen on (default: server.host, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default: server.port, 8080)")
    serve.add_argument(
        "--workers",
        type=at_least_one,
        metavar="N",
        help="worker processes sharing the port (default: server.workers, 1; RSAFE_WORKERS in the default proxy.yaml)",
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="least severe messages logged (default: %(default)s)",
    )
    serve.add_argument(
        "--log-format",
        default="text",
        choices=LOG_FORMATS,
        help="text lines, or one JSON object a line for a log collector (default: %(default)s)",
    )
    serve.set_defaults(run=cmd_serve)

    check = commands.add_parser(
        "check",
        parents=[common],
        help="screen one text with the configured guard and print the verdict",
        description="Screen one text with the configured guard. Exit status: 0 safe, 1 unsafe, 2 error (the "
        "guard could not judge it, or the configuration is invalid).",
    )
    check.add_argument("text", help="the text to screen (a prompt; with --side output, an answer)")
    check.add_argument(
        "--side", choices=["input", "output"], default="input", help="screen as a prompt or as an answer"
    )
    check.add_argument("--prompt", help="with --side output: the user prompt the text answers")
    check.add_argument("--policy", help="a policy file (default: the first tenant's policy)")
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.set_defaults(run=cmd_check)

    policy = commands.add_parser(
        "policy", parents=[common], help="validate policy files, print their JSON Schema, run their examples"
    ).add_subparsers(dest="policy_command", required=True, metavar="SUBCOMMAND")
    validate = policy.add_parser("validate", parents=[common], help="check policy files; every problem with its line")
    validate.add_argument("files", nargs="+", metavar="FILE", help="policy YAML files")
    validate.set_defaults(run=cmd_policy_validate)
    schema = policy.add_parser("schema", parents=[common], help="print the policy JSON Schema (for editors)")
    schema.add_argument("--output", metavar="FILE", help="write the schema to FILE instead of printing it")
    schema.set_defaults(run=cmd_policy_schema)
    test = policy.add_parser("test", parents=[common], help="run a policy's examples against the configured guard")
    test.add_argument("file", metavar="FILE", help="the policy file whose examples run")
    test.set_defaults(run=cmd_policy_test)

    from rsafe_proxy.audit.command import add_decisions_arguments

    decisions = commands.add_parser(
        "decisions",
        parents=[common],
        help="print screening decisions from the audit log, filtered",
        description="Screening decisions from the audit log (audit.url): the latest that match, oldest first. Needs "
        "only the audit: section of proxy.yaml (no upstream or guard variables). Exit status 0, also when none "
        "match; 2 when the audit log cannot be read.",
    )
    add_decisions_arguments(decisions)
    decisions.set_defaults(run=cmd_decisions)
    from rsafe_proxy.eval_options import add_eval_arguments
    from rsafe_proxy.train.command import add_train_arguments

    evaluate = commands.add_parser(
        "eval", parents=[common], help="measure the configured guard on labelled JSONL datasets"
    )
    add_eval_arguments(evaluate)
    evaluate.set_defaults(run=cmd_eval)

    train = commands.add_parser("train", parents=[common], help="train a guard (SFT warm-up, then GRPO) with LoRA")
    add_train_arguments(train)
    train.set_defaults(run=cmd_train)

    from rsafe_proxy.train.head import add_arguments as add_head_arguments

    head = commands.add_parser(
        "train-head", parents=[common], help="train the embedded guard's verdict head on the model's hidden states"
    )
    add_head_arguments(head)
    head.set_defaults(run=cmd_train_head)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `rsafe-proxy` console script."""
    if not logging.getLogger().handlers:  # as logging.basicConfig: a host (a test runner) may have set it up
        configure_logs("text", "info")
    args = parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except FileInvalid as error:
        for problem in error.problems:
            print(f"rsafe-proxy: {problem}", file=sys.stderr)
        return 2
    except (ValueError, ImportError) as error:
        print(f"rsafe-proxy: {error}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    raise SystemExit(main())
