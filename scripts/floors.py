"""Print a pip constraints file pinning every runtime dependency to the oldest version pyproject.toml allows.

CI installs the gateway a second time with these pins and runs the integration and security tests
on it, so a floor that re-opens a hole (or breaks a feature) fails CI:
``python scripts/floors.py > floors.txt && pip install -c floors.txt -e .[dev]``.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def floors(dependencies: list[str]) -> list[str]:
    pins = []
    for dep in dependencies:
        spec, _, marker = dep.partition(";")
        m = re.match(r"\s*([A-Za-z0-9_.\-\[\]]+)\s*(.*)", spec)
        if m is None:
            continue
        name, versions = re.sub(r"\[.*\]", "", m.group(1)), m.group(2)
        exact = re.search(r"==\s*([^,\s]+)", versions)
        low = re.search(r">=\s*([^,\s]+)", versions)
        version = exact.group(1) if exact else low.group(1) if low else None
        if version is not None:
            pins.append(f"{name}=={version}" + (f";{marker}" if marker else ""))
    return pins


def main() -> int:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    print("\n".join(floors(project["dependencies"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
