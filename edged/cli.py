"""`edged` command line: ask, model info, model export."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from edged import __version__
from edged.config.models import DEFAULT_SYSTEM_PROMPT

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
DEFAULT_CONFIG = Path("/etc/edged/edged.yaml")


def _add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="edged model directory")
    parser.add_argument("--threads", type=int, default=0, help="inference threads (0 = all cores)")
    parser.add_argument("--context", type=int, default=2048, help="KV cache size in tokens")
    parser.add_argument(
        "--no-verify", action="store_true", help="skip the sha256 check of the model files"
    )


def _add_layer_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--node-config",
        type=Path,
        default=None,
        help="node-local override file, above the fleet file",
    )
    parser.add_argument("--node-id", default=None, help="which entry of the fleet's nodes: to use")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one key, e.g. --set mqtt.port=8883 (repeatable)",
    )
    parser.add_argument(
        "--board-root", type=Path, default=Path("/"), help=argparse.SUPPRESS
    )  # for tests: a fake /proc and /etc


def _resolve(args: argparse.Namespace) -> Any:
    from edged.config.layers import resolve

    path = args.file if args.command == "config" else args.config
    return resolve(
        path,
        node_file=args.node_config,
        flags=args.set,
        node_id=args.node_id,
        board_root=args.board_root,
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edged", description=__doc__)
    parser.add_argument("--version", action="version", version=f"edged {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_ask_parser(sub)
    run = sub.add_parser("run", help="run the daemon (MQTT service)")
    run.add_argument(
        "--config", required=True, type=Path, help="YAML config: a single-node file or a fleet file"
    )
    _add_layer_arguments(run)
    demo = sub.add_parser("demo", help="a private broker, the daemon and simulated wearables")
    demo.add_argument(
        "--model", type=Path, default=None, help="model directory (default: the bundled model)"
    )
    demo.add_argument("--seconds", type=float, default=60.0, help="give up after this long")
    _add_config_parser(sub)
    _add_model_parser(sub)
    _add_doctor_parser(sub)
    return parser


def _add_ask_parser(sub: Any) -> None:
    ask = sub.add_parser("ask", help="answer one question on the terminal, streaming")
    _add_engine_arguments(ask)
    ask.add_argument("question", help="the question")
    ask.add_argument(
        "--vitals",
        default=None,
        metavar="JSON",
        help="the wearer's vitals: one summary or a list, as on the MQTT vitals topic "
        '(e.g. \'{"spo2": 89, "resp_rate": 24}\'; ts optional): the prompt gets the daemon\'s '
        "vitals block and triage, and the triage and escalation are printed",
    )
    ask.add_argument("--system", default=DEFAULT_SYSTEM_PROMPT, help="system prompt")
    ask.add_argument("--max-tokens", type=int, default=256)
    ask.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ask.add_argument("--top-k", type=int, default=0)
    ask.add_argument("--top-p", type=float, default=1.0)
    ask.add_argument("--repetition-penalty", type=float, default=1.0)
    ask.add_argument("--seed", type=int, default=None)
    ask.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ask.add_argument(
        "--think",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="let a thinking model reason first (default: the template's default)",
    )
    ask.add_argument(
        "--reasoning-budget", type=int, default=None, help="max tokens inside <think>…</think>"
    )
    ask.add_argument("--json", action="store_true", help="print the result as JSON at the end")


def _add_config_parser(sub: Any) -> None:
    config = sub.add_parser("config", help="check or show a config file")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser("check", help="validate; exit 2 with one line per problem")
    check.add_argument("file", type=Path, nargs="?", default=DEFAULT_CONFIG)
    _add_layer_arguments(check)
    show = config_sub.add_parser("show", help="print the config with every default filled in")
    show.add_argument("file", type=Path, nargs="?", default=DEFAULT_CONFIG)
    show.add_argument(
        "--resolved", action="store_true", help="one line per key with the layer it came from"
    )
    _add_layer_arguments(show)


def _add_model_parser(sub: Any) -> None:
    model = sub.add_parser("model", help="model directories: info, export")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    info = model_sub.add_parser("info", help="print a model directory's manifest and layout")
    info.add_argument("model_dir", type=Path)
    info.add_argument("--json", action="store_true")
    _add_eval_parser(model_sub)
    export = model_sub.add_parser("export", help="Hugging Face checkpoint -> edged model directory")
    try:
        from edged.export.cli import add_export_arguments
    except ImportError:  # the export module is optional at runtime
        export.add_argument("args", nargs=argparse.REMAINDER)
    else:
        add_export_arguments(export)


def _add_doctor_parser(sub: Any) -> None:
    doctor = sub.add_parser(
        "doctor",
        help="check the CPU, cores, memory, sensors, broker, state directory and model; "
        "exit 1 when something will not work",
    )
    doctor.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"YAML config: a single-node file or a fleet file (default: {DEFAULT_CONFIG} "
        "when it exists)",
    )
    doctor.add_argument(
        "--model", type=Path, default=None, help="model directory instead of model.path"
    )
    doctor.add_argument("--json", action="store_true", help='one JSON object {"ok", "checks"}')
    doctor.add_argument(
        "--no-speed", dest="speed", action="store_false", help="skip the short measured decode"
    )
    _add_layer_arguments(doctor)


def _add_eval_parser(model_sub: Any) -> None:
    ev = model_sub.add_parser(
        "eval", help="perplexity, multiple choice, agreement and answer checks for a model dir"
    )
    ev.add_argument("model_dir", type=Path)
    ev.add_argument(
        "--data",
        type=Path,
        action="append",
        default=None,
        help="JSONL of dialogues, MCQ items or texts (repeatable; default: the bundled set)",
    )
    ev.add_argument("--reference", type=Path, default=None, help="model dir to compare with")
    ev.add_argument("--limit", type=int, default=None, help="at most this many rows per file")
    ev.add_argument(
        "--no-generate",
        dest="generate",
        action="store_false",
        help="skip generating answers to dialogues (scores only)",
    )
    ev.add_argument("--max-new-tokens", type=int, default=160)
    ev.add_argument("--threads", type=int, default=0, help="inference threads (0 = all cores)")
    ev.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")


def _setup_logging(verbosity: int, command: str) -> None:
    quiet = logging.INFO if command == "run" else logging.WARNING
    level = quiet if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    from edged.service.journal import setup_logging

    setup_logging(level)


def _load_engine(args: argparse.Namespace) -> Any:
    from edged.engine import Engine, EngineOptions

    return Engine.load(
        args.model,
        EngineOptions(
            threads=args.threads, context_length=args.context, verify_hashes=not args.no_verify
        ),
    )


def cmd_ask(args: argparse.Namespace) -> int:
    from edged.engine import GenerationConfig

    engine = _load_engine(args)
    config = GenerationConfig(
        max_new_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
        reasoning_budget=args.reasoning_budget,
    )
    messages = [{"role": "system", "content": args.system}] if args.system else []
    question, grounding = args.question, None
    if args.vitals is not None:
        question, grounding = _grounded_question(args.question, args.vitals, engine)
    messages.append({"role": "user", "content": question})

    def show(delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    result = engine.chat(messages, config, enable_thinking=args.think, on_text=show)
    sys.stdout.write("\n")
    sys.stdout.flush()  # the answer before the notes on stderr, also when both are piped
    if grounding is not None:
        print(_guard_note(result.text, *grounding), file=sys.stderr)
    t = result.timing
    print(
        f"[{result.finish_reason}] prompt {result.prompt_tokens} tok, answer "
        f"{result.completion_tokens} tok, first token {t.first_token_ms or 0:.0f} ms, "
        f"decode {t.decode_tps or 0:.1f} tok/s, {engine.threads} threads",
        file=sys.stderr,
    )
    if args.json:
        print(
            json.dumps(
                {
                    "text": result.text,
                    "reasoning": result.reasoning,
                    "finish_reason": result.finish_reason,
                    "prompt_tokens": result.prompt_tokens,
                    "completion_tokens": result.completion_tokens,
                    "timing_ms": {"first_token": t.first_token_ms, "total": t.total_ms},
                },
                ensure_ascii=False,
            )
        )
    return EXIT_OK


def _grounded_question(question: str, vitals_json: str, engine: Any) -> tuple[str, tuple[Any, Any]]:
    """The user turn the daemon would build from these vitals, and (triage, clinical config)
    for the guard."""
    import time

    from edged.clinical.advice import grounded_question
    from edged.clinical.triage import assess
    from edged.config.models import ClinicalConfig
    from edged.mqtt.errors import ProtocolError
    from edged.mqtt.messages import parse_vitals

    try:
        data = json.loads(vitals_json)
        summaries = data if isinstance(data, list) else [data]
        now = time.time()
        window = [parse_vitals({"ts": now, **s}, now=now) for s in summaries]
    except (ValueError, TypeError) as exc:
        raise ValueError(f"--vitals is not a JSON object or list of objects: {exc}") from None
    except ProtocolError as exc:
        raise ValueError(f"--vitals: {exc.message}") from None
    cfg = ClinicalConfig()
    triage = assess(window, cfg.red_flags)
    return grounded_question(question, window, triage, cfg, engine.count_tokens), (triage, cfg)


def _guard_note(answer: str, triage: Any, cfg: Any) -> str:
    """What the daemon's guard adds to this answer: the triage, the escalation when due, and
    whether the answer contradicted the triage (the daemon then puts the escalation first)."""
    from edged.clinical.advice import guard, triage_line

    guarded = guard(triage, answer, cfg)
    note = f"triage: {triage_line(triage)}"
    if guarded.contradiction is not None:
        phrases = ", ".join(repr(p) for p in guarded.contradiction.phrases)
        note += f"\nguard: the answer contradicts the triage ({phrases}): escalation first"
    if guarded.escalation:
        note += f"\nescalation (attached by the daemon's guard): {guarded.escalation}"
    return note


def cmd_model_info(args: argparse.Namespace) -> int:
    from edged.engine import Engine, EngineOptions
    from edged.engine.manifest import read_manifest, verify_files

    manifest = read_manifest(args.model_dir)
    sizes = {
        rel: (args.model_dir / rel).stat().st_size
        for rel in manifest.files
        if (args.model_dir / rel).is_file()
    }
    try:
        verify_files(args.model_dir, manifest)
        integrity, status = "ok: every file matches its sha256", EXIT_OK
    except Exception as exc:
        # Still print what can be read: the manifest says what the files should have been.
        integrity, status = f"FAILED: {exc}", EXIT_FAIL
    engine = Engine.load(args.model_dir, EngineOptions(threads=1, verify_hashes=False))
    info = {
        "manifest": manifest.to_json(),
        "size_mb": round(sum(sizes.values()) / 2**20, 2),
        "integrity": integrity,
        "graph": engine.layout.describe(),
        "kv_bytes_per_token": engine.layout.kv_bytes_per_token(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return status
    m = manifest
    q = m.quantization
    print(f"name:          {m.name}")
    if m.description:
        print(f"description:   {m.description}")
    print(f"source:        {m.source}")
    print(f"architecture:  {m.architecture} (exporter: {m.exporter})")
    print(
        f"quantization:  {q.method}"
        + (
            f" (block {q.block_size}, {'symmetric' if q.symmetric else 'asymmetric'}, "
            f"accuracy_level {q.accuracy_level}, lm_head {q.lm_head}, embedding {q.embedding})"
            if q.method == "int4"
            else ""
        )
    )
    print(f"context:       {m.context_length} tokens; eos ids {list(m.eos_token_ids)}")
    print(
        f"reasoning:     {m.reasoning.start}…{m.reasoning.end}"
        if m.reasoning
        else "reasoning:     none"
    )
    layout = engine.layout.describe()
    print("graph:         " + ", ".join(f"{k} {v}" for k, v in layout.items()))
    print(f"KV cache:      {engine.layout.kv_bytes_per_token() / 1024:.1f} KiB per token")
    for key, value in m.verification.items():
        print(f"verification:  {key} = {json.dumps(value)}")
    print(f"tools:         {', '.join(f'{k} {v}' for k, v in m.tools.items())}")
    print(f"size:          {info['size_mb']} MB in {len(sizes)} files")
    for rel, size in sorted(sizes.items()):
        print(f"  {rel:<28} {size / 2**20:9.2f} MB  sha256 {m.files[rel][:16]}…")
    print(f"integrity:     {integrity}")
    return status


def cmd_model_eval(args: argparse.Namespace) -> int:
    from edged.engine import Engine, EngineOptions
    from edged.eval import datasets
    from edged.eval.harness import EvalOptions, run
    from edged.eval.table import render

    files = args.data or list(datasets.DEFAULT_FILES)
    try:
        rows = [r for path in files for r in datasets.load([path])[: args.limit]]
    except datasets.EvalDataError as exc:
        print(f"edged: {exc}", file=sys.stderr)
        return EXIT_USAGE
    options = EngineOptions(threads=args.threads, context_length=2048)
    engine = Engine.load(args.model_dir, options)
    reference = Engine.load(args.reference, options) if args.reference else None
    opts = EvalOptions(generate=args.generate, max_new_tokens=args.max_new_tokens)
    report = run(engine, rows, files, reference, opts, progress=True)
    print(render(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return EXIT_OK


def cmd_model_export(args: argparse.Namespace) -> int:
    try:
        from edged.export.cli import run_export
    except ImportError as exc:
        print(
            f"edged: model export needs the export extra: pip install 'edged[export]' ({exc})",
            file=sys.stderr,
        )
        return EXIT_FAIL
    return int(run_export(args))


def cmd_run(args: argparse.Namespace) -> int:
    from edged.config import ConfigError
    from edged.service.runner import run_daemon

    try:
        resolved = _resolve(args)
    except ConfigError as exc:
        print(f"edged: {exc}", file=sys.stderr)
        return EXIT_USAGE
    config = resolved.config
    for warning in resolved.warnings:
        print(f"edged: warning: {warning}", file=sys.stderr)
    # A state dir that cannot be used does not stop the start: the daemon serves degraded and
    # logs why, once, with where the answers go instead (edged.service.store_place); `config
    # check` and `edged doctor` report it too.
    if args.verbose == 0:
        logging.getLogger().setLevel(config.log_level.upper())
    return run_daemon(config, load=lambda: _resolve(args).config)


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from edged.config import ConfigError, check_config
    from edged.config.layers import render_resolved

    try:
        resolved = _resolve(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    config = resolved.config
    for warning in resolved.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.config_command == "check":
        problems = check_config(config, str(args.file), resolved.key_lines)
        for line in problems:
            print(line, file=sys.stderr)
        if problems:
            return EXIT_USAGE
        print(f"{args.file}: ok")
        return EXIT_OK
    if args.resolved:
        print(render_resolved(resolved), end="")
        return EXIT_OK
    data = config.model_dump(mode="json")
    if data["mqtt"].get("password") is not None:
        data["mqtt"]["password"] = "********"  # secrets never go to a terminal or a ticket
    print(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), end="")
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    from edged.doctor import run_checks
    from edged.doctor.checks import passed, render_json, render_table

    checks = run_checks(_doctor_options(args))
    print(render_json(checks) if args.json else render_table(checks))
    return EXIT_OK if passed(checks) else EXIT_FAIL


def _doctor_options(args: argparse.Namespace) -> Any:
    """The config as `config check` sees it, its problems as lines (a check, not an exit)."""
    from edged.config import ConfigError, check_config
    from edged.doctor import DoctorOptions

    if args.config is None and DEFAULT_CONFIG.is_file():
        args.config = DEFAULT_CONFIG
    config, problems = None, []
    if args.config is not None:
        try:
            resolved = _resolve(args)
        except ConfigError as exc:
            problems = str(exc).splitlines()
        else:
            config = resolved.config
            problems = check_config(config, str(args.config), resolved.key_lines)
            # The doctor's own state_dir check writes a probe file: it says it better.
            problems = [p for p in problems if "delivery.state_dir = " not in p]
            problems += [f"warning: {w}" for w in resolved.warnings]
    root = args.board_root
    if config is not None and root == Path("/"):
        root = config.governor.sensor_root
    return DoctorOptions(
        config=config,
        config_source=str(args.config) if args.config is not None else None,
        config_problems=tuple(problems),
        model_dir=args.model,
        root=root,
        measure_speed=args.speed,
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from edged.demo import run_demo

    return run_demo(args.model, args.seconds)


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, args.command)
    from edged.engine import ContextFullError, ModelDirError

    handlers = {
        "ask": cmd_ask,
        "run": cmd_run,
        "demo": cmd_demo,
        "config": cmd_config,
        "doctor": cmd_doctor,
        "model": lambda a: {
            "info": cmd_model_info,
            "export": cmd_model_export,
            "eval": cmd_model_eval,
        }[a.model_command](a),
    }
    try:
        return int(handlers[args.command](args))
    except (ModelDirError, ContextFullError, ValueError) as exc:
        print(f"edged: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, ValueError) else EXIT_FAIL
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `edged model info | head`: the reader left. Python would print a traceback when it
        # flushes stdout at exit; point stdout at /dev/null so it stays quiet (Python docs,
        # "Note on SIGPIPE").
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
