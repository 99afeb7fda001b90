"""Logging to the systemd journal, or to a terminal.

Under systemd ($JOURNAL_STREAM is set, systemd.exec(5)) records go to the journal with their
priority: through `systemd.journal.JournalHandler` when systemd-python is installed (the
`systemd` extra; it adds structured fields such as CODE_FILE and LOGGER), otherwise as stderr
lines with the `<N>` priority prefix of sd-daemon(3), which
journald parses (SyslogLevelPrefix=yes is its default). Timestamps are left to the journal.
Elsewhere, plain timestamped lines on stderr.

Whatever the handler, what is logged is events, never query text or vital values.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping

# syslog priorities (sd-daemon(3)): 3 err, 4 warning, 6 info, 7 debug.
_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class JournalPrefixFormatter(logging.Formatter):
    """`<4>edged.mqtt.transport: lost the connection ...` for journald's stderr parser."""

    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITY.get(record.levelno, 6)
        text = f"{record.name}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        # Every line of a multi-line record carries the prefix, or journald logs it at info.
        return "\n".join(f"<{priority}>{line}" for line in text.splitlines())


def journal_handler(environ: Mapping[str, str] | None = None) -> logging.Handler:
    env = os.environ if environ is None else environ
    if env.get("JOURNAL_STREAM"):
        try:
            from systemd.journal import JournalHandler  # type: ignore[import-not-found,attr-defined,unused-ignore]

            return JournalHandler(SYSLOG_IDENTIFIER="edged")  # type: ignore[no-any-return]
        except ImportError:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(JournalPrefixFormatter())
            return handler
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return handler


def setup_logging(level: int, environ: Mapping[str, str] | None = None) -> None:
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(journal_handler(environ))
    root.setLevel(level)
