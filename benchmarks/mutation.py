"""Share of mutants killed per module, from the results of the last ``mutmut run``.

    make mutate                          # runs mutmut, then this
    python -m benchmarks.mutation        # the table again, from mutants/ as it stands
    python -m benchmarks.mutation --floor 0.95

Reads ``mutmut results --all true`` (one ``    module.x_function__mutmut_N: status`` line per
mutant), groups the mutants by module and prints, per module, how many were killed and which
survived. A mutant is killed when a selected test failed on it, or it ran past its time limit
(mutmut's "timeout": the mutant looped). "no tests" counts against the module: no selected
test reaches that function, so nothing would notice it break. Exits 1 when a module is
below ``--floor`` (docs/mutation.md lists the survivors and why each is harmless).
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

#: mutmut statuses that mean some test noticed the mutant.
KILLED = ("killed", "timeout")


def parse_results(lines: Iterable[str]) -> dict[str, dict[str, str]]:
    """``{module: {mutant: status}}`` from the lines of ``mutmut results --all true``."""
    by_module: dict[str, dict[str, str]] = collections.defaultdict(dict)
    for line in lines:
        key, sep, status = line.strip().rpartition(": ")
        if not sep or "__mutmut_" not in key:
            continue
        module = key.rsplit(".", 1)[0]  # pipeline.lifecycle.gates.xǁGateConfigǁ__post_init____mutmut_1
        by_module[module][key] = status
    return dict(by_module)


def report(by_module: dict[str, dict[str, str]], floor: float) -> tuple[str, bool]:
    """The table and per-module survivors as text, and whether every module reaches ``floor``."""
    rows = [f"{'module':<32} {'mutants':>7} {'killed':>7} {'survived':>8} {'no tests':>8} {'killed %':>8}"]
    survivors: list[str] = []
    ok = True
    for module in sorted(by_module):
        statuses = collections.Counter(by_module[module].values())
        total = sum(statuses.values())
        killed = sum(statuses[s] for s in KILLED)
        share = killed / total
        ok &= share >= floor
        rows.append(f"{module:<32} {total:>7} {killed:>7} {statuses['survived']:>8} {statuses['no tests']:>8} "
                    f"{100 * share:>7.1f}%" + ("" if share >= floor else f"  below {100 * floor:.0f}%"))
        survivors += [f"  {key}: {status}" for key, status in sorted(by_module[module].items()) if status not in KILLED]
    text = "\n".join(rows)
    if survivors:
        text += "\n\nnot killed (`mutmut show NAME` prints the change):\n" + "\n".join(survivors)
    return text, ok


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--floor", type=float, default=0.9, help="smallest killed share per module (default 0.9)")
    args = parser.parse_args(argv)
    if not Path("mutants").is_dir():
        print("no mutants/ folder: run `make mutate` first", file=sys.stderr)
        return 2
    mutmut = Path(sys.executable).parent / "mutmut"
    out = subprocess.run([str(mutmut), "results", "--all", "true"], capture_output=True, text=True, check=True)
    by_module = parse_results(out.stdout.splitlines())
    if not by_module:
        print("mutmut reports no mutants: run `make mutate` first", file=sys.stderr)
        return 2
    text, ok = report(by_module, args.floor)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
