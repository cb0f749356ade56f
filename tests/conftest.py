import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ebft_megatron.cli import quiet_imports  # noqa: E402

quiet_imports()
warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{family: (hf_dir, ckpt_dir)} for tiny random models of every supported family (tests.fixtures)."""
    from ebft_megatron.checkpoint import convert
    from tests.fixtures import FAMILIES, make_tiny_hf

    root = tmp_path_factory.mktemp("tiny_models")
    models = {}
    for family in FAMILIES:
        hf_dir = make_tiny_hf(family, root / f"{family}-hf")
        ckpt = convert.hf_to_mcore(hf_dir, root / f"{family}-mcore", log=lambda *_: None)
        models[family] = (hf_dir, ckpt)
    return models


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A small byte-level BPE tokenizer trained on a few lines of code (tests.fixtures)."""
    from tests.fixtures import make_tokenizer

    return make_tokenizer(tmp_path_factory.mktemp("data_tokenizer"))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from ebft_megatron.data.tokenizers import Tokenizer

    return Tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def chat_tokenizer_dirs(tokenizer_dir, tmp_path_factory):
    """{"chatml": folder, "llama3": folder}: the small tokenizer with chat special tokens and a chat
    template, ChatML (Qwen style) in chat_template.jinja and Llama 3 style in tokenizer_config.json."""
    from tests.data.helpers import CHATML_TEMPLATE, LLAMA3_TEMPLATE, make_chat_tokenizer

    root = tmp_path_factory.mktemp("chat_tokenizers")
    return {
        "chatml": make_chat_tokenizer(tokenizer_dir, root / "chatml", CHATML_TEMPLATE, in_jinja_file=True),
        "llama3": make_chat_tokenizer(tokenizer_dir, root / "llama3", LLAMA3_TEMPLATE, in_jinja_file=False,
                                      bos_token="<|begin_of_text|>"),
    }
