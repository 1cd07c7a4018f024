"""Text PostgreSQL can store: no NUL character (U+0000), which its text types refuse."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def find_nul(value: Any, where: str = "") -> str | None:
    """Where in ``value`` (a string, or lists and mappings of them, keys included) a NUL
    character is, as a path such as ``allowed_models[2]`` after ``where``; None if nowhere."""
    if isinstance(value, str):
        return where if "\x00" in value else None
    if isinstance(value, Mapping):
        for key, item in value.items():
            path = f"{where}.{key}" if where else str(key)
            if isinstance(key, str) and "\x00" in key:
                return path
            found = find_nul(item, path)
            if found is not None:
                return found
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = find_nul(item, f"{where}[{index}]")
            if found is not None:
                return found
    return None


def printable(path: str) -> str:
    """``path`` with its NUL characters written as ``\\u0000``, fit for a message."""
    return path.replace("\x00", "\\u0000")
