"""lmforge: train GPT and BERT language models from scratch on your own text.

The library API (`lmforge.api`) is loaded on first use, so `import lmforge` stays cheap:
`lmforge.train_tokenizer`, `lmforge.prepare`, `lmforge.train_model`, `lmforge.load`,
`lmforge.evaluate` and `lmforge.Model`.
"""

from lmforge.base.version import __version__

__all__ = ["Model", "__version__", "evaluate", "load", "prepare", "train_model", "train_tokenizer"]
_API = set(__all__) - {"__version__"}


def __getattr__(name: str):
    if name in _API:
        from lmforge import api

        return getattr(api, name)
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
