#!/usr/bin/env python3
"""Runs every ```console example of docs/mqtt-api.md against a live daemon, and checks or
rewrites the outputs shown under its commands.

    python tools/docs_examples.py            # --check: exit 1 and a diff when the docs drift
    python tools/docs_examples.py --write    # bring the outputs in the doc up to date

It starts a private mosquitto and `edged run` on the bundled test model with the doc's own
minimal config (the ```yaml block headed `# edged.yaml`, with the private broker's port and a
temporary state_dir), then runs each block's `$` commands for real, in order, in one bash
session per block, in a temporary working directory where `$B` holds the broker options and
`$EDGED_PID` the daemon's process id. A block that kills the daemon gets a fresh one before the
next block; `edged run` inside a block starts the daemon, as it would in a terminal.

How a block runs: its commands in sequence; a command ending in `&` runs in the background
and is followed by `sleep 0.3` (so a subscriber is subscribed before the next command
publishes); at the end the block waits for its background jobs (every one in the doc is bounded
by -C/-W). A foreground command's output goes under it; background output goes under the
block's last command, so the layout does not depend on timing. A block marked
`<!-- docs-example: skip (reason) -->` on the line above its fence is not run.

What cannot repeat is ignored when comparing (`normalise`): times (`ts`, `uptime_s`,
`timing_ms`, UNIX times in messages, the model's load time), `alert_id`, this machine's
`threads`, `mem_available_mb` and CPU `temp_c`, `decode_tps`, a `busy` reply's
`retry_after_ms`. Outputs are written as they came except for the broker port (shown as 1883),
log timestamps and the test model's `text`/`delta` (random weights: noise), shown as `…`.
"""

from __future__ import annotations

import argparse
import ctypes
import difflib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from edged.service.broker import PrivateBroker

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "mqtt-api.md"
SHOWN_PORT = 1883
BACKGROUND_PAUSE_S = 0.3
BLOCK_TIMEOUT_S = 120.0
DAEMON_STOP_TIMEOUT_S = 15.0
SKIP = re.compile(r"<!--\s*docs-example:\s*skip\s*\((.+)\)\s*-->")
FENCE = re.compile(r"^(\s*)```console\s*$")
BACKGROUND = re.compile(r"(?<![&|>])&(\s*(#.*)?)$")
MARKER = re.compile(r"\x1e(\d+)\x1e\n")
HEREDOC_OPEN = "here-document"
PR_SET_CHILD_SUBREAPER = 36
NEEDED = {"jq": "jq", "mosquitto_rr": "mosquitto-clients", "mosquitto_sub": "mosquitto-clients"}
"""Programs the doc's examples run, and the Debian package of each."""


@dataclass(frozen=True)
class Command:
    lines: tuple[str, ...]
    """As in the doc (block indentation removed): `$ ` on the first, continuation lines after."""
    output: tuple[str, ...]

    @property
    def script(self) -> str:
        return "\n".join((self.lines[0][2:], *self.lines[1:]))

    @property
    def background(self) -> bool:
        return BACKGROUND.search(self.lines[-1]) is not None


@dataclass(frozen=True)
class Block:
    number: int
    section: str
    start: int
    """Index of the opening fence line in the doc; the block's text is start+1 .. end-1."""
    end: int
    indent: str
    commands: tuple[Command, ...]
    skip: str | None

    @property
    def starts_daemon(self) -> bool:
        """Whether the block itself starts the daemon in the foreground (the doc's `Try it`)."""
        first = self.commands[0]
        return first.script.startswith("edged run") and not first.background


# --- parsing the doc ------------------------------------------------------------------------


def _is_complete(script: str) -> bool:
    """Whether bash would run `script` as it is, or wait for more lines (an open quote, a `\\`
    at the end, a `do` without `done`, a here-document without its terminator)."""
    if script.endswith("\\"):
        return False
    checked = subprocess.run(
        ["bash", "-n"], input=script + "\n", capture_output=True, text=True, timeout=10
    )
    return checked.returncode == 0 and HEREDOC_OPEN not in checked.stderr


