"""The ``harness`` command: the parser, logging and the dispatch to one module per command.

    harness run | list | analyze | sweep | search | status | leaderboard | nightly | schema ...

Each command lives in its own module with a ``register(subparsers)`` function. Only the module
of the command being run is imported (``harness --help`` and an unknown command import them all;
every command module keeps its heavy imports inside its handlers), so ``harness list``,
``harness --help`` and a refused bad input answer without importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
from typing import Optional, Sequence

from harness.api.errors import HarnessError
from harness.api.secrets import RedactingFilter, redact
from harness.lib.interrupts import Interrupted, exit_code, raise_on_signals

log = logging.getLogger("harness")

# command -> the modules whose ``register`` may add it, tried in order until one does. Only the
# chosen command's module is imported; ``--help`` and an unknown command import them all (a name
# registered twice keeps its first registration).
COMMANDS: dict[str, tuple[str, ...]] = {
    "run": ("harness.cli.run",),
    "list": ("harness.cli.list",),
    "analyze": ("harness.cli.analyze",),
    "sweep": ("harness.cli.sweep",),
    "search": ("harness.cli.search",),
    "status": ("harness.cli.sweep", "harness.sweep.status"),
    "leaderboard": ("harness.cli.leaderboard",),
    "nightly": ("harness.cli.leaderboard",),
    "schema": ("harness.cli.schema",),
}


def _exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


class _Subcommands:
    """The sub-parser action, remembering which commands are registered (first one wins)."""

    def __init__(self, action):
        self.action = action
        self.names: set[str] = set()
        self.done: set[str] = set()

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        if name in self.names:
            return argparse.ArgumentParser(prog=f"harness {name}", add_help=False)  # not attached
        self.names.add(name)
        return self.action.add_parser(name, **kwargs)

    def register(self, module: str) -> None:
        if module not in self.done and _exists(module):
            self.done.add(module)
            importlib.import_module(module).register(self)


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr, force=True)
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "fsspec", "huggingface_hub", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers reads this when it is imported (if ever): errors only, without importing it here
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:  # already imported (a test, a notebook): set it directly
        sys.modules["transformers"].utils.logging.set_verbosity_error()
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())


def _chosen_command(argv: Sequence[str]) -> Optional[str]:
    """The sub-command named in ``argv`` (the first argument that is not an option), if any."""
    for arg in argv:
        if arg == "--":
            return None
        if not arg.startswith("-"):
            return arg
    return None


def build_parser(argv: Optional[Sequence[str]] = None) -> argparse.ArgumentParser:
    """The parser. With ``argv``, only the module of the command it names is imported; without
    (or for ``--help`` / an unknown command) every command module is."""
    parser = argparse.ArgumentParser(prog="harness", description="Benchmark harness for defences against harmful "
                                     "fine-tuning: defences x attacks x scorers -> records and tables.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = _Subcommands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    chosen = _chosen_command(argv) if argv is not None else None
    for module in COMMANDS.get(chosen or "", ()):
        sub.register(module)
        if chosen in sub.names:
            return parser
    for modules in COMMANDS.values():
        for module in modules:
            sub.register(module)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        with raise_on_signals():  # SIGINT/SIGTERM: one line and 130/143 (docs/reliability.md), no traceback
            return int(args.func(args) or 0)
    except HarnessError as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except (IsADirectoryError, NotADirectoryError, FileNotFoundError, PermissionError) as exc:
        # the last line of defence for a path the checked readers (harness.api.safeio) did not see:
        # one line naming the file, exit 2, never a traceback
        where = f" {exc.filename!r}" if exc.filename else ""
        print(f"error: {redact(exc.strerror or str(exc))}:{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"interrupted: {exc if isinstance(exc, Interrupted) else 'by SIGINT'} (exit {exit_code(exc)})",
              file=sys.stderr)
        return exit_code(exc)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
