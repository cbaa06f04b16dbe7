"""Does the decision threshold hold still when a few new good images arrive?

    python -m benchmarks.threshold_study                  # the suite, 2000 draws per case
    python -m benchmarks.threshold_study --data elpv:mono --draws 500 --json

For every dataset and calibration share (0.1, 0.2, 0.3) one bank is fitted with the project
defaults (``tracebank fit``'s settings) on the good training images the pipeline keeps for
training at that share: those whose :func:`~pipeline.data.datasets.calibration_draw` is at
least the share. The held-out ones are the calibration split, exactly as
:func:`~pipeline.data.datasets.hold_out_calibration` chooses it. The bank scores the
calibration split and the test split; banks and scores are cached under ``--cache``.

New good images: the good test images stand for them. In each draw ``k`` of them (1, 5, 20)
are drawn without replacement as the arrivals, each lands in calibration with the share's
probability (the hash rule on a new name is uniform, so this is its distribution), and the
false-reject rate is measured on the other good test images, before and after, with the same
images both times. No image is ever both in calibration and in the images an FRR is measured
on, and the arrivals are drawn from the same population as those images, so the change is
unbiased. An arrival that does not land goes to training and extends the bank; the simulation
keeps the bank fixed (scores of the other images unchanged), and ``--extend-check`` measures
what a real :func:`~pipeline.lifecycle.fitting.extend_bank` with 5 and 20 of them changes.

Band, fixed before the results were looked at: a threshold holds still when, for ``k`` = 1
and 5 on EVERY dataset, the 95th percentile of ``|dFRR|`` over the draws in which at least
one image landed in calibration is at most 0.01 (the incident case, not diluted by the draws
where nothing lands). Among those in the band, the FRR must stay near the 1% target: its
mean over resampled calibration splits (``frr_rs``: random calibration sets of the same size
drawn from all good images the bank has not seen, FRR on the rest) at most 0.02 on every
dataset; ties go to the smaller share (more images fitted).

Columns: ``n_cal`` calibration images, ``thr`` the threshold, ``frr`` its false-reject rate
on all good test images (one split: the project's), ``frr_rs`` the mean FRR over resampled
splits, ``miss`` the defective test images it accepts, then per ``k`` the mean / 95th
percentile / max of ``|dFRR|`` over all draws, ``p95L`` the 95th percentile over draws where
something landed, ``>bandL`` the share of those with ``|dFRR|`` above the band (the rare jump
when an arrival lands above the top calibration scores, which a 95th percentile cannot see),
and ``dthr%`` the mean relative threshold move over those. A first table gives each bank:
training images, calibration images, image AUROC on the test split, fit seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.evaluation.threshold import BASES, estimate

DATASETS = ("mtd:../shared/datasets/mtd", "mvtec:../shared/datasets/mpdd_metal_plate", "elpv:mono", "elpv:poly")
SHARES = (0.1, 0.2, 0.3)
ARRIVALS = (1, 5, 20)
#: (label, estimator, base) of every threshold compared.
ESTIMATORS = tuple((name, name, "quantile") for name in BASES) + tuple(
    (f"hold({b})", "hold", b) for b in ("quantile", "unbiased_frr", "harrell_davis", "lognormal"))
TARGET = 0.01
BAND = 0.01
FRR_NEAR = 0.02


def name(spec: str) -> str:
    """``mtd``, ``mpdd_metal_plate``, ``elpv:mono``: a spec without its folders."""
    kind, _, arg = spec.partition(":")
    return spec if kind == "elpv" else Path(arg).name


def slug(spec: str) -> str:
    return spec.rstrip("/").replace(":", "-").replace("/", "_").replace(".", "")[-40:]


def prepared(spec: str, share: float, cache: Path) -> dict[str, Any]:
    """Scores of the calibration split and the test split from a bank fitted on the rest of
    the good training images at ``share`` (fitted once, then read from ``cache``)."""
    from pipeline.data.datasets import hold_out_calibration, open_dataset

    dataset = hold_out_calibration(open_dataset(spec), share)
    key = hashlib.sha256(json.dumps([spec, share, [s.path for s in dataset.train]]).encode()).hexdigest()[:16]
    folder = cache / f"{slug(spec)}-s{share:g}-{key}"
    scores_file = folder / "scores.json"
    if scores_file.is_file():
        return json.loads(scores_file.read_text())
    bank, fit_s = fit_on(spec, dataset.train, folder / "bank")
    model = load(bank)
    calibration, cal_paths = score(model, dataset.calibration)
    test, test_paths = score(model, dataset.test)
    labels = {s.path: s.label for s in dataset.test}
    out = {"spec": spec, "share": share, "n_train": len(dataset.train), "fit_s": fit_s, "bank": str(bank),
           "calibration": calibration, "calibration_paths": cal_paths,
           "good": [v for v, p in zip(test, test_paths, strict=True) if labels[p] == 0],
           "good_paths": [p for p in test_paths if labels[p] == 0],
           "defect": [v for v, p in zip(test, test_paths, strict=True) if labels[p] == 1]}
    scores_file.write_text(json.dumps(out))
    return out


def fit_on(spec: str, train: list[Any], out: Path) -> tuple[Path, float]:
    """Fit a bank on ``train`` as :func:`~pipeline.lifecycle.fitting.fit_bank` does (which
    fits a spec's whole training split, calibration images included)."""
    from pipeline.config import CoresetConfig, FeatureConfig, ScoringConfig
    from pipeline.lifecycle.stages import extract_features, training_record
    from pipeline.patchcore.bank import save_bank
    from pipeline.patchcore.model import PatchCore

    start = time.perf_counter()
    model = PatchCore(FeatureConfig(runtime="onnx"), CoresetConfig(), ScoringConfig())
    with tempfile.TemporaryDirectory(prefix="tracebank-features-") as tmp:
        store = extract_features(train, model.extractor, tmp, batch_size=8)
        model.fit_features(store.array())
    save_bank(out, model, training=training_record(spec, store))
    return out, time.perf_counter() - start


def load(bank: Path) -> Any:
    from pipeline.patchcore.bank import load_bank

    return load_bank(bank)[0]


def score(model: Any, samples: list[Any]) -> tuple[list[float], list[str]]:
    from pipeline.evaluation.evaluate import evaluate

    result = evaluate(model, samples, keep_maps=False, threshold_method="nominal")
    return [float(v) for v in result.scores], [s.path for s in result.samples]


def threshold(cal: np.ndarray, estimator: str, base: str, previous: float | None = None) -> float:
    return float(estimate(cal, TARGET, estimator, base=base, previous=previous)["value"])


def simulate(data: dict[str, Any], draws: int, seed: int) -> list[dict[str, Any]]:
    """One row per estimator: the threshold, its FRR, and ``|dFRR|`` per number of arrivals."""
    from pipeline.evaluation.metrics import image_auroc

    cal = np.asarray(data["calibration"], dtype=np.float32)
    good = np.asarray(data["good"], dtype=np.float32)
    defect = np.asarray(data["defect"], dtype=np.float32)
    unseen = np.concatenate([cal, good])
    auroc = image_auroc(np.r_[np.zeros(len(good)), np.ones(len(defect))], np.r_[good, defect]) if len(defect) else None
    rows = []
    for label, estimator, base in ESTIMATORS:
        rng = np.random.default_rng(seed)
        before = threshold(cal, estimator, base)
        row: dict[str, Any] = {
            "dataset": name(data["spec"]),
            "share": data["share"], "n_train": data["n_train"], "image_auroc": auroc, "estimator": label,
            "n_cal": len(cal), "thr": before, "frr": float((good >= before).mean()),
            "miss": float((defect < before).mean()) if len(defect) else None,
            "frr_rs": resampled_frr(unseen, len(cal), estimator, base, rng, max(draws // 4, 100)),
        }
        for k in ARRIVALS:
            if k >= len(good):
                continue
            moves, frr_moves, landed_any, after_frr = [], [], [], []
            for _ in range(draws):
                picked = rng.choice(len(good), size=k, replace=False)
                landed = rng.random(k) < data["share"]
                rest = np.delete(good, picked)
                after = before
                if landed.any():
                    after = threshold(np.concatenate([cal, good[picked[landed]]]), estimator, base, previous=before)
                frr0, frr1 = float((rest >= before).mean()), float((rest >= after).mean())
                moves.append(abs(after - before) / abs(before))
                frr_moves.append(abs(frr1 - frr0))
                landed_any.append(bool(landed.any()))
                after_frr.append(frr1)
            d, hit = np.asarray(frr_moves), np.asarray(landed_any)
            row[f"k{k}"] = {"mean": float(d.mean()), "p95": float(np.quantile(d, 0.95)), "max": float(d.max()),
                            "p95_landed": float(np.quantile(d[hit], 0.95)) if hit.any() else 0.0,
                            "over_band_landed": float(np.mean(d[hit] > BAND)) if hit.any() else 0.0,
                            "dthr_pct_landed": 100 * float(np.mean(np.asarray(moves)[hit])) if hit.any() else 0.0,
                            "frr_after": float(np.mean(after_frr)), "landed_share": float(hit.mean())}
        rows.append(row)
    return rows


def resampled_frr(unseen: np.ndarray, n_cal: int, estimator: str, base: str, rng: np.random.Generator,
                  splits: int) -> float:
    """Mean FRR of the threshold over random calibration sets of ``n_cal`` unseen good images,
    measured on the unseen good images left out of each."""
    frrs = []
    for _ in range(splits):
        chosen = rng.permutation(len(unseen))
        cal, rest = unseen[chosen[:n_cal]], unseen[chosen[n_cal:]]
        frrs.append(float((rest >= threshold(cal, estimator, base)).mean()))
    return float(np.mean(frrs))


def extend_check(data: dict[str, Any], cache: Path, sizes: tuple[int, ...] = (5, 20), seed: int = 0
                 ) -> list[dict[str, Any]]:
    """Extend the bank with ``k`` good test images (all landing in training), rescore the
    calibration split and the other good test images, and compare each threshold and FRR."""
    from pipeline.data.datasets import Dataset, Sample, hold_out_calibration, open_dataset
    from pipeline.lifecycle.fitting import extend_bank

    dataset = hold_out_calibration(open_dataset(data["spec"]), data["share"])
    rng = np.random.default_rng(seed)
    good_paths, good = data["good_paths"], np.asarray(data["good"], dtype=np.float32)
    cal0 = np.asarray(data["calibration"], dtype=np.float32)
    out = []
    for k in sizes:
        picked = rng.choice(len(good_paths), size=k, replace=False)
        arrivals = [Sample(good_paths[i], 0) for i in picked]
        target = cache / f"{Path(data['bank']).parent.name}-extended-{k}-{seed}"
        if not (target / "manifest.json").is_file():
            extend_bank(Path(data["bank"]), data["spec"], target, evaluate_after=False,
                        dataset=Dataset(data["spec"], dataset.train + arrivals, []))
        model = load(target)
        cal1 = np.asarray(score(model, dataset.calibration)[0], dtype=np.float32)
        rest_paths = [p for i, p in enumerate(good_paths) if i not in set(picked.tolist())]
        rest1 = np.asarray(score(model, [Sample(p, 0) for p in rest_paths])[0], dtype=np.float32)
        rest0 = np.delete(good, picked)
        for label, estimator, base in ESTIMATORS:
            t0 = threshold(cal0, estimator, base)
            t1 = threshold(cal1, estimator, base, previous=t0)
            out.append({"dataset": data["spec"], "share": data["share"], "k": k, "estimator": label,
                        "score_shift_pct": 100 * float(np.mean(rest1 / rest0 - 1)),
                        "dthr_pct": 100 * (t1 - t0) / t0,
                        "dfrr": float((rest1 >= t1).mean() - (rest0 >= t0).mean())})
    return out


def in_band(rows: list[dict[str, Any]]) -> dict[tuple[float, str], bool]:
    """(share, estimator) -> whether it holds still on every dataset and keeps FRR near target."""
    verdict: dict[tuple[float, str], bool] = {}
    for row in rows:
        ok = all(row[f"k{k}"]["p95_landed"] <= BAND for k in (1, 5) if f"k{k}" in row) and row["frr_rs"] <= FRR_NEAR
        key = (row["share"], row["estimator"])
        verdict[key] = verdict.get(key, True) and ok
    return verdict


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'dataset':17s} {'share':>5s} {'estimator':19s} {'n_cal':>5s} {'thr':>7s} {'frr':>6s} "
            f"{'frr_rs':>6s} {'miss':>6s}")
    for k in ARRIVALS:
        head += f"  {f'k={k} mean/p95/max':>20s} {'p95L':>6s} {'>bandL':>6s} {'dthr%':>6s}"
    print(head)
    for row in rows:
        line = (f"{row['dataset'][:17]:17s} {row['share']:5.1f} {row['estimator']:19s} {row['n_cal']:5d} "
                f"{row['thr']:7.3f} {row['frr']:6.3f} {row['frr_rs']:6.3f} "
                f"{row['miss'] if row['miss'] is not None else float('nan'):6.3f}")
        for k in ARRIVALS:
            if f"k{k}" not in row:
                line += f"  {'-':>20s} {'-':>6s} {'-':>6s} {'-':>6s}"
                continue
            c = row[f"k{k}"]
            line += (f"  {c['mean']:6.3f}/{c['p95']:6.3f}/{c['max']:6.3f} {c['p95_landed']:6.3f} "
                     f"{c['over_band_landed']:6.3f} {c['dthr_pct_landed']:6.2f}")
        print(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", action="append", help=f"dataset spec (repeatable; default the suite: {DATASETS})")
    parser.add_argument("--shares", default=",".join(f"{s:g}" for s in SHARES))
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default="/tmp/tracebank-threshold-study")
    parser.add_argument("--extend-check", metavar="SPEC", help="also extend this dataset's share-0.1 bank for real")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    parser.add_argument("--save", metavar="PATH", help="also write that JSON object to PATH")
    args = parser.parse_args(argv)

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    shares = [float(s) for s in args.shares.split(",")]
    start = time.perf_counter()
    rows, fits = [], []
    for spec in args.data or DATASETS:
        for share in shares:
            data = prepared(spec, share, cache)
            fits.append({k: data[k] for k in ("spec", "share", "n_train", "fit_s")})
            rows += simulate(data, args.draws, args.seed)
    extension = extend_check(prepared(args.extend_check, 0.1, cache), cache) if args.extend_check else []
    verdict = in_band(rows)
    passing = [f"{e} at {s:g}" for (s, e), ok in verdict.items() if ok]
    result = {"rows": rows, "fits": fits, "extension": extension, "in_band": passing,
              "band": {"p95_landed_dfrr_max": BAND, "frr_rs_max": FRR_NEAR}}
    if args.save:
        Path(args.save).write_text(json.dumps(result, indent=1) + "\n")
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        print()
        return 0
    print(f"{args.draws} draws per case, seed {args.seed}, target FRR {TARGET}, load average {os.getloadavg()}, "
          f"{time.perf_counter() - start:.0f} s")
    print(f"{'dataset':17s} {'share':>5s} {'n_train':>7s} {'n_cal':>5s} {'image_auroc':>11s} {'fit_s':>6s}")
    for row in rows:
        if row["estimator"] == ESTIMATORS[0][0]:
            fit = next(f for f in fits if name(f["spec"]) == row["dataset"] and f["share"] == row["share"])
            print(f"{row['dataset']:17s} {row['share']:5.1f} {row['n_train']:7d} {row['n_cal']:5d} "
                  f"{row['image_auroc']:11.3f} {fit['fit_s']:6.1f}")
    print()
    print_table(rows)
    if extension:
        print("\nreal extension of the share-0.1 bank with k good test images (all landing in training):")
        print(f"{'k':>3s} {'estimator':19s} {'score shift %':>13s} {'dthr %':>7s} {'dFRR':>7s}")
        for e in extension:
            print(f"{e['k']:3d} {e['estimator']:19s} {e['score_shift_pct']:13.2f} {e['dthr_pct']:7.2f} "
                  f"{e['dfrr']:7.3f}")
    print(f"\nin the band (p95 |dFRR| <= {BAND} for k = 1, 5 where something landed, and frr_rs <= {FRR_NEAR}) "
          f"on every dataset: {', '.join(passing) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
