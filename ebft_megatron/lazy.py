"""Package namespaces that import their modules on first use, so that importing one light module
of a package (a tokenizer, a sandbox, BLEU) does not pull in torch and megatron with it."""

from __future__ import annotations

import importlib


def lazy_exports(package: str, exports: dict[str, str]):
    """A module ``__getattr__`` serving ``exports`` (name -> module path) on first access."""

    def __getattr__(name):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name]), name)

    return __getattr__
