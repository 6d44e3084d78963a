"""Read YAML configuration files into pydantic models, with errors that name the spot.

Shared by the firmware profile loader and the edge agent's config loader. Every
failure becomes a :class:`~sync._exceptions.ConfigError` naming the file, and the
line (YAML syntax) or the dotted field path (validation), so an operator can fix the
file without reading a traceback.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from sync._exceptions import ConfigError

M = TypeVar("M", bound=BaseModel)

# A configuration file larger than this is a mistake (or an attack), not a config.
MAX_FILE_BYTES = 1024 * 1024


class _StrictSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects duplicate mapping keys.

    Plain ``safe_load`` silently keeps the last of two equal keys, so a second
    ``relays:`` block would quietly replace the first. Same safety as
    ``yaml.safe_load``: only the constructors of ``SafeLoader`` are available.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable key: SafeLoader reports it below
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def format_loc(loc: tuple[int | str, ...]) -> str:
    """Render a pydantic error location as a dotted path, indices in brackets.

    Args:
        loc: the ``loc`` of one pydantic error, e.g. ``("relays", 0, "port")``.

    Returns:
        The path as written in the YAML file, e.g. ``"relays[0].port"``.
    """
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _describe(error: Mapping[str, Any]) -> str:
    msg = str(error["msg"])
    if error.get("type") == "value_error":
        # Our own validators word their messages fully; drop pydantic's prefix.
        return msg.removeprefix("Value error, ")
    value = error.get("input")
    if error.get("type") not in ("missing", "extra_forbidden") and isinstance(
        value, str | int | float | bool
    ):
        shown = repr(value)
        if len(shown) <= 60:
            msg += f" (got {shown})"
    return msg


def validation_error(exc: ValidationError, *, source: str, prefix: str = "") -> ConfigError:
    """Translate a pydantic ``ValidationError`` into a ``ConfigError``.

    The first error gives the ``field`` of the result; any further errors are listed
    in the message so one run shows everything that is wrong.

    Args:
        exc: the error raised by ``model_validate``.
        source: the file (or ``"<argv>"``) the data came from.
        prefix: dotted path of the validated data inside a larger document.

    Returns:
        The error to raise (``raise validation_error(...) from exc``).
    """
    errors = exc.errors(include_url=False)
    if not errors:  # pragma: no cover - pydantic never raises an empty error
        return ConfigError(str(exc), source=source, field=prefix)

    def path(error: Mapping[str, Any]) -> str:
        loc = format_loc(tuple(error["loc"]))
        return ".".join(p for p in (prefix, loc) if p)

    first, rest = errors[0], errors[1:]
    message = _describe(first)
    if rest:
        others = "; ".join(f"{path(e) or '<top>'}: {_describe(e)}" for e in rest)
        message += f" (and {len(rest)} more: {others})"
    return ConfigError(message, source=source, field=path(first))


def read_text_file(path: Path) -> str:
    """Read a UTF-8 config or manifest file of at most :data:`MAX_FILE_BYTES`.

    Raises:
        ConfigError: the file is missing, a directory, unreadable, too large or
            not UTF-8; the error names the file.
    """
    source = str(path)
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError as exc:
        raise ConfigError("file not found", source=source) from exc
    except IsADirectoryError as exc:
        raise ConfigError("is a directory, not a file", source=source) from exc
    except OSError as exc:
        raise ConfigError(f"cannot read file: {exc.strerror or exc}", source=source) from exc
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"file larger than {MAX_FILE_BYTES} bytes", source=source)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text (byte {exc.start})", source=source) from exc


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """Read a YAML file whose top level must be a mapping with string keys.

    Args:
        path: the file to read.

    Returns:
        The parsed mapping.

    Raises:
        ConfigError: the file is missing, unreadable, too large, not valid YAML
            (the message names the line) or not a mapping.
    """
    source = str(path)
    text = read_text_file(path)
    try:
        data = yaml.load(
            text, Loader=_StrictSafeLoader
        )  # a SafeLoader subclass: as safe as safe_load
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, source) from exc
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise ConfigError(f"expected a YAML mapping at the top level, got {kind}", source=source)
    bad_keys = [k for k in data if not isinstance(k, str)]
    if bad_keys:
        raise ConfigError(f"top-level keys must be strings, got {bad_keys[0]!r}", source=source)
    return data


def _yaml_error(exc: yaml.YAMLError, source: str) -> ConfigError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if mark is not None:
        where = f"line {mark.line + 1}, column {mark.column + 1}"
        return ConfigError(f"{where}: invalid YAML: {problem}", source=source)
    return ConfigError(f"invalid YAML: {problem}", source=source)


def load_yaml_model(path: Path, model: type[M], *, context: Mapping[str, Any] | None = None) -> M:
    """Read ``path`` and validate it as ``model``.

    Args:
        path: the YAML file.
        model: the pydantic model class to validate against.
        context: optional pydantic validation context.

    Returns:
        The validated model instance.

    Raises:
        ConfigError: any problem, naming the file and the line or field.
    """
    data = read_yaml_mapping(path)
    try:
        return model.model_validate(data, context=dict(context) if context else None)
    except ValidationError as exc:
        raise validation_error(exc, source=str(path)) from exc
