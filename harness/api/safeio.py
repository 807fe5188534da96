"""Reading the files and naming the folders a user hands the harness: one checked way for all.

Every file the harness reads because a user named it (a preset or sweep YAML, a data file, a key
file, a cache it wrote earlier) goes through ``read_text`` / ``load_yaml`` / ``load_json``, and
every folder it will write into (``--output``, ``--checkpoints``, a sweep's storage) through
``check_output_dir``. Each refuses, with one line naming the file and what is wrong, before any
model loads:

- a path with a component over 255 bytes (``NAME_MAX``), a NUL byte, or a parent that is a file;
- a folder where a file belongs, or a FIFO, socket or device (opened, a FIFO would block forever);
- a file over a size limit (``MAX_CONFIG_BYTES`` for YAML/JSON settings, ``MAX_DATA_BYTES`` for
  data files; raised with the environment variables ``HARNESS_MAX_CONFIG_MB`` / ``HARNESS_MAX_DATA_MB``);
- binary content (a NUL byte) or text that is not UTF-8 (the offset of the first bad byte is named);
- YAML whose aliases expand past ``MAX_YAML_NODES`` nodes (a "billion laughs": nine anchors of
  nine aliases each expand to 10^9 values from 300 bytes) or that nests past ``MAX_DEPTH``;
- JSON nested past what the parser can hold (reported, not a ``RecursionError``).

The error class is the caller's (``ConfigError`` for settings, ``DataError`` for data), so the CLI
reports every one as ``error: <one line>`` with exit code 2.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, Optional

import yaml

from harness.api.errors import ConfigError

NAME_MAX = 255  # bytes of one path component (Linux, macOS)
PATH_MAX = 4096
MAX_YAML_NODES = 100_000  # values a YAML document may expand to, aliases counted at every use
MAX_DEPTH = 200  # nesting of YAML collections


def _limit(env: str, default_mb: int) -> int:
    raw = os.environ.get(env)
    if raw:
        try:
            return int(float(raw) * (1 << 20))
        except ValueError:
            raise ConfigError(f"environment variable {env}={raw!r}: must be a number of megabytes") from None
    return default_mb << 20


def max_config_bytes() -> int:
    """Size limit of a settings file (preset, sweep, suite, JSON side file): 16 MB by default."""
    return _limit("HARNESS_MAX_CONFIG_MB", 16)


def max_data_bytes() -> int:
    """Size limit of a data file (JSON/JSONL/CSV/text rows): 4096 MB by default."""
    return _limit("HARNESS_MAX_DATA_MB", 4096)


def _mb(n: int) -> str:
    return f"{n / (1 << 20):.1f} MB"


def check_path(path: str | os.PathLike, what: str, error: type[Exception] = ConfigError) -> Path:
    """``path`` as a ``Path`` if the operating system can name it: no NUL byte, no component over
    255 bytes, at most 4096 bytes in all; else ``error`` naming ``what``."""
    text = os.fspath(path)
    if not isinstance(text, str):
        text = os.fsdecode(text)
    if not text.strip():
        raise error(f"{what}: empty path")
    if "\0" in text:
        raise error(f"{what} {text!r}: a path cannot hold a NUL byte")
    raw = os.fsencode(text)
    if len(raw) > PATH_MAX:
        raise error(f"{what} {text[:60]!r}...: path is {len(raw)} bytes, over the limit of {PATH_MAX}")
    for part in Path(text).parts:
        size = len(os.fsencode(part))
        if size > NAME_MAX:
            raise error(f"{what} {text[:60]!r}...: path component {part[:24]!r}... is {size} bytes, over the "
                        f"file-system limit of {NAME_MAX}")
    return Path(text)


def check_input_file(path: str | os.PathLike, what: str, error: type[Exception] = ConfigError) -> os.stat_result:
    """The ``stat`` of an existing regular file at ``path``, else ``error`` with one line saying why."""
    p = check_path(path, what, error)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise error(f"{what} {str(p)!r} does not exist") from None
    except NotADirectoryError:
        raise error(f"{what} {str(p)!r}: a parent of it is a file, not a folder") from None
    except PermissionError:
        raise error(f"{what} {str(p)!r}: permission denied") from None
    except OSError as exc:
        raise error(f"{what} {str(p)!r}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{what} {str(p)!r} is a folder, not a file")
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file")
        raise error(f"{what} {str(p)!r} is {kind}, not a regular file")
    return st


def read_bytes(path: str | os.PathLike, what: str, *, limit: Optional[int] = None,
               error: type[Exception] = ConfigError) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (``max_config_bytes()`` by default)."""
    limit = max_config_bytes() if limit is None else limit
    st = check_input_file(path, what, error)
    env = "HARNESS_MAX_DATA_MB" if limit == max_data_bytes() else "HARNESS_MAX_CONFIG_MB"
    if st.st_size > limit:
        raise error(f"{what} {os.fspath(path)!r} is {_mb(st.st_size)}, over the limit of {_mb(limit)} "
                    f"(raise it with {env}=<megabytes>)")
    try:
        with open(path, "rb") as fh:  # what stat saw, and one byte more to notice growth
            data = fh.read(min(st.st_size, limit) + 1)
            while len(data) <= limit and len(data) > st.st_size:
                more = fh.read(min(1 << 20, limit + 1 - len(data)))
                if not more:
                    break
                data += more
    except OSError as exc:
        raise error(f"{what} {os.fspath(path)!r}: cannot be read: {exc.strerror or exc}") from None
    if len(data) > limit:  # grew while we looked
        raise error(f"{what} {os.fspath(path)!r} is over the limit of {_mb(limit)} (raise it with {env}=<megabytes>)")
    return data


