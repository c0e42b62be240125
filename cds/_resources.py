"""Where the shipped data lives: rulesets/ and schemas/.

In an installed wheel they sit inside the package (``cds/_data/``, mapped there by pyproject's
force-include); in a source checkout or an editable install they are the repository's top-level
folders. Both are found the same way, from any working directory.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from pathlib import Path
from typing import Any


@functools.cache
def data_root(name: str) -> Path:
    packaged = resources.files("cds") / "_data" / name
    if packaged.is_dir():
        return Path(str(packaged))
    source = Path(__file__).resolve().parent.parent / name
    if source.is_dir():
        return source
    raise FileNotFoundError(f"cds data folder {name!r} is missing from this installation")


@functools.cache
def load_schema(name: str) -> Any:
    with open(data_root("schemas") / name, encoding="utf-8") as fh:
        return json.load(fh)