def split_commands(lines: Sequence[str]) -> tuple[Command, ...]:
    """A console block's lines as commands, each with the output lines shown under it."""
    commands: list[tuple[list[str], list[str]]] = []
    open_command = False
    for line in lines:
        if open_command:
            commands[-1][0].append(line)
        elif line.startswith("$ "):
            commands.append(([line], []))
        elif commands:
            commands[-1][1].append(line)
        else:
            raise ValueError(f"output line {line!r} comes before any `$ ` command")
        if commands and not commands[-1][1]:
            open_command = not _is_complete(Command(tuple(commands[-1][0]), ()).script)
    if open_command:
        raise ValueError(f"command never ends: {commands[-1][0][0]!r}")
    return tuple(Command(tuple(c), tuple(o)) for c, o in commands)


def _closing_fence(doc: Sequence[str], start: int) -> int:
    return next(j for j in range(start + 1, len(doc)) if doc[j].strip() == "```")


def parse_blocks(doc: Sequence[str]) -> list[Block]:
    """The doc's ```console blocks, each under the heading of its section."""
    blocks: list[Block] = []
    section = ""
    i = 0
    while i < len(doc):
        fence = FENCE.match(doc[i])
        if doc[i].lstrip().startswith("```") and fence is None:
            i = _closing_fence(doc, i) + 1  # another language: its `#` lines are no headings
            continue
        if fence is None:
            section = doc[i].lstrip("#").strip() if doc[i].startswith("#") else section
            i += 1
            continue
        indent, end = fence.group(1), _closing_fence(doc, i)
        try:
            commands = split_commands([line[len(indent) :] for line in doc[i + 1 : end]])
        except ValueError as exc:
            raise ValueError(f"the console block at line {i + 1}: {exc}") from None
        if not commands:
            raise ValueError(f"the console block at line {i + 1} has no `$ ` command")
        skip = SKIP.search(doc[i - 1]) if i else None
        blocks.append(
            Block(len(blocks) + 1, section, i, end, indent, commands, skip and skip.group(1))
        )
        i = end + 1
    return blocks


def doc_config(doc: Sequence[str], port: int, state_dir: Path) -> str:
    """The doc's `# edged.yaml`, pointed at the private broker and a temporary state_dir."""
    text = "\n".join(doc)
    found = re.search(r"```yaml\n(# edged\.yaml\n.*?)```", text, re.S)
    if found is None:
        raise ValueError("no ```yaml block starting with `# edged.yaml` in the doc")
    config = found.group(1)
    for key, value in (("port", str(port)), ("state_dir", str(state_dir))):
        config, n = re.subn(rf"(?m)^(\s+{key}:) .*$", rf"\g<1> {value}", config)
        if n != 1:
            raise ValueError(f"the doc's edged.yaml has {n} `{key}:` lines; expected 1")
    return config


# --- what is shown, what is compared ---------------------------------------------------------

_JSON_STRING = r'"(?:[^"\\]|\\.)*"'
_NUMBER = r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"


def present(output: str, port: int) -> str:
    """Live output as the doc shows it: the private broker's port as 1883, log timestamps and
    the test model's noise as `…`."""
    output = re.sub(rf"(?<=:){port}(?!\d)|(?<=-p ){port}(?!\d)", str(SHOWN_PORT), output)
    output = re.sub(r"(?m)^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", "… ", output)
    return re.sub(rf'("(?:text|delta)":\s*){_JSON_STRING}', r'\1"…"', output)


def _mask_timing(found: re.Match[str]) -> str:
    return re.sub(_NUMBER, "…", found.group(0))


