"""Find and load firmware profiles from the package and from extra directories.

Profiles are ``<name>.yaml`` files. The built-in ones ship inside this package;
operators may add directories of their own. When two directories hold a profile of
the same name, the one from the directory given last wins, and every extra
directory wins over the built-in set, so a site can refine a stock device class.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from os import PathLike
from pathlib import Path

from firmware_profiles._schema import PROFILE_NAME_PATTERN, FirmwareProfile
from firmware_profiles._yamlio import load_yaml_model
from sync._exceptions import ConfigError

PROFILE_SUFFIX = ".yaml"

_NAME_RE = re.compile(PROFILE_NAME_PATTERN)

StrPath = str | PathLike[str]


class UnknownProfileError(ConfigError):
    """No profile of that name exists in the searched directories.

    Attributes:
        name: the name that was asked for.
        known: every profile name that does exist, sorted.
    """

    def __init__(self, name: str, known: Sequence[str], *, source: str = "") -> None:
        self.name = name
        self.known = tuple(known)
        listing = ", ".join(self.known) if self.known else "none"
        super().__init__(
            f"unknown firmware profile {name!r} (known profiles: {listing})",
            source=source,
            field="profile" if source else "",
        )


def builtin_profile_dir() -> Path:
    """The directory holding the profiles shipped with NovaCron Edge."""
    return Path(__file__).resolve().parent


def _search_dirs(extra_dirs: Iterable[StrPath]) -> list[Path]:
    """Directories in order of increasing precedence; missing extra dirs are errors."""
    dirs = [builtin_profile_dir()]
    for entry in extra_dirs:
        path = Path(entry)
        if not path.is_dir():
            raise ConfigError("profile directory not found", source=str(path))
        dirs.append(path)
    return dirs


def _profile_files(extra_dirs: Iterable[StrPath]) -> dict[str, Path]:
    """Map each profile name to the file that defines it (highest precedence wins)."""
    files: dict[str, Path] = {}
    for directory in _search_dirs(extra_dirs):
        for path in sorted(directory.glob(f"*{PROFILE_SUFFIX}")):
            if path.is_file():
                files[path.stem] = path
    return files


def profile_names(extra_dirs: Iterable[StrPath] = ()) -> list[str]:
    """Names of every available profile, sorted, without parsing any file.

    Args:
        extra_dirs: directories searched in addition to the built-in one.

    Raises:
        ConfigError: an extra directory does not exist.
    """
    return sorted(_profile_files(extra_dirs))


def load_profile_file(path: StrPath) -> FirmwareProfile:
    """Load and validate one profile file.

    Args:
        path: a ``.yaml`` file; its stem must equal the profile's ``name``.

    Raises:
        ConfigError: the file is missing, not valid YAML (naming the line) or not a
            valid profile (naming the dotted field).
    """
    file = Path(path)
    profile = load_yaml_model(file, FirmwareProfile)
    if profile.name != file.stem:
        raise ConfigError(
            f"profile name {profile.name!r} does not match the file name {file.name!r}",
            source=str(file),
            field="name",
        )
    return profile


def _looks_like_path(name_or_path: str) -> bool:
    return "/" in name_or_path or "\\" in name_or_path or name_or_path.endswith((".yaml", ".yml"))


def load_profile(name_or_path: StrPath, extra_dirs: Iterable[StrPath] = ()) -> FirmwareProfile:
    """Load a profile by name, or from a file path.

    A value containing a path separator or ending in ``.yaml``/``.yml`` is a file;
    anything else is a profile name looked up in ``extra_dirs`` (last first) and then
    in the built-in directory.

    Args:
        name_or_path: a profile name such as ``"raspberry-pi-4"`` or a path.
        extra_dirs: directories searched before the built-in one.

    Returns:
        The validated profile.

    Raises:
        UnknownProfileError: no profile of that name (the message lists known names).
        ConfigError: the profile file is invalid, or an extra directory is missing.
    """
    if isinstance(name_or_path, PathLike) or _looks_like_path(name_or_path):
        return load_profile_file(name_or_path)
    files = _profile_files(extra_dirs)
    path = files.get(name_or_path) if _NAME_RE.match(name_or_path) else None
    if path is None:
        raise UnknownProfileError(name_or_path, sorted(files))
    return load_profile_file(path)


def list_profiles(extra_dirs: Iterable[StrPath] = ()) -> list[FirmwareProfile]:
    """Load every available profile, sorted by name.

    Args:
        extra_dirs: directories searched in addition to the built-in one.

    Raises:
        ConfigError: any profile file is invalid, or an extra directory is missing.
    """
    files = _profile_files(extra_dirs)
    return [load_profile_file(files[name]) for name in sorted(files)]
