"""Chat templating with a loss-eligible mask over assistant tokens.

A conversation is rendered into *segments* ``(text, trains)``; each segment is
encoded on its own and the token ids concatenated, so the eligible mask is exact
(no character-to-token offset mapping needed) and the prompt part is tokenized
exactly as it is at generation time, where the model continues after the
generation prompt.  What counts as the assistant's turn is uniform across
templates: everything the template emits for that turn *after* its generation
prompt (content and end-of-turn marker), so the model learns to close turns.

Templates (``template=``):

* ``auto``: the tokenizer's own chat template when it has one, else ``plain``.
* ``tokenizer``: the tokenizer's template; an error when it has none.  Either an
  object with ``apply_chat_template`` (a ``transformers`` tokenizer) or a Jinja
  string in ``tokenizer.chat_template`` (read from ``tokenizer_config.json`` by a
  tokenizers-only wrapper) rendered with ``jinja2`` the way ``transformers`` does.
* ``plain``: ``"User: ...\\nAssistant: ...\\n"``.
* ``chatml``: ``"<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n...<|im_end|>\\n"``.
* ``raw``: only for ``{prompt, response}`` records: the strings are used verbatim
  (the DiRL data format, whose prompt already carries the template).

The tokenizer is duck-typed: ``encode(text) -> list[int]`` (without added
special tokens) and ``eod_id``; optional ``chat_template``, ``bos_token``,
``eos_token``.  One ``eod_id`` ends the sequence after the last assistant turn;
it is trained with that turn, since generation stops at it.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, List, Optional, Sequence, Tuple, get_args

from ..config.schema import ChatTemplate

__all__ = [
    "TEMPLATES",
    "ChatTokens",
    "validate_messages",
    "render_segments",
    "tokenize_chat",
    "tokenize_prompt_response",
    "generation_prompt_ids",
]

TEMPLATES = get_args(ChatTemplate)  # the names live in the config schema
ROLES = ("system", "user", "assistant", "tool")

Segment = Tuple[str, bool]  # (text, trains)
Messages = List[dict]


@dataclass(frozen=True)
class ChatTokens:
    """Token ids of one rendered conversation and which of them carry loss."""

    ids: List[int]
    eligible: List[bool]

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.eligible):
            raise ValueError(f"{len(self.ids)} ids vs {len(self.eligible)} eligible flags")


def validate_messages(messages: Any, need_assistant_last: bool = True) -> Messages:
    """Check the ``[{role, content}, ...]`` shape; raise ``ValueError`` naming the problem."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"messages[{i}] has role {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"messages[{i}].content must be a string")
    if need_assistant_last:
        if messages[-1]["role"] != "assistant":
            raise ValueError("the last message must be the assistant's (it is the training target)")
        if not messages[-1]["content"].strip():
            raise ValueError("the last assistant message is empty")
    return messages


# --------------------------------------------------------------------- named templates


def _named_turn(template: str, role: str) -> Tuple[str, str]:
    """``(header, footer)`` of one turn: the header of an assistant turn is the generation prompt."""
    if template == "plain":
        return f"{role.capitalize()}: ", "\n"
    if template == "chatml":
        return f"<|im_start|>{role}\n", "<|im_end|>\n"
    raise ValueError(f"unknown chat template {template!r}; use one of {', '.join(TEMPLATES)}")


def _named_segments(messages: Messages, template: str, loss_from: int, generation_prompt: bool) -> List[Segment]:
    segs: List[Segment] = []
    for i, m in enumerate(messages):
        header, footer = _named_turn(template, m["role"])
        trains = m["role"] == "assistant" and i >= loss_from
        segs += [(header, False), (m["content"] + footer, trains)]
    if generation_prompt:
        segs.append((_named_turn(template, "assistant")[0], False))
    return segs


# --------------------------------------------------------------- tokenizer templates


@lru_cache(maxsize=8)
def _compile_jinja(source: str):
    """Compile a HF chat template the way ``transformers`` does (sandboxed, trimmed blocks).

    ``{% generation %}`` markers (transformers' own assistant-mask extension) are
    dropped: the prefix renderings below locate assistant turns for any template.
    """
    import json
    import re
    from datetime import datetime

    try:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover - jinja2 ships with torch
        raise ImportError("rendering the tokenizer's chat template needs jinja2: pip install jinja2") from e

    def raise_exception(message: str):
        raise ValueError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii
    )
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    source = re.sub(r"{%-?\s*(end)?generation\s*-?%}", "", source)
    try:
        template = env.from_string(source)
    except jinja2.TemplateError as e:
        raise ValueError(f"the tokenizer's chat template does not compile ({e}); use 'chatml' or 'plain'") from None

    def render(**kwargs) -> str:
        try:
            return template.render(**kwargs)
        except jinja2.TemplateError as e:
            raise ValueError(f"the tokenizer's chat template failed ({e}); use 'chatml' or 'plain'") from None

    return render


def _template_source(tokenizer: Any) -> Optional[str]:
    src = getattr(tokenizer, "chat_template", None)
    if isinstance(src, (list, tuple)):  # named templates in tokenizer_config.json
        named = {t.get("name"): t.get("template") for t in src if isinstance(t, dict)}
        src = named.get("default")
    return src if isinstance(src, str) and src.strip() else None


