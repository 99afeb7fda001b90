"""Tokenizer, chat template and incremental detokenization for an edged model directory.

The chat template is rendered with jinja2 the way transformers renders it
(`transformers.utils.chat_template_utils`: an immutable sandbox, `trim_blocks`,
`lstrip_blocks`, the `loopcontrols` extension, a `tojson` filter that keeps non-ASCII, and a
`raise_exception` global), so a prompt built here is token-for-token the prompt the model was
trained and evaluated with.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from edged.engine.manifest import ModelDirError

log = logging.getLogger(__name__)

Message = dict[str, Any]


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # transformers overrides jinja's tojson, which would HTML-escape and force ASCII.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_chat_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens as strings or AddedToken dicts.
    if isinstance(value, dict):
        content = value.get("content")
        return content if isinstance(content, str) else None
    return value if isinstance(value, str) else None


_ZWNJ = "\u200c"


def _control_pattern(tokens: Iterable[str]) -> re.Pattern[str] | None:
    """One regex for every added token (control tokens such as `<|im_start|>`, `<think>`),
    longest first so that a token containing another is matched whole."""
    texts = sorted({t for t in tokens if len(t) > 1}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, texts))) if texts else None


class ChatTokenizer:
    """Text <-> token ids, plus the model's chat template."""

    def __init__(
        self, tokenizer: Tokenizer, chat_template: str | None, special_tokens: dict[str, str]
    ) -> None:
        self._tok = tokenizer
        self._template_source = chat_template
        self._template = compile_chat_template(chat_template) if chat_template else None
        self.special_tokens = special_tokens
        added = tokenizer.get_added_tokens_decoder()
        self.special_ids: frozenset[int] = frozenset(i for i, tok in added.items() if tok.special)
        self._control = _control_pattern(tok.content for tok in added.values())

    @classmethod
    def from_dir(cls, model_dir: Path) -> ChatTokenizer:
        model_dir = Path(model_dir)
        tok_path = model_dir / "tokenizer.json"
        if not tok_path.is_file():
            raise ModelDirError(f"{tok_path}: missing; the model directory needs tokenizer.json")
        try:
            tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad files
            raise ModelDirError(f"{tok_path}: not a valid tokenizer: {exc}") from exc
        config: dict[str, Any] = {}
        cfg_path = model_dir / "tokenizer_config.json"
        if cfg_path.is_file():
            config = json.loads(cfg_path.read_text())
        template: str | None = None
        jinja_path = model_dir / "chat_template.jinja"
        if jinja_path.is_file():
            template = jinja_path.read_text()
        elif isinstance(config.get("chat_template"), str):
            template = config["chat_template"]
        specials = {}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            content = _token_content(config.get(key))
            if content is not None:
                specials[key] = content
        return cls(tokenizer, template, specials)

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def token_id(self, token: str) -> int | None:
        value = self._tok.token_to_id(token)
        return None if value is None else int(value)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in the text are recognised, none added."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def render(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        defuse: bool = False,
        **template_kwargs: Any,
    ) -> str:
        """The prompt text for `messages`, exactly as transformers' apply_chat_template. With
        `defuse`, control tokens written in the messages' text stay text (`_defused`): for
        what a client sent; off for the project's own data (eval sets whose assistant turns
        hold `<think>` blocks the template must see)."""
        if self._template is None:
            raise ModelDirError("the model directory has no chat template (chat_template.jinja)")
        context = dict(self.special_tokens)
        context.update(template_kwargs)
        return self._template.render(
            messages=[self._defused(m) for m in messages] if defuse else list(messages),
            add_generation_prompt=add_generation_prompt,
            **context,
        )

    def _defused(self, message: Message) -> Message:
        """`message` with the model's control tokens in its text made plain text.

        The rendered prompt is encoded with the added tokens recognised (the template's own
        `<|im_start|>` must be), so a wearer or a client's history that *writes*
        `<|im_start|>system` would otherwise open a real system turn, and `</think>` would end
        the model's reasoning. A zero-width non-joiner after the first character keeps the text
        readable and makes the tokenizer see ordinary characters.
        """
        content = message.get("content")
        if self._control is None or type(content) is not str:
            return message
        if self._control.search(content) is None:
            return message
        defused = self._control.sub(lambda m: m.group()[0] + _ZWNJ + m.group()[1:], content)
        return {**message, "content": defused}


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces without ever splitting a UTF-8 character.

    Byte-level BPE tokens can end inside a multi-byte character; decoding such a prefix yields
    U+FFFD. The decoder re-decodes a short window of recent tokens and only releases text once it
    no longer ends in a replacement character (the approach of transformers' TextStreamer and
    text-generation-inference). A U+FFFD that the model really produced is released when the
    next token arrives or at `flush()`.
    """

    def __init__(self, tokenizer: ChatTokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, token_id: int) -> str:
        if token_id in self._tok.special_ids:
            return ""
        self._ids.append(token_id)
        prefix_text = self._tok.decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._tok.decode(self._ids[self._prefix_offset :])
        if full_text.endswith("\ufffd") or len(full_text) <= len(prefix_text):
            return ""
        new_text = full_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return new_text

    def flush(self) -> str:
        """Whatever text is still held back (an incomplete character decodes as U+FFFD)."""
        prefix_text = self._tok.decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._tok.decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return full_text[len(prefix_text) :] if len(full_text) > len(prefix_text) else ""
