"""Small input writers for the data tests."""

from __future__ import annotations

import json
from pathlib import Path

EOS_TEXT = "<|endoftext|>"


def write_lines(path: Path, lines: list[str | bytes]) -> Path:
    data = b"".join((line if isinstance(line, bytes) else line.encode("utf-8")) + b"\n" for line in lines)
    path.write_bytes(data)
    return path


def jsonl_line(**record) -> str:
    return json.dumps(record)


def write_code_tree(root: Path, count: int, prefix: str = "mod") -> list[str]:
    """``count`` small Python files spread over nested folders; returns their relative paths."""
    relative = []
    for i in range(count):
        rel = Path(f"pkg{i % 3}") / (f"sub{i % 2}" if i % 4 else "") / f"{prefix}{i}.py"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"def f{i}(a):\n    return a + {i}\n")
        relative.append(rel.as_posix())
    return relative


def documents_of(chunks, tokenizer) -> list[str]:
    """The documents' texts back from packed chunks (split on the EOS between documents)."""
    ids = [int(t) for row, length in zip(chunks.tokens, chunks.lengths) for t in row[: int(length)]]
    return tokenizer.decode(ids).split(EOS_TEXT)


# Tokens the chat templates below write; added to the test tokenizer as special tokens, as a chat
# model's tokenizer has them.
CHAT_SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                       "<|eot_id|>"]

# ChatML as Qwen writes it (a default system message when there is none); the assistant content is
# wrapped in {% generation %} so that transformers' assistant mask can serve as the reference.
CHATML_TEMPLATE = """{%- for message in messages %}
    {%- if loop.first and message['role'] != 'system' %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
    {{- '<|im_start|>' + message['role'] + '\\n' }}
    {%- if message['role'] == 'assistant' %}
        {% generation %}{{- message['content'] }}{% endgeneration %}
    {%- else %}
        {{- message['content'] }}
    {%- endif %}
    {{- '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Llama 3 style: BOS, a system header (the given system message or a default), contents trimmed,
# and roles that must alternate (raise_exception otherwise); {% generation %} as above.
LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = 'You are a helpful assistant.' %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system_message + '<|eot_id|>' }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {%- if message['role'] == 'assistant' %}
        {% generation %}{{- message['content'] | trim }}{% endgeneration %}
    {%- else %}
        {{- message['content'] | trim }}
    {%- endif %}
    {{- '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""


def make_chat_tokenizer(base: Path, out: Path, template: str, in_jinja_file: bool, bos_token: str = EOS_TEXT) -> Path:
    """The test tokenizer at ``base`` with the chat special tokens added and ``template`` saved as a
    chat model's folder has it: in chat_template.jinja or in tokenizer_config.json."""
    from tokenizers import Tokenizer as RawTokenizer
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer.from_file(str(Path(base) / "tokenizer.json"))
    raw.add_special_tokens(CHAT_SPECIAL_TOKENS)
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=EOS_TEXT, bos_token=bos_token).save_pretrained(str(out))
    (out / "chat_template.jinja").unlink(missing_ok=True)
    if in_jinja_file:
        (out / "chat_template.jinja").write_text(template)
    else:
        config = json.loads((out / "tokenizer_config.json").read_text())
        config["chat_template"] = template
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out
