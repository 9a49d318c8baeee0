"""The `probflow` entry point: the subcommand list, the parser and `main`.

Each command module (`_training`, `_flow`, `_sampling`, `_curve`, `_demo`) exports `COMMANDS`, a
tuple of `Command`s (name, help, description, options, runner); `COMMANDS` below lists them in
the order `probflow --help` shows. Imports run one way: this module imports the command modules,
they import `_common`, and nothing imports this module but the package's `__init__`.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from . import _curve, _demo, _flow, _sampling, _signals, _supervise, _training
from ._common import CLIError, Command, compile_cache_dir, enable_compile_cache
from ._processes import is_multiprocess

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
                           formatter_class=_HelpFormatter,
                           parents=[parent])  # pyright: ignore[reportArgumentType]
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The console entry point: `probflow COMMAND [options]`.

    A multi-process run is supervised (`_supervise`): this process runs the command in a child
    and reports its fatal end in one line. Signals are handled by `_signals` (SIGINT: exit 130,
    SIGTERM: 143, or a checkpoint first for `probflow train`). Called as the command line
    (`argv` None) in one process, it ends the process itself once the command is done
    (`_exit_now`); called with `argv` it returns the exit status.
    """
    argv_given = argv
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if is_multiprocess(args) and not _supervise.is_worker():
        return _supervise.supervise(argv, args)
    worker = _supervise.is_worker()
    if worker:
        _supervise.become_worker()
    installed = _signals.install(args.command)
    try:
        code = _run(args)
    except SystemExit as e:
        if not worker:
            raise
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        if not worker:
            raise
        traceback.print_exc()  # a bug: shown, then leave without waiting for the peers
        code = 1
    try:
        if worker:
            code = _leave_run(code)
    finally:
        if installed:
            _signals.uninstall()
    if argv_given is None and not worker:
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    """End the `probflow` process once its command has finished: the exit handlers run and the
    standard streams are flushed as at a normal exit, but the interpreter's teardown (freeing
    every module, every compiled program and XLA's client: about 0.3 s after a solve) is
    skipped. Only where nothing else can still be running: no other non-daemon thread (a
    normal exit would wait for it) and one process (`_supervise` ends a multi-process run)."""
    import atexit
    import threading

    others = [t for t in threading.enumerate()
              if t is not threading.main_thread() and not t.daemon]
    if others:
        return
    atexit._run_exitfuncs()  # JAX's clean-up, logging's flush, weakref finalizers
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more to lose
            pass
    os._exit(code)


def _run(args) -> int:
    """Run the command; an expected failure is one line on stderr and its exit status."""
    if not args.no_compile_cache:
        enable_compile_cache()
    import jax

    from .._checkpoint import CheckpointError
    from .._failures import SolveError
    from .._run_dir import RunDirectoryError
    from .._train import TrainingDivergedError, TrainingStopped

    try:
        return int(args._run(args) or 0)
    except (CLIError, CheckpointError, ValueError, FileNotFoundError, FileExistsError) as e:
        lost = _peer_failure(e, args)  # a collective's error can arrive as a ValueError
        print(f"probflow {args.command}: error: {lost or e}", file=sys.stderr)
        return 2 if lost is None else 1
    except (TrainingDivergedError, RunDirectoryError, SolveError) as e:
        print(f"probflow {args.command}: error: {e}", file=sys.stderr)
        return 1
    except TrainingStopped as e:
        print(f"probflow {args.command}: terminated: {e}", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"probflow {args.command}: interrupted", file=sys.stderr)
        return 130
    except jax.errors.JaxRuntimeError as e:  # e.g. a collective of a multi-process run failed
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"probflow {args.command}: error: {_peer_failure(e, args) or first}",
              file=sys.stderr)
        return 1


def _peer_failure(e: Exception, args) -> str | None:
    """One line for an error of an operation across the processes of a multi-process run (a
    peer stopped), else None."""
    import jax

    text = str(e)
    try:
        several = jax.process_count() > 1
    except Exception:  # noqa: BLE001 - the runtime itself may be what failed
        several = False
    if not several or not (isinstance(e, jax.errors.JaxRuntimeError) or "Gloo" in text
                           or "heartbeat" in text or "CoordinationService" in text):
        return None
    first = (text.strip().splitlines() or [type(e).__name__])[0]
    lost = _supervise.describe_lost_peer(
        text, heartbeat_timeout=getattr(args, "heartbeat_timeout", None))
    return f"process {jax.process_index()}: " + (
        lost or f"an operation across the processes failed (another process stopped: see its "
                f"output): {first}")


def _leave_run(code: int) -> int:
    """A supervised process leaves its multi-process run: after success together with the
    others (JAX's shutdown barrier); after a failure at once, so that it never waits for peers
    that go on working (they stop within their heartbeat timeout, or at once if it was the
    coordinator, and report it in one line)."""
    if "jax" not in sys.modules:
        return code
    import jax
    from jax._src import distributed as jax_distributed

    if jax_distributed.global_state.client is None:
        return code
    if code == 0:
        jax.distributed.shutdown()
        return code
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