_VOLATILE: tuple[tuple[str, str | Callable[[re.Match[str]], str]], ...] = (
    (rf'("(?:text|delta)":\s*){_JSON_STRING}', r'\1"…"'),
    (rf'("(?:ts|uptime_s|mem_available_mb|threads|retry_after_ms)":\s*){_NUMBER}', r"\1…"),
    (rf'("decode_tps":\s*)(?:null|{_NUMBER})', r"\1…"),
    # the CPU's temperature in a status (a null without a thermal zone), not a NEWS2 component
    (rf'("temp_c":\s*)(?:null|{_NUMBER})(?=,\s*"mem_available_mb")', r"\1…"),
    (rf'("alert_id":\s*){_JSON_STRING}', r'\1"…"'),
    (r'"timing_ms":\s*\{[^{}]*\}', _mask_timing),
    (r"(?<!\d)1[6-9]\d{8}(?![\d.])", "…"),  # a UNIX time of 2020..2033, e.g. the ts bound
    (r"\b\d+ threads\b", "… threads"),
    (r"loaded in \d+(?:\.\d+)? s", "loaded in … s"),
    (r"(?m)^(burst-\d+ busy) \d+$", r"\1 …"),  # the Backpressure example's retry_after_ms
    # how far a generation got before its cancel or deadline: a matter of milliseconds
    (r'("finish_reason":\s*"(?:cancelled|deadline)"[^\n]*?"completion_tokens":\s*)\d+', r"\1…"),
)


def normalise(text: str) -> str:
    """`text` with every value that differs from run to run (or machine to machine) as `…`."""
    for pattern, replacement in _VOLATILE:
        text = re.sub(pattern, replacement, text)
    return text


def render(block: Block, outputs: Sequence[Sequence[str]]) -> list[str]:
    """The block's text (inside its fences) with `outputs[i]` under command i."""
    lines: list[str] = []
    for command, output in zip(block.commands, outputs, strict=True):
        lines += [*command.lines, *output]
    return [block.indent + line if line else "" for line in lines]


def _normalised(outputs: Sequence[Sequence[str]]) -> list[list[str]]:
    return [normalise("\n".join(output)).split("\n") if output else [] for output in outputs]


def drift(block: Block, outputs: Sequence[Sequence[str]]) -> list[str]:
    """A unified diff of the doc's block against the live one, outputs after `normalise`; []
    when they agree."""
    doc = render(block, _normalised([c.output for c in block.commands]))
    live = render(block, _normalised(outputs))
    where = f"{DOC.name} block {block.number} ({block.section}), line {block.start + 2}"
    return list(difflib.unified_diff(doc, live, f"{where}: doc", f"{where}: live", lineterm=""))


# --- running a block ------------------------------------------------------------------------

# `edged run` in a block runs the real daemon with its log in a file; backgrounded, it becomes
# the job itself so that $! is the daemon's pid; in the foreground it behaves like a terminal
# that shows the log until the node is ready, and leaves the daemon running for the next block.
PRELUDE = r"""
EDGED_PID=$(cat "$_DOCS_PIDFILE" 2>/dev/null)
_docs_bg=()
edged() {
  if [ "$1" != run ]; then command edged "$@"; return; fi
  cat "$_DOCS_LOG" >> "$_DOCS_LOG.all" 2>/dev/null; : > "$_DOCS_LOG"
  if [ "$BASHPID" != "$$" ]; then
    echo "$BASHPID" > "$_DOCS_PIDFILE"
    exec edged "$@" >> "$_DOCS_LOG" 2>&1
  fi
  ( echo "$BASHPID" > "$_DOCS_PIDFILE"; exec edged "$@" >> "$_DOCS_LOG" 2>&1 ) &
  local i
  for i in $(seq 600); do
    grep -q ': ready$' "$_DOCS_LOG" && break
    kill -0 $! 2>/dev/null || break
    sleep 0.05
  done
  cat "$_DOCS_LOG"
}
"""

EPILOGUE = r"""
for _p in "${_docs_bg[@]}"; do
  [ "$_p" = "$(cat "$_DOCS_PIDFILE" 2>/dev/null)" ] || wait "$_p" 2>/dev/null
done
cat "$_DOCS_BGDIR"/*.out 2>/dev/null
"""


