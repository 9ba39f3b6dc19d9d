"""`lmforge config`'s arguments (a group of cli.py, kept beside it): every run config key with its
default and meaning, or a commented YAML file of them; and `lmforge train --print-config`."""

from __future__ import annotations

import argparse
import sys


def add(sub) -> None:
    p = sub.add_parser("config", help="every run config key with its default and meaning (--yaml: as a file)",
                       description="List the keys of a run config (lmforge train CONFIG.yaml section.key=value): "
                                   "default, type and meaning. KEY narrows it to a section or a key.")
    p.add_argument("key", nargs="?", help="a section (train), a nested section (train.lora) or a key (train.lr)")
    p.add_argument("--yaml", action="store_true", help="a YAML config of the defaults, each key after its meaning")
    p.set_defaults(run=_config)


def _config(args: argparse.Namespace) -> int:
    from lmforge.commands.config import defaults_yaml, describe_keys
    sys.stdout.write(defaults_yaml(args.key) if args.yaml else describe_keys(args.key) + "\n")
    return 0


def print_train_config(args: argparse.Namespace) -> int:
    """`lmforge train ... --print-config`: the resolved config as YAML on stdout; nothing trained."""
    from pathlib import Path

    from lmforge.commands.config import print_config
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).exists():
        overrides, config = [config, *overrides], None  # `train --resume DIR key=value --print-config`
    if config is None and args.resume is None:
        raise ValueError("lmforge train --print-config: give a config file or --resume RUN_DIR")
    sys.stdout.write(print_config(config, overrides, args.resume))
    return 0
