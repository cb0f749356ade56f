"""data.kind=chat (conversations rendered with the tokenizer folder's chat template, the assistant
turns as the response) and Parquet input for kinds jsonl and chat.

transformers is the reference here: its ``apply_chat_template`` for the rendered text and the
tokens, and its assistant mask (from the templates' {% generation %} blocks) for the response mask.
"""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ebft_megatron.data import sources
from ebft_megatron.data.chat import ChatTemplate, ConversationProblem, load_chat_template
from ebft_megatron.data.config import DataConfig
from ebft_megatron.data.dataset import load_chunks
from ebft_megatron.data.reading import batch_encoder, encode_documents, offset_encoder, token_spans
from ebft_megatron.data.sources import DataError, SkipReport, read_chat, read_jsonl_pairs
from ebft_megatron.data.tokenizers import Tokenizer
from tests.data.helpers import CHATML_TEMPLATE, write_lines

STYLES = ("chatml", "llama3")


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "You answer briefly."}

CONVERSATIONS = [
    [user("What is 2 + 2?"), assistant("4")],  # no system message (both templates add a default one)
    [SYSTEM, user("Name a colour."), assistant("Blue.")],
    [SYSTEM, user("Hi"), assistant("Hello! How can I help?"), user("Tell me a joke."),
     assistant("Why did the chicken cross the road?\nTo get to the other side.")],
    # the last answer repeats the first question word for word; the first answer has surrounding
    # whitespace (which the Llama 3 template trims)
    [user("the sky is blue"), assistant("  Sure.\n"), user("Say it again."), assistant("the sky is blue")],
    # an empty earlier turn
    [user("Grüße 👋"), assistant(""), user("still there?"), assistant("Ja, natürlich. ✓")],
]


def write_jsonl(path: Path, records) -> Path:
    return write_lines(path, [json.dumps(record, ensure_ascii=False) for record in records])


def write_parquet(path: Path, records, row_group_size: int = 3) -> Path:
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=row_group_size)
    return path


def chats(conversations=CONVERSATIONS):
    return [{"messages": messages} for messages in conversations]


def reference(folder):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def runs(mask) -> list[tuple[int, int]]:
    """[start, end) of each run of True."""
    out, start = [], None
    for i, value in enumerate(list(mask) + [False]):
        if value and start is None:
            start = i
        elif not value and start is not None:
            out.append((start, i))
            start = None
    return out


def per_document(chunks, index):
    """(token ids, response mask) of document ``index`` of packed chunks, its EOS included."""
    inside = chunks.doc_ids.reshape(-1) == index
    return chunks.tokens.reshape(-1)[inside].tolist(), chunks.response_mask.reshape(-1)[inside].tolist()


# ---------------------------------------------------------------------------------------------
# Rendering


@pytest.mark.parametrize("style", STYLES)
def test_rendering_is_transformers_apply_chat_template(style, chat_tokenizer_dirs):
    folder = chat_tokenizer_dirs[style]
    hf = reference(folder)
    template = load_chat_template(folder)
    tokenizer = Tokenizer(folder)
    for messages in CONVERSATIONS:
        conversation = template.conversation({"messages": messages}, "all")
        assert conversation.text == hf.apply_chat_template(messages, tokenize=False)
        assert tokenizer.encode(conversation.text) == hf.apply_chat_template(messages, tokenize=True, return_dict=False)


