"""``harness`` command line; one module per command (see ``harness.cli.main``).

``harness.cli:main`` is the console script and ``python -m harness.cli`` runs it. The helpers
other code imports from here (``build_parser``, ``setup_logging``, ``spec_from_args``, ``plan``,
``summary_text``) are loaded on first use, so importing this package stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from harness.cli.main import build_parser, main, setup_logging

__all__ = ["main", "build_parser", "setup_logging", "spec_from_args", "add_spec_args", "plan", "summary_text",
           "cmd_run", "cmd_list"]

_LAZY = {"spec_from_args": "harness.cli.run", "add_spec_args": "harness.cli.run", "plan": "harness.cli.run",
         "summary_text": "harness.cli.run", "cmd_run": "harness.cli.run", "cmd_list": "harness.cli.list"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'harness.cli' has no attribute {name!r}")
