"""DataConfig: checked when built, every error names the setting."""

import pytest

from ebft_megatron.data.sources import python_stdlib_dir
from ebft_megatron.data.config import DataConfig
from ebft_megatron.data.sources import STDLIB_EXCLUDED_DIRS, DataError, TranslationFormat


def test_default_is_the_python_standard_library():
    config = DataConfig()
    assert config.kind == "code"
    assert config.resolved_path() == python_stdlib_dir()
    assert config.resolved_exclude_dirs() == list(STDLIB_EXCLUDED_DIRS)
    assert DataConfig(path="/some/tree").resolved_exclude_dirs() == []


@pytest.mark.parametrize("settings,message", [
    (dict(kind="csv", path="x"), "data.kind: 'csv' is not one of jsonl, chat, code, translation, indexed"),
    (dict(kind="jsonl"), "data.path: required for kind=jsonl"),
    (dict(kind="jsonl", path=""), "data.path: expected a file or folder path"),
    (dict(kind="jsonl", path="x", prompt_key=""), "data.prompt_key: expected a non-empty string"),
    (dict(validation_fraction=1.0), r"data.validation_fraction: expected a number in \[0, 1\), got 1.0"),
    (dict(validation_fraction="0.1"), "data.validation_fraction"),
    (dict(max_documents=0), "data.max_documents: expected a positive integer or null, got 0"),
    (dict(skip_bad="yes"), "data.skip_bad: expected true or false"),
    (dict(extensions="py"), "data.extensions: expected a list of file suffixes"),
    (dict(extensions=["py"]), "data.extensions: 'py' is not a file suffix; write it with its dot"),
    (dict(exclude_dirs="test"), "data.exclude_dirs: expected a list of folder names"),
    (dict(kind="translation", path="x", target_lang="English"), "data.source_lang: required for kind=translation"),
    (dict(kind="translation", path="x", source_lang="de", target_lang="en", template="{src}: {source}"),
     r"data.template: unknown placeholder\(s\) \['src'\]"),
    (dict(kind="translation", path="x", source_lang="de", target_lang="en", template="{source_lang} only"),
     "data.template: must contain {source}"),
    (dict(kind="translation", path="x", source_lang="de", target_lang="en", template="{source"),
     "data.template: not a valid format string"),
])
def test_bad_settings(settings, message):
    with pytest.raises(DataError, match=message):
        DataConfig(**settings)


def test_translation_format_from_config():
    config = DataConfig(kind="translation", path="x.tsv", source_key="de", target_key="en", source_lang="German",
                        target_lang="English")
    assert config.translation_format() == TranslationFormat(
        "de", "en", "German", "English", "Translate from {source_lang} to {target_lang}:\n{source}\n")
