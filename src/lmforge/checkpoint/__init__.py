"""Checkpoints: the folder format, atomic save, verified load, retention and `load_model`."""

from lmforge.checkpoint.format import Checkpoint, CheckpointError, ignore_sigxfsz
from lmforge.checkpoint.load import load_checkpoint, read_manifest
from lmforge.checkpoint.model import load_model, resolve_checkpoint
from lmforge.checkpoint.retention import clean_stale_temp, find_latest, prune_epochs
from lmforge.checkpoint.save import save_checkpoint

__all__ = ["Checkpoint", "CheckpointError", "clean_stale_temp", "find_latest", "ignore_sigxfsz",
           "load_checkpoint", "load_model", "prune_epochs", "read_manifest", "resolve_checkpoint",
           "save_checkpoint"]
