"""Prompt formats: how a (question, answer) pair becomes prompt tokens and scored answer tokens.

Two formats, chosen per job (`prompt_format`) and per `pum eval` / `pum unlearn`:

- `plain`: `Question: {q}\\nAnswer:` (the tokenizer's BOS first) and ` {a}` + EOS. PUM's original
  format; the tiny demo models are trained on it.
- `chat`: the tokenizer's chat template, with open-unlearning's TOFU conventions (its
  `template_args` for Llama-3.x, Qwen2.5 and Phi-3.5): a system message "You are a helpful
  assistant." (left out when the template refuses a system role, as Gemma's does), the date line
  pinned to "10 Apr 2025" (`date_string`, read by the Llama-3.x templates), and the answer starts
  right after the generation prompt (`add_generation_prompt=True`). The answer tokens are what the
  template puts after that point (the answer and its end-of-turn tag), plus EOS when the last of
  them is not EOS already, as open-unlearning's `preprocess_chat_instance` does.
- `auto` (the default): `chat` when the tokenizer has a chat template, else `plain`.

Prompt and answer are tokenized separately (without added special tokens in `chat`: the
template writes them), so the boundary between the masked prompt and the scored answer is exact
for any tokenizer. `QAEncoder` binds a tokenizer to a format; `pum.common.qa.collate` accepts one
wherever it accepts a tokenizer.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

PROMPT_FORMATS = ("auto", "chat", "plain")
SYSTEM_PROMPT = "You are a helpful assistant."  # open-unlearning's template_args.system_prompt
DATE_STRING = "10 Apr 2025"  # open-unlearning's template_args.date_string (Llama-3.x "Today Date")


def plain_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def folder_has_chat_template(folder: str | Path) -> bool:
    """Whether a saved tokenizer folder carries a chat template (the files transformers reads it from)."""
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    config = folder / "tokenizer_config.json"
    try:
        return bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return False


def check_prompt_format(value: str) -> str:
    if value not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {', '.join(PROMPT_FORMATS)} (got {value!r})")
    return value


def resolve_prompt_format(requested: str, has_template: bool) -> str:
    """`chat` or `plain`: `auto` picks `chat` when there is a template; `chat` without one is refused."""
    check_prompt_format(requested)
    if requested == "auto":
        return "chat" if has_template else "plain"
    if requested == "chat" and not has_template:
        raise ValueError("prompt_format 'chat' needs a tokenizer with a chat template, and this one has none: "
                         "use prompt_format 'plain' (or 'auto')")
    return requested


class QAEncoder:
    """A tokenizer bound to a prompt format: prompt ids, answer ids, and the ids that end an answer."""

    def __init__(self, tokenizer, prompt_format: str = "auto", *, system_prompt: str | None = SYSTEM_PROMPT,
                 date_string: str | None = DATE_STRING):
        if isinstance(tokenizer, QAEncoder):
            tokenizer = tokenizer.tokenizer
        self.tokenizer = tokenizer
        self.prompt_format = resolve_prompt_format(prompt_format, has_chat_template(tokenizer))
        self.date_string = date_string
        self._system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        if self.prompt_format == "chat" and self._system and not self._accepts_system():
            log.info("the chat template refuses a system message: prompts go without one")
            self._system = []

    def __repr__(self) -> str:
        return f"<QAEncoder {self.prompt_format} {type(self.tokenizer).__name__}>"

    @property
    def pad_token_id(self) -> int | None:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt, date_string=self.date_string)

    def _accepts_system(self) -> bool:
        from jinja2 import TemplateError

        try:
            self._render(self._system + [{"role": "user", "content": "q"}], True)
            return True
        except TemplateError:
            return False

    def _ids(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def prompt_text(self, question: str) -> str:
        """The prompt as text: what the model reads before the answer (generation starts after it)."""
        if self.prompt_format == "plain":
            return plain_prompt(question)
        return self._render(self._system + [{"role": "user", "content": question}], True)

    def prompt_ids(self, question: str) -> list[int]:
        """The prompt's token ids: BOS + plain prompt, or the rendered chat prompt."""
        return self._ids(self.prompt_text(question), special=self.prompt_format == "plain")

    def _chat(self, question: str, answer: str) -> tuple[str, str]:
        """(prompt text, text after it): the rendered conversation split where the answer starts."""
        prompt = self.prompt_text(question)
        full = self._render(self._system + [{"role": "user", "content": question},
                                            {"role": "assistant", "content": answer}], False)
        if not full.startswith(prompt):
            raise ValueError("this chat template does not write the generation prompt as the start of the "
                             "conversation, so the answer's first token is unknown: use prompt_format 'plain'")
        return prompt, full[len(prompt):]

    def encode_pair(self, question: str, answer: str) -> tuple[list[int], list[int]]:
        """Token ids of the prompt and of the answer (every scored token, EOS included)."""
        if self.prompt_format == "plain":
            prompt_ids, answer_ids = self._ids(plain_prompt(question), True), self._ids(" " + answer, False)
        else:
            prompt, rest = self._chat(question, answer)
            prompt_ids, answer_ids = self._ids(prompt, False), self._ids(rest, False)
        eos = self.tokenizer.eos_token_id
        if eos is not None and (not answer_ids or answer_ids[-1] != eos):
            answer_ids.append(eos)
        return prompt_ids, answer_ids

    def stop_token_ids(self) -> list[int]:
        """EOS, and in `chat` the template's end-of-turn token when it is a special token.

        Llama-3's `<|eot_id|>` ends a turn but is not the base tokenizer's EOS: generation must stop
        at both, as open-unlearning's cut at the end-of-turn text does.
        """
        stops = [] if self.tokenizer.eos_token_id is None else [self.tokenizer.eos_token_id]
        if self.prompt_format == "chat":
            answer = "Yes"
            _, rest = self._chat("Is this a question?", answer)
            tail = self._ids(rest[rest.index(answer) + len(answer):], False) if answer in rest else []
            special = set(getattr(self.tokenizer, "all_special_ids", []))
            special |= set(getattr(self.tokenizer, "added_tokens_decoder", None) or {})
            if tail and tail[0] in special and tail[0] not in stops:
                stops.append(tail[0])
        return stops


def as_encoder(tokenizer_or_encoder) -> QAEncoder:
    """The encoder itself, or a tokenizer in its default (`auto`) format."""
    if isinstance(tokenizer_or_encoder, QAEncoder):
        return tokenizer_or_encoder
    return QAEncoder(tokenizer_or_encoder)
