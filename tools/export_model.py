#!/usr/bin/env python3
"""Export a Hugging Face causal LM to an edged model directory (int4 by default).

python tools/export_model.py ~/models/Qwen3-0.6B models/qwen3-0.6b-int4
python tools/export_model.py Qwen/Qwen3-0.6B out/ --quant int8 --overwrite
"""

from __future__ import annotations

import argparse
import logging
import sys

from edged.export.cli import add_export_arguments, run_export


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_export_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return run_export(args)


if __name__ == "__main__":
    sys.exit(main())