def test_template_source_as_transformers_picks_it(tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    config = {"eos_token": "</s>", "bos_token": {"content": "<s>", "lstrip": False}, "chat_template": [
        {"name": "tool_use", "template": "tools"}, {"name": "default", "template": "{{ bos_token }}default"}]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_chat_template(folder).render([user("x")]) == "<s>default"  # a token saved as an object
    (folder / "chat_template.jinja").write_text("{{ eos_token }}from the file")
    assert load_chat_template(folder).render([user("x")]) == "</s>from the file"  # the file wins, as in transformers

    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(DataError, match=r"chat_template.jinja: the chat template is not valid Jinja \(template line 1"):
        load_chat_template(folder)
    (folder / "chat_template.jinja").unlink()
    config["chat_template"] = [{"name": "tool_use", "template": "tools"}]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match="several chat templates \\(tool_use\\) and none named 'default'"):
        load_chat_template(folder)


def test_template_environment_matches_transformers():
    """The helpers and filters transformers gives templates: tojson without HTML escaping, namespace,
    loop controls, {% generation %}; and its sandbox."""
    source = ("{%- set ns = namespace(n=0) %}{%- for m in messages %}{%- if m.role == 'system' %}{% continue %}"
              "{%- endif %}{%- set ns.n = ns.n + 1 %}{% generation %}{{ m | tojson }}{% endgeneration %}{%- endfor %}"
              "|{{ ns.n }}|{{ dict(a=1) | tojson }}")
    messages = [SYSTEM, user("<b> & é")]
    ours = ChatTemplate(source, "test").render(messages)
    from transformers.utils.chat_template_utils import render_jinja_template

    theirs, _ = render_jinja_template([messages], chat_template=source)
    assert ours == theirs[0] == '{"role": "user", "content": "<b> & é"}|1|{"a": 1}'
    with pytest.raises(Exception, match="refuses it"):
        ChatTemplate("{{ messages.__class__.__mro__ }}", "test").render(messages)


# ---------------------------------------------------------------------------------------------
# Response mask and anchor


def expected_contents(style, messages, train_on):
    contents = [m["content"].strip() if style == "llama3" else m["content"] for m in messages
                if m["role"] == "assistant"]
    return contents[-1:] if train_on == "last" else [content for content in contents if content]


@pytest.mark.parametrize("train_on", ["last", "all"])
@pytest.mark.parametrize("style", STYLES)
def test_response_mask_is_the_assistant_turns(style, train_on, chat_tokenizer_dirs, tmp_path):
    folder = chat_tokenizer_dirs[style]
    hf, tokenizer = reference(folder), Tokenizer(folder)
    path = write_jsonl(tmp_path / "chats.jsonl", chats())
    config = DataConfig(kind="chat", path=str(path), chat_train_on=train_on, validation_fraction=0)
    chunks = load_chunks(config, tokenizer, 64)
    assert chunks.num_documents == len(CONVERSATIONS)
    for index, messages in enumerate(CONVERSATIONS):
        ids, mask = per_document(chunks, index)
        out = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        expected_ids, assistant_mask = out["input_ids"], [bool(x) for x in out["assistant_masks"]]
        assert ids[:len(expected_ids)] == expected_ids  # the document is the whole rendered chat, tokenized whole
        assert not any(mask[len(expected_ids):])  # the EOS after it
        mask = mask[:len(expected_ids)]
        turns = runs(assistant_mask)
        if train_on == "last":
            last = turns[-1]
            assistant_mask = [last[0] <= i < last[1] for i in range(len(assistant_mask))]
        assert mask == assistant_mask  # transformers' assistant mask, from the {% generation %} blocks
        decoded = [tokenizer.decode(ids[a:b]) for a, b in runs(mask)]
        # a token may reach across the edge of a turn (a newline before leading spaces): strip to compare
        assert [text.strip() for text in decoded] == [c.strip() for c in expected_contents(style, messages, train_on)]


@pytest.mark.parametrize("train_on", ["last", "all"])
@pytest.mark.parametrize("style", STYLES)
def test_response_anchor_is_the_start_of_the_last_assistant_turn(style, train_on, chat_tokenizer_dirs, tmp_path):
    folder = chat_tokenizer_dirs[style]
    tokenizer = Tokenizer(folder)
    header = "<|im_start|>assistant\n" if style == "chatml" else "<|start_header_id|>assistant<|end_header_id|>\n\n"
    header_ids = tokenizer.encode(header)
    path = write_jsonl(tmp_path / "chats.jsonl", chats())
    anchor = 100
    config = DataConfig(kind="chat", path=str(path), chat_train_on=train_on, validation_fraction=0,
                        response_anchor=anchor)
    chunks = load_chunks(config, tokenizer, 200)
    assert len(chunks) == len(CONVERSATIONS)  # one chunk per conversation
    for row, messages in enumerate(CONVERSATIONS):
        tokens, mask, doc = chunks.tokens[row].tolist(), chunks.response_mask[row].tolist(), chunks.doc_ids[row]
        assert doc[anchor] == row and doc[anchor - 1] == row
        assert tokens[anchor - len(header_ids):anchor] == header_ids  # the prompt ends with the assistant header
        assert mask[anchor] and not mask[anchor - 1]
        end = next(i for i in range(anchor, len(mask)) if not mask[i])
        assert tokenizer.decode(tokens[anchor:end]) == expected_contents(style, messages, "last")[0]


def test_token_spans_take_every_token_that_overlaps_a_turn():
    """As transformers' assistant mask: a token reaching across the edge of a turn belongs to it."""
    offsets = [(0, 3), (3, 6), (6, 9), (9, 9), (9, 12)]  # (9, 9): a token of no characters
    assert token_spans(offsets, [(4, 9)]) == ((1, 3),)
    assert token_spans(offsets, [(0, 2), (6, 12)]) == ((0, 1), (2, 5))
    assert token_spans(offsets, [(12, 12)]) == ()


def test_encoding_without_offsets_cuts_at_the_turns(chat_tokenizer_dirs):
    """A tokenizer that cannot give offsets: the text is encoded in pieces cut at the turns' edges,
    which gives the same tokens and mask wherever no token reaches across an edge."""
    tokenizer = Tokenizer(chat_tokenizer_dirs["chatml"])
    template = load_chat_template(chat_tokenizer_dirs["chatml"])
    documents = [sources.Document((c.text,), "k", "o", c.response_chars)
                 for c in (template.conversation({"messages": m}, "all") for m in CONVERSATIONS[:3])]

    class NoOffsets:
        def encode_batch(self, texts):
            return tokenizer.encode_batch(texts)

    assert offset_encoder(NoOffsets()) is None
    with_offsets = encode_documents(documents, batch_encoder(tokenizer), offset_encoder(tokenizer))
    without = encode_documents(documents, batch_encoder(NoOffsets()))
    for (ids_a, start_a, spans_a), (ids_b, start_b, spans_b) in zip(with_offsets, without):
        assert ids_a.tolist() == ids_b.tolist() and start_a == start_b and spans_a == spans_b
        assert spans_a and spans_a[-1][0] == start_a  # the response start is the last turn's first token


def test_sentencepiece_offsets_are_characters(tmp_path):
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    corpus = ["héllo wörld, this is a test of sentencepiece offsets ünïcode", "def f(a): return a + 1"] * 50
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model, vocab_size=36, minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    tokenizer = Tokenizer(tmp_path / "tokenizer.model")
    text = "héllo wörld ünï"
    [(ids, offsets)] = tokenizer.encode_batch_with_offsets([text])
    assert ids == tokenizer.encode(text)
    # sentencepiece counts bytes (é is two); the spans are characters of the text, in order, covering it
    assert offsets[-1][1] == len(text) and all(b <= len(text) for _, b in offsets)
    assert "".join(text[a:b] for a, b in offsets) == text


# ---------------------------------------------------------------------------------------------
# Parquet


def pair_records(count=14):
    return [{"question": f"Question {i}: what is {i} + {i}?", "answer": f"It is {2 * i}.", "extra": i}
            for i in range(count)]


def chat_records():
    records = chats(CONVERSATIONS * 3)
    # a field only some messages have: a Parquet struct column holds it (null) in every message,
    # which must render as a message without it, as JSONL does
    records[1] = {"messages": [dict(SYSTEM, name="admin"), user("Name a colour."), assistant("Blue.")]}
    return records


def assert_same_chunks(a, b):
    assert a.tokens.equal(b.tokens) and a.doc_ids.equal(b.doc_ids) and a.lengths.equal(b.lengths)
    assert a.response_mask.equal(b.response_mask)
    assert a.num_documents == b.num_documents


@pytest.mark.parametrize("kind", ["jsonl", "chat"])
def test_parquet_gives_the_chunks_jsonl_gives(kind, chat_tokenizer_dirs, tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "PARQUET_BATCH_ROWS", 2)  # several row groups and batches per file
    tokenizer = Tokenizer(chat_tokenizer_dirs["llama3"])
    records = pair_records() if kind == "jsonl" else chat_records()
    jsonl = write_jsonl(tmp_path / "data.jsonl", records)
    parquet = write_parquet(tmp_path / "data.parquet", records)
    extra = {"chat_train_on": "all"} if kind == "chat" else {}
    for split in ("train", "validation"):
        a = load_chunks(DataConfig(kind=kind, path=str(jsonl), validation_fraction=0.3, **extra), tokenizer, 40,
                        split=split)
        b = load_chunks(DataConfig(kind=kind, path=str(parquet), validation_fraction=0.3, **extra), tokenizer, 40,
                        split=split)
        assert a.num_documents > 0
        assert_same_chunks(a, b)
    anchored = [load_chunks(DataConfig(kind=kind, path=str(path), validation_fraction=0, response_anchor=50, **extra),
                            tokenizer, 80) for path in (jsonl, parquet)]
    assert_same_chunks(*anchored)

    # several files: a folder of Parquet files reads as a glob of the same records in JSONL files
    (tmp_path / "pq" / "b").mkdir(parents=True)
    (tmp_path / "js" / "b").mkdir(parents=True)
    half = len(records) // 2
    for name, part in (("a", records[:half]), ("b/c", records[half:])):
        write_parquet(tmp_path / "pq" / f"{name}.parquet", part)
        write_jsonl(tmp_path / "js" / f"{name}.jsonl", part)
    for split in ("train", "validation"):
        a = load_chunks(DataConfig(kind=kind, path=str(tmp_path / "pq"), validation_fraction=0.3, **extra), tokenizer,
                        40, split=split)
        b = load_chunks(DataConfig(kind=kind, path=str(tmp_path / "js" / "**" / "*.jsonl"), validation_fraction=0.3,
                                   **extra), tokenizer, 40, split=split)
        assert_same_chunks(a, b)
    assert a.num_documents + load_chunks(DataConfig(kind=kind, path=str(tmp_path / "pq"), validation_fraction=0.3,
                                                    **extra), tokenizer, 40).num_documents == len(records)


def test_parquet_problems_name_file_and_row(tmp_path, chat_tokenizer_dirs):
    template = load_chat_template(chat_tokenizer_dirs["chatml"])
    path = write_parquet(tmp_path / "chats.parquet", chats([CONVERSATIONS[0], [user("a"), {"role": "tool",
                                                           "content": "b"}, assistant("c")], CONVERSATIONS[1]]))
    with pytest.raises(DataError) as err:
        list(read_chat(path, template, "last", False, SkipReport()))
    assert str(err.value) == (f"{path}:row 2: message 2 has role 'tool'; expected one of system, user, assistant; fix "
                              "the record, or set skip_bad=true to skip such inputs")
    report = SkipReport()
    assert len(list(read_chat(path, template, "last", True, report))) == 2
    assert dict(report.counts) == {"unknown role": 1}

    pairs = write_parquet(tmp_path / "pairs.parquet",
                          [{"question": "q", "answer": "a"}, {"question": "q", "answer": None}])
    with pytest.raises(DataError, match=r"pairs.parquet:row 2: key 'answer' holds null, expected a string"):
        list(read_jsonl_pairs(pairs, "question", "answer", False, SkipReport()))
    with pytest.raises(DataError, match=r"pairs.parquet: no column 'prompt' \(columns: 'question', 'answer'\); set "
                                        r"data.prompt_key to the right column"):
        list(read_jsonl_pairs(pairs, "prompt", "answer", True, SkipReport()))  # the whole file: not skipped
    with pytest.raises(DataError, match=r"pairs.parquet: no column 'messages' \(columns: 'question', 'answer'\)"):
        list(read_chat(pairs, template, "last", False, SkipReport()))
    fake = write_lines(tmp_path / "fake.parquet", ['{"question": "q", "answer": "a"}'])
    with pytest.raises(DataError, match="fake.parquet: cannot be read as Parquet"):
        list(read_jsonl_pairs(fake, "question", "answer", False, SkipReport()))
    with pytest.raises(DataError, match=r"nothing-\*.parquet: no files match this pattern \(data.path\)"):
        list(read_jsonl_pairs(tmp_path / "nothing-*.parquet", "question", "answer", False, SkipReport()))


# ---------------------------------------------------------------------------------------------
# Bad conversations


BAD_CHATS = [
    ({"conversation": []}, "no key 'messages' (keys present: 'conversation'); write each conversation as",
     "missing key"),
    ({"messages": "hi"}, "'messages' holds a string, expected a list of messages", "malformed conversation"),
    ({"messages": [{"content": "hi"}, assistant("x")]}, "message 1 has no 'role'", "malformed message"),
    ({"messages": [user("hi"), {"role": "assistant", "content": None}]}, "message 2 has no 'content'",
     "malformed message"),
    ({"messages": [user("hi"), assistant(3)]}, "message 2's content is a number, expected a string",
     "malformed message"),
    ({"messages": [{"role": "tool", "content": "x"}, assistant("y")]},
     "message 1 has role 'tool'; expected one of system, user, assistant", "unknown role"),
    ({"messages": [SYSTEM, user("a")]}, "no assistant message, so nothing to train on", "no assistant turn"),
    ({"messages": [user("a"), assistant("  ")]}, "the last assistant message (message 2) is empty", "empty response"),
    ({"messages": [user("a"), user("b"), assistant("c")]},
     "the chat template refuses it: Conversation roles must alternate user/assistant/user/assistant/...; fix the "
     "record or leave it out", "chat template error"),
]


@pytest.mark.parametrize("record,problem,reason", BAD_CHATS)
def test_bad_conversation_names_file_line_and_fix(record, problem, reason, chat_tokenizer_dirs, tmp_path):
    template = load_chat_template(chat_tokenizer_dirs["llama3"])
    path = write_lines(tmp_path / "chats.jsonl", [json.dumps(chats()[0]), json.dumps(record)])
    with pytest.raises(DataError) as err:
        list(read_chat(path, template, "last", False, SkipReport()))
    message = str(err.value)
    assert message.startswith(f"{path}:2: {problem}")
    assert message.endswith("set skip_bad=true to skip such inputs")


def test_bad_conversations_are_counted_with_skip_bad(chat_tokenizer_dirs, tmp_path):
    template = load_chat_template(chat_tokenizer_dirs["llama3"])
    good = chats()
    path = write_jsonl(tmp_path / "chats.jsonl", [good[0], *(record for record, _, _ in BAD_CHATS), good[1]])
    report = SkipReport()
    documents = list(read_chat(path, template, "last", True, report))
    assert [d.origin for d in documents] == [f"{path}:1", f"{path}:{len(BAD_CHATS) + 2}"]
    expected = {}
    for _, _, reason in BAD_CHATS:
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(report.counts) == expected


def test_a_template_that_changes_the_content_is_refused_not_masked_wrongly(tmp_path):
    template = ChatTemplate("{% for m in messages %}[{{ m.role }}] {{ m.content | upper }}\n{% endfor %}", "test")
    with pytest.raises(ConversationProblem, match="cannot be told"):
        template.conversation({"messages": [user("a"), assistant("b")]}, "last")


def test_a_tokenizer_without_chat_template(tokenizer, tokenizer_dir, tmp_path):
    path = write_jsonl(tmp_path / "chats.jsonl", chats())
    with pytest.raises(DataError, match=f"{tokenizer_dir}: the tokenizer has no chat template"):
        load_chunks(DataConfig(kind="chat", path=str(path)), tokenizer, 32)


def test_chat_settings():
    assert DataConfig(kind="chat", path="x").chat_train_on == "last"
    with pytest.raises(DataError, match="data.chat_train_on: 'first' is not one of last, all"):
        DataConfig(kind="chat", path="x", chat_train_on="first")
    DataConfig(kind="chat", path="x", response_anchor=8)  # conversations have a response to anchor
    with pytest.raises(DataError, match="kind jsonl, translation or chat"):
        DataConfig(kind="code", path="x", response_anchor=8)


def test_prepare_data_reads_chat_parquet(chat_tokenizer_dirs, tmp_path, capsys):
    """tools/prepare_data.py renders conversations as training does: the indexed corpus has the same
    tokens (an indexed corpus keeps no response mask). Run in this process: a fresh one spends most
    of its time importing."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "prepare_data_tool", Path(__file__).resolve().parents[2] / "tools" / "prepare_data.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    folder = chat_tokenizer_dirs["chatml"]
    path = write_parquet(tmp_path / "chats.parquet", chat_records())
    code = tool.main(["--kind", "chat", "--input", str(path), "--tokenizer", str(folder), "--output",
                      str(tmp_path / "corpus"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    tokenizer = Tokenizer(folder)
    raw = load_chunks(DataConfig(kind="chat", path=str(path), validation_fraction=0.3), tokenizer, 40)
    indexed = load_chunks(DataConfig(kind="indexed", path=str(tmp_path / "corpus"), validation_fraction=0.3),
                          tokenizer, 40)
    assert raw.tokens.equal(indexed.tokens) and raw.doc_ids.equal(indexed.doc_ids)
