"""docs/mqtt-api.md shows what the daemon prints: tools/docs_examples.py runs every console
example against a live `edged run` (a real mosquitto, the bundled model) and fails on drift.

The tool runs as a subprocess: it makes itself the subreaper of the daemons it starts, which is
no business of the test process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests._models import REPO_ROOT, load_tool

TOOL = REPO_ROOT / "tools" / "docs_examples.py"
docs_examples = load_tool("docs_examples")

ADVICE = (
    '{"id":"q-1","text":"%s","usage":{"prompt_tokens":%d,"completion_tokens":16},'
    '"timing_ms":{"queued":%d,"first_token":9,"total":18},"governor":{"threads":%d},"ts":%d}'
)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(TOOL), *args],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO_ROOT,
    )


def _doc_with(block: str) -> str:
    """The real doc's config, then one example of our own."""
    doc = (REPO_ROOT / "docs" / "mqtt-api.md").read_text()
    start = doc.index("```yaml\n# edged.yaml")
    config = doc[start : doc.index("```", start + 3) + 3]
    return f"# A doc\n\n{config}\n\n## Asking\n\n```console\n{block}```\n"


def test_every_mqtt_api_example_prints_what_the_doc_shows() -> None:
    run = _run("--check")
    assert run.returncode == 0, (
        f"docs/mqtt-api.md has drifted from the daemon (update it with "
        f"`python tools/docs_examples.py --write`, then read the prose around each change):\n"
        f"{run.stdout}\n{run.stderr[-3000:]}"
    )
    assert "ok," in run.stderr and "DRIFT" not in run.stderr


def test_a_drifted_output_is_shown_as_a_diff_and_write_brings_it_up_to_date(
    tmp_path: Path,
) -> None:
    doc = tmp_path / "api.md"
    doc.write_text(
        _doc_with(
            "$ mosquitto_rr $B -q 1 -t edged/v1/w1/query -e edged/v1/w1/replies/gw1 -W 30 \\\n"
            '    -m \'{"id": "q-1", "text": "Hello?", "max_tokens": 4}\' \\\n'
            "  | jq -c '{id, finish_reason, completion: .usage.completion_tokens}'\n"
            '{"id":"q-1","finish_reason":"stop","completion":99}\n'
        )
    )
    checked = _run("--check", "--doc", str(doc))
    assert checked.returncode == 1, checked.stderr
    assert '-{"id":"q-1","finish_reason":"stop","completion":99}' in checked.stdout
    assert '+{"id":"q-1","finish_reason":"length","completion":4}' in checked.stdout
    assert "block 1/1 (Asking): DRIFT" in checked.stderr

    written = _run("--write", "--doc", str(doc))
    assert written.returncode == 0, written.stderr
    assert '{"id":"q-1","finish_reason":"length","completion":4}\n```' in doc.read_text()
    assert _run("--check", "--doc", str(doc)).returncode == 0


def test_values_that_vary_between_runs_are_ignored_and_the_rest_is_compared() -> None:
    first = ADVICE % ("noise", 287, 1, 2, 1796589491)
    again = ADVICE % ("other noise", 287, 7, 4, 1796589999)
    longer_prompt = ADVICE % ("noise", 288, 1, 2, 1796589491)
    normalise = docs_examples.normalise
    assert normalise(first) == normalise(again)
    assert normalise(first) != normalise(longer_prompt)
    # a NEWS2 component named temp_c is a score, not this machine's CPU temperature
    assert normalise('"components":{"temp_c":1}') != normalise('"components":{"temp_c":2}')


def test_commands_span_continuation_lines_heredocs_and_loops() -> None:
    block = [
        "$ cat > b.json <<EOF",
        '{"a": 1}',
        "EOF",
        "$ for i in 1 2; do",
        "    echo $i",
        "  done | sort \\",
        "    -r",
        "2",
        "1",
        "$ sleep 1 &   # in the background",
    ]
    commands = docs_examples.split_commands(block)
    assert [len(c.lines) for c in commands] == [3, 4, 1]
    assert [c.output for c in commands] == [(), ("2", "1"), ()]
    assert [c.background for c in commands] == [False, False, True]