def _tokenizer_renderer(tokenizer: Any) -> Optional[Callable[[Messages, bool], str]]:
    """``render(messages, add_generation_prompt) -> str`` from the tokenizer, or None."""
    if callable(getattr(tokenizer, "apply_chat_template", None)) and _template_source(tokenizer):
        return lambda msgs, gen: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    src = _template_source(tokenizer)
    if src is None:
        return None
    render = _compile_jinja(src)
    special = {k: getattr(tokenizer, k, None) or "" for k in ("bos_token", "eos_token")}
    return lambda msgs, gen: render(messages=msgs, add_generation_prompt=gen, **special)


def _rendered_segments(
    messages: Messages, render: Callable[[Messages, bool], str], loss_from: int, generation_prompt: bool
) -> List[Segment]:
    """Split the full rendering at each assistant turn, using prefix renderings as boundaries.

    Requires the template to be prefix-stable (rendering the first ``i`` turns is a
    prefix of rendering all of them), which holds for the usual templates; ones
    that rewrite earlier turns (e.g. strip past reasoning) are rejected.
    """
    full = render(messages, generation_prompt)
    segs: List[Segment] = []
    pos = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = render(messages[:i], True) if i else ""
        turn = render(messages[: i + 1], False)
        if not (full.startswith(head) and full.startswith(turn) and pos <= len(head) <= len(turn)):
            raise ValueError(
                "the tokenizer's chat template is not prefix-stable (it rewrites earlier turns), so the "
                "assistant tokens cannot be located; set the chat template to 'chatml' or 'plain'"
            )
        segs += [(full[pos : len(head)], False), (full[len(head) : len(turn)], i >= loss_from)]
        pos = len(turn)
    segs.append((full[pos:], False))
    return [s for s in segs if s[0]]


# ------------------------------------------------------------------------ public API


def _resolve(template: str, tokenizer: Any) -> Tuple[str, Optional[Callable[[Messages, bool], str]]]:
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; use one of {', '.join(TEMPLATES)}")
    if template in ("auto", "tokenizer"):
        render = _tokenizer_renderer(tokenizer)
        if render is not None:
            return "tokenizer", render
        if template == "tokenizer":
            raise ValueError(
                "the tokenizer has no chat template (tokenizer.json alone does not carry one); "
                "set the chat template to 'plain' or 'chatml'"
            )
        return "plain", None
    return template, None


def render_segments(
    messages: Messages, tokenizer: Any, template: str = "auto", loss_from: int = 0, generation_prompt: bool = False
) -> List[Segment]:
    """``(text, trains)`` pieces of the rendered conversation; assistant turns ``>= loss_from`` train."""
    name, render = _resolve(template, tokenizer)
    if name == "raw":
        raise ValueError("chat template 'raw' only applies to {prompt, response} records; use 'plain' or 'chatml'")
    if render is not None:
        return _rendered_segments(messages, render, loss_from, generation_prompt)
    return _named_segments(messages, name, loss_from, generation_prompt)


def _encode_segments(segments: Sequence[Segment], tokenizer: Any) -> ChatTokens:
    ids: List[int] = []
    eligible: List[bool] = []
    for text, trains in segments:
        piece = list(tokenizer.encode(text))
        ids += piece
        eligible += [trains] * len(piece)
    return ChatTokens(ids, eligible)


def _end_with_eod(tokens: ChatTokens, eod_id: int, trains: bool) -> ChatTokens:
    """Close the document with EOD (what the sampler stops at), trained with the last turn."""
    if tokens.ids and tokens.ids[-1] == eod_id:
        return tokens
    return ChatTokens(tokens.ids + [eod_id], tokens.eligible + [trains])


def tokenize_chat(
    messages: Messages, tokenizer: Any, template: str = "auto", loss_from: int = 0, add_eod: bool = True
) -> ChatTokens:
    """Token ids of a conversation ending in an assistant turn; eligible = trained assistant turns + EOD."""
    validate_messages(messages)
    tokens = _encode_segments(render_segments(messages, tokenizer, template, loss_from), tokenizer)
    return _end_with_eod(tokens, tokenizer.eod_id, loss_from < len(messages)) if add_eod else tokens


def tokenize_prompt_response(prompt: str, response: str, tokenizer: Any, template: str = "auto") -> ChatTokens:
    """``{prompt, response}``: a one-turn chat, or the two strings verbatim with ``template='raw'``."""
    if template == "raw":
        return _end_with_eod(_encode_segments([(prompt, False), (response, True)], tokenizer), tokenizer.eod_id, True)
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return tokenize_chat(messages, tokenizer, template)


def generation_prompt_ids(messages: Messages, tokenizer: Any, template: str = "auto") -> List[int]:
    """Token ids the sampler continues from: the conversation plus the assistant generation prompt."""
    validate_messages(messages, need_assistant_last=False)
    if template == "raw":
        return list(tokenizer.encode("".join(m["content"] for m in messages)))
    segs = render_segments(messages, tokenizer, template, loss_from=len(messages), generation_prompt=True)
    return _encode_segments(segs, tokenizer).ids
