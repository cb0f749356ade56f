"""Conversations rendered with the checkpoint's own chat template (``data.kind=chat``).

A record is ``{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}``.
Its document is the text the tokenizer folder's chat template renders, exactly as transformers'
``apply_chat_template(messages, tokenize=False)`` renders it, so the model trains on what it sees
when it is prompted through its own template. transformers is not imported: the template
environment below mirrors its renderer (a sandboxed Jinja environment with ``trim_blocks`` and
``lstrip_blocks``, the loop-control extension, a ``{% generation %}`` tag, the ``raise_exception``
and ``strftime_now`` helpers, a ``tojson`` that does not HTML-escape, ``dict`` and a ``namespace``
that refuses underscore names; the variables ``messages``, ``tools``, ``documents``,
``add_generation_prompt`` and the tokenizer's named special tokens such as ``bos_token``).

The response is the assistant turns' content: where it lies in the rendered text is found with
markers (see :meth:`ChatTemplate.assistant_spans`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ebft_megatron.data.sources import ConversationProblem, DataError

ROLES = ("system", "user", "assistant")
TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "tokenizer_config.json"
# The named special tokens transformers hands every template (its ``special_tokens_map``).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# The names a message's reasoning goes by; transformers fills the first two from whichever is set.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# transformers' strftime_now reads the clock, so a template that prints today's date (Llama 3.1
# does) would give other documents on another day and a resumed run other chunks. The date is
# pinned instead, to the one Llama 3.1's template itself falls back to.
TEMPLATE_DATE = datetime(2024, 7, 26)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), f"a {type(value).__name__}")


@dataclass(frozen=True)
class Conversation:
    text: str  # the rendered document
    response_chars: tuple[tuple[int, int], ...]  # character spans of the trained assistant turns, in order


def load_chat_template(folder: str | Path) -> "ChatTemplate":
    """The chat template of a tokenizer folder, as transformers picks it: ``chat_template.jinja``
    when present (newer transformers save it there), else ``chat_template`` in
    ``tokenizer_config.json`` (a string, or a list of named templates of which "default" is used)."""
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    config = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(f"{config_path}: cannot be read as JSON ({err}); data.kind=chat reads the chat template "
                            "from it") from None
        if not isinstance(config, dict):
            raise DataError(f"{config_path}: expected a JSON object")
    special_tokens = _special_tokens(folder, config)
    template_path = folder / TEMPLATE_FILE
    if template_path.is_file():
        try:
            return ChatTemplate(template_path.read_text(encoding="utf-8"), str(template_path), special_tokens)
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"{template_path}: cannot be read ({err})") from None
    template = config.get("chat_template")
    where = f"{config_path} (chat_template)"
    if isinstance(template, list):
        named = {item.get("name"): item.get("template") for item in template if isinstance(item, dict)}
        if "default" not in named:
            raise DataError(f"{where}: several chat templates ({', '.join(map(str, named))}) and none named "
                            "'default'; data.kind=chat renders with the default one: name one of them 'default'")
        template, where = named["default"], f"{config_path} (chat_template 'default')"
    if template is None:
        raise DataError(f"{folder}: the tokenizer has no chat template (no {TEMPLATE_FILE}, no chat_template in "
                        f"{CONFIG_FILE}); data.kind=chat renders conversations with the checkpoint's own template: use "
                        "the tokenizer folder of a chat (instruct) model, or add its template there")
    if not isinstance(template, str) or not template.strip():
        raise DataError(f"{where}: expected the chat template as a Jinja string, got {_json_type(template)}")
    return ChatTemplate(template, where, special_tokens)


def _special_tokens(folder: Path, config: dict) -> dict[str, str]:
    """The named special tokens' strings: tokenizer_config.json's, completed from the older
    special_tokens_map.json; a token saved as an object is its "content"."""
    tokens = {}
    sources = [config]
    legacy = folder / "special_tokens_map.json"
    if legacy.is_file():
        try:
            sources.append(json.loads(legacy.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            pass  # an unreadable legacy file: transformers' newer tokenizer_config.json has what matters
    for source in sources:
        if not isinstance(source, dict):
            continue
        for name in SPECIAL_TOKEN_NAMES:
            value = source.get(name)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and name not in tokens:
                tokens[name] = value
    return tokens


def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` marks assistant text for transformers' token
        mask; here it only has to parse and render its body (the spans are found otherwise)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes <, > and & for HTML, which would change the rendered text.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return TEMPLATE_DATE.strftime(fmt)

    class TemplateDict:
        # dict(...) without handing the template the dict type itself (its attributes reach Python internals)
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # A namespace attribute named with an underscore could reach Python internals.
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a namespace attribute may not start with '_', got {name!r}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=TemplateDict(),
                       namespace=TemplateNamespace)
    return env


class ChatTemplate:
    """A compiled chat template and the special tokens it is rendered with."""

    def __init__(self, source: str, origin: str, special_tokens: dict[str, str] | None = None):
        import jinja2

        self.source, self.origin = source, origin
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as err:
            raise DataError(f"{origin}: the chat template is not valid Jinja (template line {err.lineno}: "
                            f"{err.message}); fix the template or use the model's own tokenizer folder") from None

    def render(self, messages: list[dict]) -> str:
        """The conversation as transformers' ``apply_chat_template(tokenize=False)`` renders it;
        a template that refuses it (``raise_exception``) or fails on it is a ConversationProblem."""
        import jinja2

        try:
            return self._template.render(messages=messages, tools=None, documents=None, add_generation_prompt=False,
                                         **self.special_tokens)
        except jinja2.TemplateError as err:
            raise ConversationProblem("chat template error", f"the chat template refuses it: {err}",
                                      "fix the record or leave it out") from None
        except Exception as err:  # templates are programs: any failure on this record is this record's problem
            raise ConversationProblem("chat template error",
                                      f"the chat template fails on it ({type(err).__name__}: {err})",
                                      "fix the record or leave it out") from None

    def assistant_spans(self, messages: list[dict], text: str) -> dict[int, tuple[int, int]]:
        """Where each assistant message's content lies in ``text`` (the rendering of ``messages``):
        {message index: (start, end)} in characters; a turn the template leaves out has none.

        Method: render once more with each assistant content replaced by a unique marker. The
        text around the markers is the template's own (headers, end-of-turn tokens, earlier
        turns), so the real rendering must be that text with each content put back in place of
        its marker; walking the real text piece by piece then gives every content's exact span,
        and the walk itself checks the result. Rendering prefixes instead (messages[:k] against
        messages[:k+1]) breaks on templates whose earlier turns render differently once a later
        turn follows (Qwen3 drops the thinking block of turns before the last user message); a
        search for the content strings could hit the same words in a prompt. Templates that trim
        the content (Llama 3, Gemma) are met by also trying the stripped content; a template that
        changes the content otherwise, or whose layout depends on the content's words, leaves
        the walk unmatched and the record is refused rather than masked wrongly."""
        assistant = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
        markers = dict(zip(assistant, _markers(messages, self.special_tokens, len(assistant))))
        marked = [dict(message, content=markers[i]) if i in markers else message for i, message in enumerate(messages)]
        try:
            rendered = self.render(marked)
        except ConversationProblem:
            rendered = None
        lost = ConversationProblem(
            "assistant turn not found",
            "the chat template renders the assistant content in a way whose place in the text cannot be told "
            "(it changes the content, or its layout depends on the content)", "use a template that writes the "
            "assistant content as it is, or leave the record out")
        if rendered is None:
            raise lost
        pieces, found = [], []  # the template's text between the rendered contents; which messages they are
        position = 0
        for index, marker in markers.items():
            count = rendered.count(marker)
            if count == 0:
                continue  # this turn is not in the text at all
            at = rendered.find(marker, position)
            if count > 1 or at < 0:
                raise lost  # written twice, or out of order
            pieces.append(rendered[position:at])
            found.append(index)
            position = at + len(marker)
        pieces.append(rendered[position:])
        if not text.startswith(pieces[0]):
            raise lost
        spans, position = {}, len(pieces[0])
        for k, index in enumerate(found):
            content, after = messages[index]["content"], pieces[k + 1]
            last = k == len(found) - 1
            for candidate in dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip())):
                end = position + len(candidate)
                if (text.startswith(candidate, position) and text.startswith(after, end)
                        and (not last or end + len(after) == len(text))):
                    break
            else:
                raise lost
            spans[index] = (position, end)
            position = end + len(after)
        return spans

    def conversation(self, record: dict, train_on: str) -> Conversation:
        """The rendered document of one record and the spans of the assistant turns trained on
        ("last": the last assistant message; "all": every one); ConversationProblem if the record
        is not a conversation to train on."""
        messages = checked_messages(record)
        text = self.render(messages)
        spans = self.assistant_spans(messages, text)
        last = max(i for i, message in enumerate(messages) if message["role"] == "assistant")
        if last not in spans:
            raise ConversationProblem("assistant turn not found",
                                      f"the chat template leaves the last assistant message (message {last + 1}) out "
                                      "of the text", "use the model's own template, or leave the record out")
        start, end = spans[last]
        if start == end:
            raise ConversationProblem("empty response", f"the last assistant message (message {last + 1}) is empty")
        chosen = [spans[last]] if train_on == "last" else [span for span in spans.values() if span[0] < span[1]]
        return Conversation(text, tuple(sorted(chosen)))


def _markers(messages: list[dict], special_tokens: dict, count: int) -> list[str]:
    """``count`` strings found nowhere in the conversation or the special tokens: private-use
    characters no tokenizer gives a meaning and no template strips."""
    blob = json.dumps([messages, special_tokens], ensure_ascii=False)
    lead = "\ue000"
    while lead in blob:
        lead += "\ue000"
    return [f"{lead}{k}\ue001" for k in range(count)]


def checked_messages(record: dict) -> list[dict]:
    """The record's messages, checked and prepared as transformers prepares them: keys holding
    null are dropped (a Parquet struct column has every field in every row, null where a message
    has none), and a message's reasoning is also given under the names templates read."""
    if "messages" not in record:
        present = ", ".join(sorted(map(repr, record))) or "none"
        raise ConversationProblem("missing key", f"no key 'messages' (keys present: {present})",
                                  'write each conversation as {"messages": [{"role": ..., "content": ...}, ...]}')
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise ConversationProblem("malformed conversation",
                                  f"'messages' holds {_json_type(messages) if messages != [] else 'an empty list'}, "
                                  "expected a list of messages")
    prepared = []
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise ConversationProblem("malformed message", f"message {number} is {_json_type(message)}, expected an "
                                      "object with 'role' and 'content'")
        message = {key: value for key, value in message.items() if value is not None}
        missing = [repr(key) for key in ("role", "content") if key not in message]
        if missing:
            raise ConversationProblem("malformed message", f"message {number} has no {' and no '.join(missing)}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ConversationProblem("unknown role", f"message {number} has role {role!r}; expected one of "
                                      f"{', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ConversationProblem("malformed message", f"message {number}'s content is {_json_type(content)}, "
                                      "expected a string")
        try:
            content.encode("utf-8")
        except UnicodeEncodeError as err:  # a lone surrogate escape: not text, tokenizers refuse it
            raise ConversationProblem("not UTF-8", f"message {number}'s content holds the lone surrogate escape "
                                      f"{content[err.start]!r} at character {err.start + 1}, which is not "
                                      "text") from None
        reasoning = next((message[key] for key in REASONING_FIELDS if message.get(key) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        prepared.append(message)
    if not any(message["role"] == "assistant" for message in prepared):
        raise ConversationProblem("no assistant turn", "no assistant message, so nothing to train on",
                                  "add the assistant's reply or leave the record out")
    return prepared
