"""Logging under systemd: priorities journald understands, one prefix per line."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from edged.service.journal import JournalPrefixFormatter, journal_handler

REPO = Path(__file__).resolve().parent.parent


def _record(level: int, msg: str) -> logging.LogRecord:
    return logging.LogRecord("edged.x", level, __file__, 1, msg, None, None)


def test_records_carry_the_sd_daemon_priority_prefix() -> None:
    fmt = JournalPrefixFormatter()
    assert fmt.format(_record(logging.ERROR, "broken")) == "<3>edged.x: broken"
    assert fmt.format(_record(logging.WARNING, "w")).startswith("<4>")
    assert fmt.format(_record(logging.INFO, "i")).startswith("<6>")
    assert fmt.format(_record(logging.DEBUG, "two\nlines")) == "<7>edged.x: two\n<7>lines"


def test_handler_follows_journal_stream() -> None:
    under_systemd = journal_handler({"JOURNAL_STREAM": "8:12345"})
    on_terminal = journal_handler({})
    assert (
        isinstance(under_systemd.formatter, JournalPrefixFormatter)
        or type(under_systemd).__name__ == "JournalHandler"
    )
    assert not isinstance(on_terminal.formatter, JournalPrefixFormatter)


def test_logging_setup_under_systemd_writes_prefixed_lines_to_stderr() -> None:
    env = dict(os.environ, JOURNAL_STREAM="8:1")
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            "import logging; from edged.service.journal import "
            "setup_logging; setup_logging(logging.INFO); logging.getLogger('edged.t')"
            ".warning('hello')",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=env,
    )
    assert run.stderr.strip() == "<4>edged.t: hello"
