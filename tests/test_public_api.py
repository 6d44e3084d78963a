"""Every package exposes a sorted ``__all__`` whose names all exist (as httpx checks)."""

from __future__ import annotations

import importlib

import pytest

PACKAGES = [
    "sync",
    "edge_agent",
    "regional_relay",
    "cloud_hub",
    "simulator",
    "firmware_profiles",
    "novacron",
]


@pytest.mark.parametrize("name", PACKAGES)
def test_all_is_sorted_and_resolves(name: str) -> None:
    module = importlib.import_module(name)
    exported = list(getattr(module, "__all__", []))
    assert exported == sorted(exported), f"{name}.__all__ is not sorted"
    assert len(exported) == len(set(exported)), f"{name}.__all__ has duplicates"
    for attr in exported:
        assert hasattr(module, attr), f"{name}.__all__ names missing attribute {attr}"


def test_exception_tree_has_one_root() -> None:
    import sync

    for attr in sync.__all__:
        obj = getattr(sync, attr)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert issubclass(obj, sync.NovaCronError), attr
