"""How ``tracebank`` prints the registry's answers (``banks``, ``lineage``, ``history``,
``promote``, ``rollback``, ``data restore``) and the data's (``add``, ``import``) for a person;
``--json`` prints the same data whole."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def show_lineage(result: dict[str, Any]) -> None:
    metrics = result.get("metrics") or {}
    threshold = (result.get("threshold") or {}).get("value")
    gates = result.get("gates") or {}
    corrupt = "  CORRUPT" if any(w.startswith(f"bank {result.get('bank_id')} is corrupt")
                                 for w in result.get("warnings") or []) else ""
    print(f"bank {result.get('bank_id')}  {result.get('status')}{corrupt}  created {result.get('created_at')}")
    for warning in result.get("warnings") or []:
        print(f"  WARNING    {warning}")
    kind = result.get("data_hash_kind") or "dvc-md5"
    print(f"  data       {result.get('data_spec')}  hash {result.get('data_hash')} ({kind})  "
          f"({len(result.get('files') or [])} training images)")
    dirty = "  (uncommitted changes)" if result.get("git_dirty") else ""
    print(f"  code       commit {result.get('git_commit')}{dirty}")
    print("  metrics    " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                     for k, v in metrics.items() if v is not None))
    record = result.get("threshold") or {}
    point = result.get("operating_point") or {}
    chosen_on = record.get("chosen_on") or "test split"
    shown = f"{threshold:.4f}" if isinstance(threshold, float) else threshold
    print(f"  threshold  {shown}  ({record.get('method')}, chosen on {chosen_on})")
    parts = [f"{name} {point[key]:{spec}}" for key, name, spec in (
        ("false_reject_rate", "false rejects", ".1%"), ("miss_rate", "misses", ".1%"), ("f1", "F1", ".3f"))
        if point.get(key) is not None]
    if parts:
        print(f"  operating  {'  '.join(parts)}  on the test split")
    for line in gate_lines(gates):
        print(f"  {line}")
    if result.get("promoted_at"):
        print(f"  promoted   {result['promoted_at']} by {result.get('promoted_by')}")
    evaluations = result.get("evaluations") or []
    if evaluations:
        print(f"  later      {len(evaluations)} evaluation(s) of this bank (its record above is unchanged):")
    for event in evaluations:
        shown = "  ".join(f"{k} {v:.4f}" for k, v in (event.get("metrics") or {}).items()
                          if k in ("image_auroc", "pro") and isinstance(v, float))
        print(f"    {event['time']}  gates {'passed' if event.get('gates_passed') else 'failed'}  "
              f"data {event.get('data_hash')}  {shown}"
              + "".join(f"\n      gate failed: {f}" for f in (event.get("gates") or {}).get("failures", [])))
    print("  history")
    for event in result.get("history") or []:
        extra = "".join(f"  {k} {event[k]}" for k in ("by", "reason", "from", "model_tag") if event.get(k))
        print(f"    {event['time']}  {event['event']}{extra}")
    print("  (--json for the whole record)")


def gate_lines(gates: dict[str, Any]) -> list[str]:
    """The gates of a run for a person: the verdict with how many checks did not run or
    passed within noise, then every check with its status in words."""
    checks = gates.get("checks") or []
    unrun = sum(c.get("status") == "not evaluated" for c in checks)
    noisy = sum("note" in c for c in checks)
    extra = "".join(f", {n} {what}" for n, what in ((unrun, "not evaluated"), (noisy, "within noise")) if n)
    lines = [f"gates      {'passed' if gates.get('passed') else 'FAILED'} "
             f"({gates.get('defects', 'real')} defects{extra})"]
    for c in checks:
        value = c.get("value")
        shown = f" = {value:.4f}" if isinstance(value, float) else ""
        status = {"failed": "FAILED", "not evaluated": "NOT EVALUATED"}.get(c.get("status", ""), c.get("status"))
        why = c.get("reason") or c.get("note") or c.get("detail")
        lines.append(f"  {status:<14}{c['name']}{shown}" + (f": {why}" if why else ""))
    return lines


def operating_line(metrics: dict[str, Any], threshold: float | None) -> str | None:
    """``rejects 3 of 120 good parts (2.5%), misses 7 of 95 defects (7.4%) at threshold
    21.63``: the operating point in words, or None without a threshold."""
    if threshold is None:
        return None
    parts = []
    for key, count, what in (("false_reject_rate", "n_good", "good parts"), ("miss_rate", "n_defect", "defects")):
        rate, n = metrics.get(key), metrics.get(count)
        if rate is not None and n:
            verb = "rejects" if key == "false_reject_rate" else "misses"
            parts.append(f"{verb} {round(rate * n)} of {n} {what} ({rate:.1%})")
    return ", ".join(parts) + f" at threshold {threshold:.4g}" if parts else None


def show_banks(result: dict[str, Any]) -> None:
    """One line a bank (a corrupt one's status says so), the registry's problems on stderr."""
    for row in result["banks"]:
        auroc = "-" if row["image_auroc"] is None else f"{row['image_auroc']:.3f}"
        status = f"CORRUPT: {row['problem']} ({row['status']})" if row.get("problem") else row["status"]
        print(f"{row['bank_id']}  {status:10s}  {row['created_at']}  image_auroc {auroc}")
    for problem in result.get("problems") or []:
        print(f"tracebank banks: WARNING: {problem}", file=sys.stderr)


def show_add(result: dict[str, Any]) -> None:
    print(f"added {result['n_added']} image(s) to {result['root']}/train/good, {result['n_duplicates']} "
          f"duplicate(s) skipped, {result['n_quarantined']} quarantined; data hash {result['data_hash']}")
    lines = [f"duplicate {d['source']}: same bytes as {d['same_as']}" for d in result["duplicates"]]
    lines += [f"quarantined {q['source']} -> {q['path']}: {q['reason']}" for q in result["quarantined"]]
    lines += [f"refused {r['source']}: {r['reason']}" for r in result["refused"]]
    print("\n".join(lines), end="\n" if lines else "")


def show_import(result: dict[str, Any]) -> None:
    print(f"imported {result['n_train']} training and {result['n_test']} test image(s) into {result['root']}; "
          f"data hash {result['data_hash']}")
    for item in result["skipped"]:
        print(f"skipped {item['path']}: {item['reason']}")


def show_history(result: dict[str, Any]) -> None:
    entries = result["entries"]
    if not entries:
        print("no promotions yet")
    for e in entries:
        print(f"{e.get('seq')}  {e['time']}  {e.get('from') or '-'} -> {e['to']}  {e.get('reason')}  "
              f"by {e.get('user')}")
    if result["production"]:
        print(f"production: {result['production']}")


def show_restore(result: dict[str, Any]) -> None:
    print(f"restored {result['files']} file(s) of bank {result['bank_id']}'s training data (DVC hash "
          f"{result['data_hash']}) into {result['to']}")


def show_promote(result: dict[str, Any]) -> None:
    if result.get("repaired"):
        print(f"production pointer rewritten from the promotion log: {result['bank_id']} is production "
              "(a repair entry in the log)")
        _reloaded(result)
        return
    if result.get("unchanged"):
        print(f"{result['bank_id']} is already the production bank (since {result['promoted_at']}, by "
              f"{result.get('promoted_by')}): nothing changed")
        return
    print(f"promoted {result['bank_id']}: now production (previous: {result.get('previous')})")
    _reloaded(result)


def show_rollback(result: dict[str, Any]) -> None:
    print(f"rolled back to {result['bank_id']}: now production (previous: {result.get('previous')})")
    _reloaded(result)


def json_default(value: Any) -> Any:
    """``json.dumps``'s ``default`` for the CLI's results: numpy scalars and paths."""
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _reloaded(result: dict[str, Any]) -> None:
    if "reload" in result:
        print(f"the service switched: it now serves {result['reload']['bank_id']} "
              f"(was {result['reload'].get('previous')})")


REGISTRY_VIEWS: dict[str, Callable[[dict[str, Any]], None]] = {
    "banks": show_banks, "lineage": show_lineage, "history": show_history, "data": show_restore,
    "promote": show_promote, "rollback": show_rollback, "add": show_add, "import": show_import,
}
