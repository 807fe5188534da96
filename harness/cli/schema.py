"""``harness schema``: the JSON schema of the result record (``TrialRecord``).

    harness schema                                  # print it
    harness schema --out docs/record.schema.json    # write it (the committed copy; a test keeps it current)
"""

from __future__ import annotations

import json
from pathlib import Path

from harness.api.record import json_schema
from harness.lib.store import atomic_write_bytes


def schema_text() -> str:
    """The schema as the committed file holds it: indented JSON, keys in model order, final newline."""
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"


def cmd_schema(args) -> int:
    text = schema_text()
    if args.out:
        path = Path(args.out)
        atomic_write_bytes(path, text.encode("utf-8"))
        print(path)
    else:
        print(text, end="")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("schema", help="print or write the JSON schema of the result record",
                              description="The JSON schema of TrialRecord, the record every trial writes to "
                                          "RESULTS_DIR/<trial_id>.json (schema version included).")
    p.add_argument("--out", metavar="FILE", help="write it to FILE (e.g. docs/record.schema.json) instead of "
                                                 "printing it")
    p.set_defaults(func=cmd_schema)
