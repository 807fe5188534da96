"""Examples from a local JSON, JSONL or CSV file, with a field mapping.

``{name: local, path: data.jsonl, fields: {prompt: question, response: answer, refusal: refusal}}``.
Dotted field names reach into nested objects (``prompt.text``). Rows whose prompt is empty are
errors that name the line; an empty file is an error.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field

from harness.api import safeio
from harness.api.components import DatasetLoader, Example
from harness.lib.data import first_line_error, maybe
from harness.api.errors import DataError
from harness.api.registry import DATASETS
from harness.lib.datasets.selection import SelectableConfig


def dig(row: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(row, dict):
            return None
        row = row.get(part)
    return row


def read_rows(path: Path, fmt: str = "auto") -> list[tuple[int, dict]]:
    """``[(line_number, row), ...]``; malformed input raises DataError naming the line."""
    safeio.check_input_file(path, "data file", DataError)
    fmt = fmt if fmt != "auto" else {".jsonl": "jsonl", ".json": "json", ".csv": "csv"}.get(path.suffix.lower(), "")
    if not fmt:
        raise DataError(f"data file {str(path)!r}: unknown format; use .json, .jsonl or .csv or set format")
    # a folder, FIFO, device, binary or non-UTF-8 file, or one over the size limit: one line, here
    text = safeio.read_text(path, "data file", limit=safeio.max_data_bytes(), error=DataError)
    if not text.strip():
        raise DataError(f"data file {str(path)!r} is empty")
    rows: list[tuple[int, dict]] = []
    if fmt == "jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise first_line_error(str(path), n, f"invalid JSON ({exc.msg})") from None
            except RecursionError:
                raise first_line_error(str(path), n, "JSON nested too deeply") from None
            if not isinstance(row, dict):
                raise first_line_error(str(path), n, "expected a JSON object")
            rows.append((n, row))
    elif fmt == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise first_line_error(str(path), exc.lineno, f"invalid JSON ({exc.msg})") from None
        except RecursionError:
            raise DataError(f"data file {str(path)!r}: JSON nested too deeply") from None
        if isinstance(data, dict):
            data = next((v for v in data.values() if isinstance(v, list)), None)
        if not isinstance(data, list):
            raise DataError(f"data file {str(path)!r}: expected a JSON list of objects")
        for n, row in enumerate(data, 1):
            if not isinstance(row, dict):
                raise DataError(f"data file {str(path)!r}: item {n} is not an object")
            rows.append((n, row))
    else:
        # a cell may be as long as the file (a long cell is cut later, before tokenizing: harness.lib.data)
        csv.field_size_limit(max(csv.field_size_limit(), min(len(text) + 1, 2**31 - 1)))
        try:
            reader = csv.DictReader(io.StringIO(text, newline=""))
            for n, row in enumerate(reader, 2):
                if None in row:
                    raise first_line_error(str(path), n, "more cells than header columns")
                rows.append((n, dict(row)))
        except csv.Error as exc:
            raise first_line_error(str(path), reader.line_num, f"invalid CSV ({exc})") from None
    if not rows:
        raise DataError(f"data file {str(path)!r} holds no rows")
    return rows


@DATASETS.register("local")
class LocalFile(DatasetLoader):
    """Harmful QA rows from a local JSON/JSONL/CSV file with a field mapping."""

    provides = ("response",)  # the mapped answer field; refusals only when mapped

    class Config(SelectableConfig):
        path: str
        format: Literal["auto", "json", "jsonl", "csv"] = "auto"
        fields: dict[Literal["prompt", "response", "refusal"], str] = Field(
            default_factory=lambda: {"prompt": "prompt", "response": "response", "refusal": "refusal"})

    def load(self) -> list[Example]:
        path = Path(self.config.path).expanduser()
        fields = {"prompt": "prompt", "response": "response", "refusal": "refusal", **self.config.fields}
        out = []
        for n, row in read_rows(path, self.config.format):
            for role, key in fields.items():  # a mapped field holds text (or nothing), never a number or object
                value = dig(row, key)
                if value is not None and not isinstance(value, str):
                    raise first_line_error(str(path), n, f"field {key!r} ({role}) is a {type(value).__name__}, "
                                                         "not text")
            prompt = maybe(dig(row, fields["prompt"]))
            if prompt is None:
                raise first_line_error(str(path), n, f"field {fields['prompt']!r} (prompt) is missing or empty")
            out.append(Example(prompt=prompt, response=maybe(dig(row, fields["response"])),
                               refusal=maybe(dig(row, fields["refusal"])), meta={"line": n}))
        return out

    def describe_source(self) -> str:
        return f"local file {self.config.path}"
