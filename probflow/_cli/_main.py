"""The `probflow` entry point: the subcommand list, the parser and `main`.

Each command module (`_training`, `_flow`, `_sampling`, `_curve`, `_demo`) exports `COMMANDS`, a
tuple of `Command`s (name, help, description, options, runner); `COMMANDS` below lists them in
the order `probflow --help` shows. Imports run one way: this module imports the command modules,
they import `_common`, and nothing imports this module but the package's `__init__`.
"""

from __future__ import annotations

import argparse
import sys

from . import _curve, _demo, _flow, _sampling, _training
from ._common import CLIError, Command, compile_cache_dir, enable_compile_cache

COMMANDS: tuple[Command, ...] = (
    *_training.COMMANDS,  # train, train-classifier
    *_flow.COMMANDS,  # bpd, encode, decode
    *_sampling.COMMANDS,  # sample, inpaint, colorize
    *_curve.COMMANDS,  # nfe-curve
    *_demo.COMMANDS,  # demo
)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (flags, and options whose
    help says in words what happens without them)."""

    def _get_help_string(self, action):
        help = action.help or ""
        flag = action.default is False or action.default is None
        if flag or action.default == argparse.SUPPRESS or "default:" in help:
            return help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (no usage dump)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _common_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--no-compile-cache", action="store_true",
        help=f"do not use JAX's persistent compilation cache (kept in {compile_cache_dir()}; "
             "set $PROBFLOW_CACHE_DIR to move it)",
    )
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="probflow",
        description="Score-based generative modelling through SDEs (Song et al. 2021). "
                    "`probflow COMMAND --help` describes each command's options.",
        formatter_class=_HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    parent = _common_options()
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description,
                           formatter_class=_HelpFormatter, parents=[parent])
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The console entry point: `probflow COMMAND [options]`."""
    args = build_parser().parse_args(argv)
    if not args.no_compile_cache:
        enable_compile_cache()
    from .._checkpoint import CheckpointError
    from .._failures import SolveError
    from .._train import TrainingDivergedError

    try:
        return int(args._run(args) or 0)
    except (CLIError, CheckpointError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"probflow {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (TrainingDivergedError, SolveError) as e:
        print(f"probflow {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"probflow {args.command}: interrupted", file=sys.stderr)
        return 130
