"""Everything of the checkpoint besides weights that the engine needs: tokenizer, chat template,
configs, and the token ids the manifest records."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edged.engine.manifest import Reasoning

from .options import ExportError

log = logging.getLogger(__name__)

CHAT_TEMPLATE_FILE = "chat_template.jinja"
REQUIRED_FILES = ("tokenizer.json", "tokenizer_config.json", "config.json")
OPTIONAL_FILES = ("special_tokens_map.json", "generation_config.json")


@dataclass(frozen=True)
class TokenIds:
    eos: tuple[int, ...]
    pad: int | None
    bos: int | None
    """The id the tokenizer prepends itself; None when it prepends nothing (Qwen3)."""
    reasoning: Reasoning | None


def copy_assets(checkpoint: Path, out_dir: Path) -> list[str]:
    """Copy tokenizer, template and configs into `out_dir`; return the names written."""
    written: list[str] = []
    for name in REQUIRED_FILES:
        if not (checkpoint / name).is_file():
            raise ExportError(
                f"{checkpoint}: {name} is missing; the engine needs it (a checkpoint with only a "
                "slow tokenizer can be converted with AutoTokenizer.from_pretrained(...)"
                ".save_pretrained(...))"
            )
    for name in (*REQUIRED_FILES, *OPTIONAL_FILES):
        if (checkpoint / name).is_file():
            # copyfile, not copy2: permissions and timestamps of a cache are not the model's.
            shutil.copyfile(checkpoint / name, out_dir / name)
            written.append(name)
    template = chat_template(checkpoint)
    if template is not None:
        (out_dir / CHAT_TEMPLATE_FILE).write_text(template, encoding="utf-8")
        written.append(CHAT_TEMPLATE_FILE)
    else:
        log.warning("%s has no chat template; the engine will only take raw prompts", checkpoint)
    return written


def chat_template(checkpoint: Path) -> str | None:
    """The checkpoint's chat template: its chat_template.jinja, else tokenizer_config's."""
    jinja = checkpoint / CHAT_TEMPLATE_FILE
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = _read_json(checkpoint / "tokenizer_config.json")
    template = config.get("chat_template")
    if isinstance(template, list):
        # Several named templates (e.g. "default", "tool_use"): the engine speaks the default.
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def token_ids(checkpoint: Path, tokenizer: Any) -> TokenIds:
    """eos (generation_config's first, then the tokenizer's), pad, bos and reasoning tags."""
    eos: list[int] = []
    generation = _read_json(checkpoint / "generation_config.json")
    config = _read_json(checkpoint / "config.json")
    for source in (generation.get("eos_token_id"), tokenizer.eos_token_id):
        for token in source if isinstance(source, list) else [source]:
            if isinstance(token, int) and token not in eos:
                eos.append(token)
    if not eos and isinstance(config.get("eos_token_id"), int):
        eos.append(config["eos_token_id"])
    if not eos:
        raise ExportError(f"{checkpoint}: no eos_token_id in generation_config or tokenizer")
    pad = tokenizer.pad_token_id
    if pad is None and isinstance(generation.get("pad_token_id"), int):
        pad = generation["pad_token_id"]
    return TokenIds(
        eos=tuple(eos),
        pad=pad,
        bos=tokenizer.bos_token_id,
        reasoning=_reasoning(tokenizer),
    )


def _reasoning(tokenizer: Any) -> Reasoning | None:
    """Reasoning tags only when both are single tokens, as Qwen3's `<think>`/`</think>` are."""
    tags = Reasoning()
    for tag in (tags.start, tags.end):
        ids = tokenizer.encode(tag, add_special_tokens=False)
        if len(ids) != 1:
            return None
    return tags


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path}: not readable JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}
