import pytest


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from tests.fixtures import make_tokenizer

    return make_tokenizer(tmp_path_factory.mktemp("data_tokenizer"))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from ebft_megatron.data.tokenizers import Tokenizer

    return Tokenizer(tokenizer_dir)
