"""The options ``harness sweep`` and ``harness search`` share, defined once.

Both commands read a sweep file (or a preset's ``sweep:`` section), resolve every trial as ``harness
run`` would, run on Ray and resume when run again, so they take the same file argument, preset,
model, ``--set`` overrides, results folder, Ray address, dry run and progress switch. Where the two
commands mean something different by an option, the difference is here, next to the shared part:
a sweep's ``--model`` replaces its models axis (repeatable), a search runs on one model; a sweep's
``--preset`` names the preset whose ``sweep:`` section to run (default: none, the file's), a
search's the preset of its ``--defence``/``--attack`` (default smoke). Options only one command has
(``--storage``, ``--num-cpus`` ...; ``--budget``, ``--epsilon`` ...) stay in its module.

No import here is heavier than ``argparse``: the parser is built without torch or Ray.
"""

from __future__ import annotations

import argparse
from typing import Literal

Command = Literal["sweep", "search"]

_SPEC_HELP = {
    "sweep": "sweep YAML file (or a preset file with a sweep: section)",
    "search": "sweep file with a search: section (one search per defence x attack)",
}
_OUTPUT_HELP = {
    "sweep": "results folder (default: the sweep's output, else results/<name>)",
    "search": "results folder (default results/search, or the file's output)",
}


def add_grid_options(p: argparse.ArgumentParser, command: Command) -> None:
    """The sweep-file argument and ``--preset``, ``--model``, ``--set`` (see the module docstring)."""
    p.add_argument("spec", nargs="?", help=_SPEC_HELP[command])
    if command == "sweep":
        p.add_argument("--preset", help="run this preset's sweep: section (or: the base preset of SPEC)")
        p.add_argument("--model", action="append", help="replace the models axis (repeatable)")
    else:
        p.add_argument("--preset", default="smoke", help="preset name or YAML file (default smoke)")
        p.add_argument("--model", help="model id or folder; default: the preset's")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a dotted key of every trial's spec, after the sweep file's own set: (repeatable)")


def add_run_options(p: argparse.ArgumentParser, command: Command) -> None:
    """``--output``, ``--address``, ``--dry-run``, ``--no-progress``."""
    p.add_argument("--output", help=_OUTPUT_HELP[command])
    p.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else start Ray locally)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the DAG, its GPU hours and expected makespan; run nothing" if command == "sweep"
                   else "print the search space and an example trial; run nothing")
    p.add_argument("--no-progress", action="store_true", help="no live progress line" if command == "sweep"
                   else "no progress bars")