def block_script(block: Block) -> str:
    """One bash session for the block: its commands in order, a marker after each one."""
    parts = [PRELUDE, 'rm -f "$_DOCS_BGDIR"/*.out']
    for n, command in enumerate(block.commands, 1):
        if command.background:
            foreground = BACKGROUND.sub(r"\1", command.script)
            parts.append(
                f'{{ {foreground}\n}} > "$_DOCS_BGDIR/{n:03d}.out" 2>&1 &\n'
                f"_docs_bg+=($!); sleep {BACKGROUND_PAUSE_S}"
            )
        else:
            parts.append(command.script)
        parts.append(f"printf '\\036%d\\036\\n' {n}")
    parts.append(EPILOGUE)
    return "\n".join(parts)


def split_outputs(stream: str, count: int) -> list[list[str]]:
    """The session's output cut at the markers: what each command printed; the background
    jobs' output, printed after the last marker, goes to the last command."""
    pieces = MARKER.split(stream)
    outputs: list[list[str]] = [[] for _ in range(count)]
    texts = [pieces[0], *pieces[2::2]]
    for n, text in enumerate(texts):
        outputs[min(n, count - 1)] += [line.rstrip() for line in text.splitlines()]
    for output in outputs:
        while output and not output[-1].strip():
            output.pop()
    return outputs


