"""Write serving/requirements.txt, what the Bento installs, from pyproject.toml's ``serving`` extra.

    python tools/serving_requirements.py           # rewrite serving/requirements.txt
    python tools/serving_requirements.py --check   # exit 1 if it does not match the extra

The extra is the one list of the service's dependencies; this file is derived from it, never
edited by hand (tests/unit/test_serving_requirements.py runs ``--check``).
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"
TARGET = REPO / "serving" / "requirements.txt"
HEADER = (
    "# What the Bento installs to run serving.service: generated from pyproject.toml's `serving` extra\n"
    "# by `python tools/serving_requirements.py`; do not edit (a unit test checks that they agree).\n"
)


def serving_requirements(pyproject: Path = PYPROJECT) -> list[str]:
    """The ``serving`` extra's requirement strings, in their order."""
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    if "serving" not in extras:
        raise SystemExit(f"{pyproject} has no [project.optional-dependencies] serving extra")
    return [str(r) for r in extras["serving"]]


def render(requirements: list[str]) -> str:
    return HEADER + "".join(f"{r}\n" for r in requirements)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    text = render(serving_requirements())
    if args.check:
        current = TARGET.read_text() if TARGET.is_file() else ""
        if current != text:
            print(f"{TARGET.relative_to(REPO)} does not match pyproject.toml's serving extra; "
                  "run python tools/serving_requirements.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
