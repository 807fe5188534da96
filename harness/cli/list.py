"""``harness list``: every defence, attack, metric, dataset and preset, with a one-line description.

Built-in components are described from their source without being imported (no torch);
installed plug-ins are imported to check them, and any plug-in that fails to import or whose
name clashes is listed under "skipped plug-ins" with its distribution, never in place of a
built-in.
"""

from __future__ import annotations

from harness.api.config import preset_names
from harness.api.registry import REGISTRIES


def cmd_list(args) -> int:
    problems = []
    for title, registry in REGISTRIES.items():
        print(f"{title}:")
        for name, description, origin in registry.catalog():
            where = "" if origin == "built-in" else f"  [plug-in: {origin}]"
            print(f"  {name:<20} {description}{where}")
        problems += registry.problems()
    print("presets:")
    for name in preset_names():
        print(f"  {name}")
    if problems:
        print("skipped plug-ins:")
        for problem in problems:
            print(f"  {problem}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("list", help="list registered defences, attacks, metrics, datasets and presets")
    p.set_defaults(func=cmd_list)