def _alive(pid: int) -> bool:
    """Whether the daemon `pid` still runs. We are its subreaper (it outlives the bash session
    that started it), so reap it here; without that, ask the kernel for a non-zombie."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return stat.rsplit(")", 1)[1].split()[0] != "Z"


class DocsSandbox:
    """A private broker, a working directory with the doc's edged.yaml, and the daemon."""

    def __init__(self, doc: Sequence[str], keep: bool = False) -> None:
        self.keep = keep
        self.work = Path(tempfile.mkdtemp(prefix="edged-docs-"))
        self.broker = PrivateBroker(workdir=self._dir("broker"))
        try:
            self.config = doc_config(doc, self.broker.port, self.work / "state")
        except ValueError:
            shutil.rmtree(self.work)
            raise
        self.pidfile = self.work / ".edged.pid"
        self.log = self.work / ".edged.log"
        self.env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "B": f"-h 127.0.0.1 -p {self.broker.port}",
            "_DOCS_PIDFILE": str(self.pidfile),
            "_DOCS_LOG": str(self.log),
            "_DOCS_BGDIR": str(self._dir(".bg")),
        }

    def _dir(self, name: str) -> Path:
        path = self.work / name
        path.mkdir()
        return path

    def __enter__(self) -> DocsSandbox:
        # Daemons started in a block outlive its bash session: become their parent, so that
        # they are reaped (and seen to be gone) whatever this machine's init does.
        prctl = getattr(ctypes.CDLL(None), "prctl", None)  # Linux; elsewhere _alive asks /proc
        if prctl is not None:
            prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        (self.work / "edged.yaml").write_text(self.config)
        # The config's relative model path (edged/models/...) as in a clone of the repository.
        (self.work / "edged").symlink_to(REPO / "edged")
        self.broker.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_daemon()
        self.broker.stop()
        if self.keep:
            print(f"working directory kept: {self.work}", file=sys.stderr)
        else:
            shutil.rmtree(self.work, ignore_errors=True)

    def daemon_pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    def stop_daemon(self) -> None:
        pid = self.daemon_pid()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            self._wait_gone(pid)

    def _wait_gone(self, pid: int) -> None:
        deadline = time.monotonic() + DAEMON_STOP_TIMEOUT_S
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
            while _alive(pid):
                time.sleep(0.05)

    def start_daemon(self) -> None:
        self.bash(PRELUDE + "\nedged run --config edged.yaml > /dev/null")
        if self.daemon_pid() is None:
            raise RuntimeError(f"edged run did not start:\n{self.log.read_text()}")

    def bash(self, script: str) -> str:
        """Runs `script` in the working directory; its stdout and stderr, as one text."""
        proc = subprocess.Popen(
            ["bash", "-c", script],
            cwd=self.work,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=BLOCK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            raise RuntimeError(
                f"timed out after {BLOCK_TIMEOUT_S:.0f} s:\n{out.decode()}"
            ) from None
        return out.decode(errors="replace")

    def run(self, block: Block) -> list[list[str]]:
        """Runs the block's commands; what each printed, as the doc shows it."""
        if block.starts_daemon:
            self.stop_daemon()
        elif self.daemon_pid() is None:
            self.start_daemon()
        pid = self.daemon_pid()
        stream = present(self.bash(block_script(block)), self.broker.port)
        if pid is not None and "$EDGED_PID" in "".join(c.script for c in block.commands):
            # A block signals the daemon only to stop it, and its output may end before the
            # daemon does: the next block must not find it still on its way out.
            self._wait_gone(pid)
        return split_outputs(stream, len(block.commands))


# --- the command ----------------------------------------------------------------------------


Outputs = list[list[str]]
BlockKey = tuple[tuple[str, ...], ...]


def block_key(block: Block) -> BlockKey:
    """A block by its commands, which --write finds again in a doc edited meanwhile."""
    return tuple(command.lines for command in block.commands)


def check_blocks(
    doc: Sequence[str], blocks: Sequence[Block], keep: bool = False
) -> tuple[dict[BlockKey, Outputs], list[str]]:
    """Runs every block; the live outputs of those that drifted, and the diffs."""
    drifted: dict[BlockKey, Outputs] = {}
    diffs: list[str] = []
    with DocsSandbox(doc, keep) as sandbox:
        for block in blocks:
            where = f"block {block.number}/{len(blocks)} ({block.section})"
            if block.skip:
                print(f"{where}: skipped, {block.skip}", file=sys.stderr)
                continue
            started = time.monotonic()
            outputs = sandbox.run(block)
            diff = drift(block, outputs)
            verdict = "DRIFT" if diff else "ok"
            print(f"{where}: {verdict}, {time.monotonic() - started:.1f} s", file=sys.stderr)
            if diff:
                drifted[block_key(block)] = outputs
                diffs += diff
    return drifted, diffs


def rewrite(doc: Sequence[str], live: dict[BlockKey, Outputs]) -> tuple[str, int]:
    """The doc with the outputs of the blocks in `live` replaced; how many were found."""
    lines = list(doc)
    found = 0
    for block in reversed(parse_blocks(doc)):
        outputs = live.get(block_key(block))
        if outputs is not None:
            lines[block.start + 1 : block.end] = render(block, outputs)
            found += 1
    return "\n".join(lines) + "\n", found


def write(path: Path, live: dict[BlockKey, Outputs]) -> int:
    """Rewrites the drifted blocks of `path`, read again now: others may have edited the doc
    while the examples ran, and only the blocks' outputs are ours to change."""
    text, found = rewrite(path.read_text().splitlines(), live)
    if found:
        path.write_text(text)
    print(f"{path}: {found} blocks rewritten", file=sys.stderr)
    if found < len(live):
        print(
            f"{len(live) - found} drifted blocks changed while running: run again", file=sys.stderr
        )
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="report drift, exit 1 (default)")
    mode.add_argument("--write", action="store_true", help="rewrite the drifted outputs")
    parser.add_argument("--doc", type=Path, default=DOC, help=f"default: {DOC}")
    parser.add_argument(
        "--keep", action="store_true", help="keep the working directory (daemon and broker logs)"
    )
    args = parser.parse_args(argv)
    missing = sorted({package for program, package in NEEDED.items() if not shutil.which(program)})
    if missing:
        print(
            f"docs_examples: the examples need: sudo apt-get install -y {' '.join(missing)}",
            file=sys.stderr,
        )
        return 2
    doc = args.doc.read_text().splitlines()
    try:
        blocks = parse_blocks(doc)
        live, diffs = check_blocks(doc, blocks, args.keep)
    except ValueError as exc:
        print(f"docs_examples: {args.doc}: {exc}", file=sys.stderr)
        return 2
    if args.write:
        return write(args.doc, live)
    if diffs:
        print("\n".join(diffs))
        print(
            f"{args.doc}: {len(live)} of {len(blocks)} blocks drifted; "
            f"run `python tools/docs_examples.py --write`",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
