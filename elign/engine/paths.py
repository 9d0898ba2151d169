"""``package:`` paths: data shipped inside an installed package, named in configs independent of the checkout."""

from __future__ import annotations

import importlib.resources

__all__ = ["resolve_package_path"]


def resolve_package_path(path: str) -> str:
    """``package:boltz_ft/data/pdb`` -> that folder inside the installed package; other paths unchanged."""
    if not str(path).startswith("package:"):
        return str(path)
    package, _, rest = str(path).removeprefix("package:").partition("/")
    return str(importlib.resources.files(package).joinpath(rest))
