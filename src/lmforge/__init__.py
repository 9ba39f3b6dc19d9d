"""lmforge: train GPT and BERT language models from scratch on your own text."""

from lmforge.base.version import __version__

__all__ = ["__version__"]