def decode_text(data: bytes, where: str, error: type[Exception] = ConfigError) -> str:
    """``data`` as UTF-8 text (a BOM dropped), or ``error``: binary (NUL bytes) or not UTF-8."""
    nul = data.find(b"\0")
    if nul >= 0:
        raise error(f"{where} is binary, not text (a NUL byte at offset {nul})")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise error(f"{where} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}, line {line}); "
                    "save it as UTF-8") from None
    return text[1:] if text.startswith("\ufeff") else text


def read_text(path: str | os.PathLike, what: str, *, limit: Optional[int] = None,
              error: type[Exception] = ConfigError) -> str:
    """The UTF-8 text of a regular file of at most ``limit`` bytes; every refusal is ``error``."""
    return decode_text(read_bytes(path, what, limit=limit, error=error), f"{what} {os.fspath(path)!r}", error)


# ---- YAML ---------------------------------------------------------------------------------------
def _expanded_size(root: yaml.Node, where: str, error: type[Exception]) -> int:
    """The number of values ``root`` stands for once every alias is expanded (memoised per node, so
    a billion laughs is counted in microseconds, never built)."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node, depth: int) -> int:
        if depth > MAX_DEPTH:
            raise error(f"{where}: nested more than {MAX_DEPTH} levels deep")
        key = id(node)
        if key in sizes:
            return sizes[key]
        sizes[key] = 1  # a recursive alias counts once (and the constructor handles the cycle)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child, depth + 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k, depth + 1) + size(v, depth + 1) for k, v in node.value)
        total = min(total, MAX_YAML_NODES + 1)
        sizes[key] = total
        return total

    return size(root, 0)


def flow_depth(text: str) -> int:
    """The deepest nesting of YAML flow brackets (``[``/``{``) in ``text``, quoted scalars and
    comments skipped: a cheap look before the parser, whose scanner is quadratic in that depth."""
    depth = deepest = 0
    i, n = 0, len(text)
    prev = "\n"
    while i < n:
        c = text[i]
        if c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth = max(0, depth - 1)
        elif c == "#" and prev in " \t\n":
            j = text.find("\n", i)
            i = n if j < 0 else j
            prev = "\n"
            continue
        elif c in "'\"" and prev in " \t\n[{,:-":  # a quoted scalar starts: skip to its end
            j = i + 1
            while j < n:
                if c == '"' and text[j] == "\\":
                    j += 2
                    continue
                if text[j] == c:
                    if c == "'" and j + 1 < n and text[j + 1] == "'":
                        j += 2
                        continue
                    break
                j += 1
            i = j + 1
            prev = c
            continue
        if c not in " \t":
            prev = c
        elif prev != "\n":
            prev = c
        if c == "\n":
            prev = "\n"
        i += 1
    return deepest


def parse_yaml(text: str, where: str, error: type[Exception] = ConfigError) -> Any:
    """YAML ``text`` (safe tags only) as Python data, or ``error`` naming ``where``, the line and
    the problem. Aliases are allowed but the document may expand to at most ``MAX_YAML_NODES``,
    and collections may nest at most ``MAX_DEPTH`` deep."""
    if flow_depth(text) > MAX_DEPTH:
        raise error(f"{where}: nested more than {MAX_DEPTH} levels deep")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        n = _expanded_size(node, where, error)
        if n > MAX_YAML_NODES:
            raise error(f"{where}: its aliases expand to more than {MAX_YAML_NODES:,} values (a 'billion laughs' "
                        "document?); write the values out or use fewer nested aliases")
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise error(f"{where} is not valid YAML: {at}{what}") from None
    except RecursionError:
        raise error(f"{where}: nested too deeply") from None
    finally:
        loader.dispose()


def load_yaml(path: str | os.PathLike, what: str, error: type[Exception] = ConfigError) -> Any:
    """A YAML file read with ``read_text`` and parsed with ``parse_yaml``."""
    return parse_yaml(read_text(path, what, error=error), f"{what} {os.fspath(path)!r}", error)


# ---- JSON ---------------------------------------------------------------------------------------
def parse_json(text: str, where: str, error: type[Exception] = ConfigError) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{where}: line {exc.lineno}: invalid JSON ({exc.msg})") from None
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply") from None


def load_json(path: str | os.PathLike, what: str, *, limit: Optional[int] = None,
              error: type[Exception] = ConfigError) -> Any:
    return parse_json(read_text(path, what, limit=limit, error=error), f"{what} {os.fspath(path)!r}", error)


# ---- output folders -------------------------------------------------------------------------------
def check_output_dir(path: str | os.PathLike, what: str, error: type[Exception] = ConfigError) -> Path:
    """``path`` if it is a folder the harness can write into, or can create: it is not a file, no
    parent of it is a file, and the nearest existing folder is writable. Creates nothing."""
    p = check_path(path, what, error)
    probe = p
    while True:
        try:
            st = os.stat(probe)
        except FileNotFoundError:
            parent = probe.parent if str(probe.parent) != str(probe) else None
            if parent is None or str(probe) in ("", "."):
                break
            probe = parent if str(parent) else Path(".")
            continue
        except NotADirectoryError:
            probe = probe.parent
            continue
        except OSError as exc:
            raise error(f"{what} {str(p)!r}: {exc.strerror or exc}") from None
        if not stat.S_ISDIR(st.st_mode):
            if probe == p:
                raise error(f"{what} {str(p)!r} is a file, not a folder; choose a folder")
            raise error(f"{what} {str(p)!r}: {str(probe)!r} is a file, not a folder")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise error(f"{what} {str(p)!r}: {str(probe)!r} is not writable")
        break
    return p


# ---- caches the harness wrote ------------------------------------------------------------------
def quarantine(path: str | os.PathLike, why: str, what: str = "cache file") -> Optional[Path]:
    """Move a damaged file (or folder) aside to ``<name>.damaged-<UTC time>`` so the next run does
    not trip on it again, and say so (WARNING naming both paths). Returns the new path, or ``None``
    when it could not be moved (it is then left where it is, and the WARNING says how to clear it)."""
    import logging
    import time

    log = logging.getLogger("harness.safeio")
    src = Path(path)
    dest = src.with_name(f"{src.name}.damaged-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}")
    try:
        os.replace(src, dest)
    except OSError as exc:
        log.warning("%s %s is damaged (%s) and cannot be moved aside (%s); delete it to clear it", what, src, why,
                    exc.strerror or exc)
        return None
    log.warning("%s %s is damaged (%s): moved aside to %s and computed again (delete that copy when done)",
                what, src, why, dest)
    return dest


def read_json_cache(path: str | os.PathLike, what: str = "cache file", check=None) -> Optional[Any]:
    """The JSON value of a cache file the harness wrote, or ``None`` when there is none. A damaged
    one (a folder, binary, not JSON, or a value ``check`` rejects with ``ValueError``) is moved
    aside with a WARNING (``quarantine``) and ``None`` returned, so the caller computes it again
    instead of failing the same way on every rerun."""
    p = Path(path)
    if not os.path.lexists(p):
        return None
    try:
        value = load_json(p, what, limit=max_data_bytes())
        if check is not None:
            check(value)
        return value
    except (ConfigError, ValueError, TypeError) as exc:
        quarantine(p, str(exc).replace(f"{what} {str(p)!r}", "").strip(" :") or type(exc).__name__, what)
        return None
