"""The `probflow` command line (entry point `probflow._cli:main`, also `python -m probflow`).

`_main`: the subcommand list, parser and `main`; `_common`: shared helpers (argument types,
tables, outputs, the compilation cache, `load_model`); one module per command group:
`_training` (train, train-classifier), `_flow` (bpd, encode, decode), `_sampling` (sample,
inpaint, colorize), `_curve` (nfe-curve), `_demo` (demo).
"""

from ._common import CLIError as CLIError
from ._main import build_parser as build_parser
from ._main import main as main
