"""rsafe-proxy serve | check | policy validate/schema/test | decisions | eval | train."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from rsafe_proxy.config import Settings, load_settings
from rsafe_proxy.guard.protocol import Side
from rsafe_proxy.policy.decide import decide
from rsafe_proxy.policy.loading import load_policy, resolve_policy_path
from rsafe_proxy.policy.schema import Policy
from rsafe_proxy.yamlsource import FileInvalid


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def _policy(args: argparse.Namespace, settings: Settings) -> Policy:
    if getattr(args, "policy", None):
        return load_policy(args.policy)
    tenant = settings.tenants[0]
    return load_policy(resolve_policy_path(tenant.policy, Path(settings.base_dir)))


def cmd_serve(args: argparse.Namespace) -> int:
    from rsafe_proxy.app import build_app
    from rsafe_proxy.server import serve

    settings = _settings(args)
    host = args.host or settings.server.host
    port = args.port if args.port is not None else settings.server.port
    serve(settings, build_app(settings), host=host, port=port, log_level=args.log_level)
    return 0


async def _check(args: argparse.Namespace) -> int:
    from rsafe_proxy.runtime import build_engine, build_screener

    settings = _settings(args)
    policy = _policy(args, settings)
    side = Side(args.side)
    engine = build_engine(settings.guard)
    try:
        screener = build_screener(settings.guard, engine)
        prompt, response = (args.prompt or "", args.text) if side is Side.OUTPUT else (args.text, None)
        verdict = await screener.screen(policy, side, prompt, response)
    finally:
        await engine.aclose()
    decision = decide(policy, side, verdict)
    if args.json:
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
                    "seconds": round(verdict.seconds, 3),
                    "reasoning": verdict.reasoning,
                    "error": verdict.error,
                }
            )
        )
    else:
        print(f"verdict:    {verdict.label.value}")
        print(f"action:     {decision.outcome.value}")
        print(f"categories: {', '.join(decision.categories) or '-'}")
        print(f"policy:     {policy.id}@{policy.version}   engine: {engine.name}   {verdict.seconds:.2f} s")
        if verdict.error:
            print(f"error:      {verdict.error}")
        print(f"reasoning:  {verdict.reasoning or '-'}")
    return 0 if verdict.error is None else 1


def cmd_check(args: argparse.Namespace) -> int:
    return asyncio.run(_check(args))


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
    print(json.dumps(Policy.model_json_schema(), indent=2))
    return 0


async def _policy_test(args: argparse.Namespace) -> int:
    from rsafe_proxy.runtime import build_engine, build_screener

    settings = _settings(args)
    policy = load_policy(args.file)
    if not policy.examples:
        print(f"{args.file}: no examples to run")
        return 0
    engine = build_engine(settings.guard)
    failures = 0
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
            text = " ".join(example.text.split())[:70]
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


def cmd_policy_test(args: argparse.Namespace) -> int:
    return asyncio.run(_policy_test(args))


_DECISION_COLUMNS = (("rsafe.side", 6), ("rsafe.verdict", 7), ("rsafe.action", 17))


def cmd_decisions(args: argparse.Namespace) -> int:
    from rsafe_proxy.telemetry import read_decisions

    settings = _settings(args)
    path = args.file or settings.telemetry.spans_file
    if not path:
        print("telemetry.spans_file is not set: decisions go only to OTLP", file=sys.stderr)
        return 1
    spans_path = Path(path) if Path(path).is_absolute() or args.file else Path(settings.base_dir) / path
    if not spans_path.is_file():
        print(f"no decisions recorded yet in {spans_path}", file=sys.stderr)
        return 1
    rows = list(read_decisions(str(spans_path)))[-args.last :]
    for span in rows:
        attrs = span.get("attributes", {})
        categories = ",".join(attrs.get("rsafe.categories", [])) or "-"
        policy = f"{attrs.get('rsafe.policy.id', '')}@{attrs.get('rsafe.policy.version', '')}"
        cells = [str(span.get("start_time", ""))[:19], str(attrs.get("rsafe.tenant", "-")).ljust(10)]
        cells += [str(attrs.get(key, "-")).ljust(width) for key, width in _DECISION_COLUMNS]
        print("  ".join([*cells, categories.ljust(10), policy]))
    return 0


async def _eval(args: argparse.Namespace) -> int:
    from rsafe_proxy.eval_command import run_eval
    from rsafe_proxy.runtime import build_engine, build_screener

    settings = _settings(args)
    policy = _policy(args, settings)
    engine = build_engine(settings.guard)
    try:
        return await run_eval(build_screener(settings.guard, engine), policy, args)
    finally:
        await engine.aclose()


def cmd_eval(args: argparse.Namespace) -> int:
    return asyncio.run(_eval(args))


def cmd_train(args: argparse.Namespace) -> int:
    from rsafe_proxy.train.command import run_train

    return run_train(args)


def parser() -> argparse.ArgumentParser:
    """The command line."""
    top = argparse.ArgumentParser(
        prog="rsafe-proxy",
        description="An OpenAI-compatible proxy that screens prompts and answers with an RSafe guard.",
    )
    config_help = "proxy.yaml (default: ./proxy.yaml, else the packaged default)"
    top.add_argument("--config", help=config_help)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, help=config_help)
    commands = top.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", parents=[common], help="run the proxy")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(run=cmd_serve)

    check = commands.add_parser(
        "check", parents=[common], help="screen one text with the configured guard and print the verdict"
    )
    check.add_argument("text")
    check.add_argument("--side", choices=["input", "output"], default="input")
    check.add_argument("--prompt", help="with --side output: the user prompt the text answers")
    check.add_argument("--policy", help="a policy file (default: the first tenant's policy)")
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.set_defaults(run=cmd_check)

    policy = commands.add_parser(
        "policy", parents=[common], help="validate, describe and test policy files"
    ).add_subparsers(dest="policy_command", required=True)
    validate = policy.add_parser("validate", parents=[common], help="check policy files; every problem with its line")
    validate.add_argument("files", nargs="+")
    validate.set_defaults(run=cmd_policy_validate)
    schema = policy.add_parser("schema", parents=[common], help="print the policy JSON Schema (for editors)")
    schema.set_defaults(run=cmd_policy_schema)
    test = policy.add_parser("test", parents=[common], help="run a policy's examples against the configured guard")
    test.add_argument("file")
    test.set_defaults(run=cmd_policy_test)

    decisions = commands.add_parser(
        "decisions", parents=[common], help="print the latest screening decisions from the spans file"
    )
    decisions.add_argument("--file", help="spans file (default: telemetry.spans_file)")
    decisions.add_argument("--last", type=int, default=20)
    decisions.set_defaults(run=cmd_decisions)
    from rsafe_proxy.eval_command import add_eval_arguments
    from rsafe_proxy.train.command import add_train_arguments

    evaluate = commands.add_parser(
        "eval", parents=[common], help="measure the configured guard on labelled JSONL datasets"
    )
    add_eval_arguments(evaluate)
    evaluate.set_defaults(run=cmd_eval)

    train = commands.add_parser("train", parents=[common], help="train a guard (SFT warm-up, then GRPO) with LoRA")
    add_train_arguments(train)
    train.set_defaults(run=cmd_train)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `rsafe-proxy` console script."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
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
