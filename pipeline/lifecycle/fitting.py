"""Fitting a bank from a dataset spec in one process: the path of ``tracebank fit`` and of
the benchmarks (the DVC stages and the Prefect flow split the same work into steps, see
:mod:`pipeline.lifecycle.steps`).

Fitting needs torch and timm (the backbone, the coreset) and exports the embedding's ONNX
graph into the bank; they are imported inside the functions, so that importing this module
(as the ``tracebank`` command line does for every command) loads neither."""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import CoresetConfig, FeatureConfig, ScoringConfig
from pipeline.data.datasets import Dataset, open_dataset
from pipeline.evaluation.evaluate import default_method, evaluate
from pipeline.lifecycle.stages import FeatureStore, extract_features, training_record
from pipeline.patchcore.bank import save_bank
from pipeline.patchcore.model import PatchCore

#: ``progress(total, description)`` returns a context manager whose ``update(n)`` reports
#: ``n`` more done (tqdm is one).
Progress = Callable[[int, str], Any]


class _Silent:
    def update(self, n: float | None = 1, /) -> None:
        return None


@contextlib.contextmanager
def _silent() -> Iterator[_Silent]:
    yield _Silent()


def no_progress(total: int, desc: str) -> Any:
    """The default progress factory: reports nothing."""
    return _silent()


def fit_bank(
    spec: str,
    out: Path,
    features: FeatureConfig,
    coreset: CoresetConfig,
    scoring: ScoringConfig,
    *,
    batch_size: int = 8,
    progress: Progress = no_progress,
    evaluate_after: bool = True,
    limit: int | None = None,
) -> dict[str, Any]:
    """Fit a bank on the nominal images of ``spec``, evaluate it on the test split when
    there is one (to set the threshold), and save it to ``out``.

    Args:
        spec: dataset spec (``mtd:PATH``, ``elpv:mono``, ...); its train split is fitted.
        out: the bank directory to write.
        features, coreset, scoring: the stage settings.
        batch_size: images per feature-extraction batch.
        progress: ``progress(total, description)`` returns a context manager with
            ``update(n)``; the command line passes progress bars.
        evaluate_after: evaluate on the test split (when there is one) and store the
            metrics and threshold in the manifest.
        limit: fit on at most this many training images (and evaluate on as many test images).

    Returns:
        The bank path and id, its size, the number of training images, skipped files,
        metrics, threshold and the seconds of each phase.
    """
    from pipeline.patchcore.coreset import coreset_size
    from pipeline.patchcore.features import FeatureExtractor

    dataset = open_dataset(spec)
    if limit:
        dataset = dataset.subset(limit, limit)
    extractor = FeatureExtractor(features)
    model = PatchCore(features, coreset, scoring, extractor=extractor)
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="tracebank-features-") as tmp:
        start = time.perf_counter()
        with progress(len(dataset.train), "extracting features (images)") as bar:
            store: FeatureStore = extract_features(
                dataset.train, extractor, tmp, batch_size=batch_size, on_batch=bar.update
            )
        timings["extract_s"] = time.perf_counter() - start
        start = time.perf_counter()
        feats = store.array()
        with progress(coreset_size(len(feats), coreset.ratio), "selecting coreset (centres)") as bar:
            model.fit_features(feats, on_centres=bar.update)
        timings["coreset_s"] = time.perf_counter() - start
        del feats
    metrics, threshold = _evaluated(model, dataset, spec, timings, batch_size, progress) if evaluate_after else (
        None, None)
    manifest = save_bank(
        out,
        model,
        training=training_record(spec, store, {"timings": timings}),
        metrics=metrics,
        threshold=threshold,
    )
    return {
        "bank": str(out),
        "bank_id": manifest["bank_id"],
        "bank_size": manifest["bank_size"],
        "n_train": len(store.files),
        "skipped": store.skipped,
        "metrics": metrics,
        "threshold": threshold,
        "timings": timings,
    }


def _evaluated(
    model: PatchCore, dataset: Dataset, spec: str, timings: dict[str, float], batch_size: int, progress: Progress,
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Metrics and threshold on the test split (None, None without one); times it."""
    if not dataset.test:
        return None, None
    start = time.perf_counter()
    with progress(len(dataset.test), "evaluating (images)") as bar:
        result = evaluate(model, dataset.test, batch_size=batch_size, keep_maps=False, on_batch=bar.update,
                          threshold_method=default_method(dataset.synthetic is not None))
    timings["evaluate_s"] = time.perf_counter() - start
    metrics = result.metrics
    if metrics.get("threshold") is None:
        return metrics, None
    return metrics, {"value": metrics["threshold"], "method": metrics["threshold_method"], "evaluated_on": spec}


def extend_bank(
    parent: Path, spec: str, out: Path, *, batch_size: int = 8, evaluate_after: bool = True,
    progress: Progress = no_progress, dataset: Dataset | None = None,
) -> dict[str, Any]:
    """Extend a fitted bank with the training images of ``spec`` it has not seen (of ``dataset``,
    when given: the pipeline passes ``spec``'s dataset less its calibration split).

    Only the new images are extracted; the greedy k-center continues from the parent's
    centres over their features (:func:`~pipeline.patchcore.incremental.extend_coreset`),
    and the bank grows to the coreset ratio of all patches, old and new. The parent's
    feature settings, coreset seed and projection are kept, so the distances are measured
    as in its fit. The new bank records ``"fit": "incremental"``, its parent and the files added.

    Raises:
        ValueError: if ``spec`` holds no training image the parent has not seen.
    """
    from pipeline.hashing import sha256_file
    from pipeline.patchcore.bank import load_bank, read_manifest
    from pipeline.patchcore.features import FeatureExtractor
    from pipeline.patchcore.incremental import extend_coreset, extended_bank_size

    recorded = read_manifest(parent, verify=False)["params"]["features"].get("runtime", "torch")
    model, manifest = load_bank(parent, runtime=recorded)  # the backbone, run as in the parent's fit
    extractor = model.extractor
    assert isinstance(extractor, FeatureExtractor)
    old_files = list(manifest["training"].get("files", []))
    known = {f["sha256"] for f in old_files}
    dataset = dataset or open_dataset(spec)
    fresh = [s for s in dataset.train if sha256_file(s.path) not in known]
    if not fresh:
        raise ValueError(f"{spec} has no training image that bank {manifest['bank_id']} has not seen")
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="tracebank-features-") as tmp:
        start = time.perf_counter()
        with progress(len(fresh), "extracting new features (images)") as bar:
            store = extract_features(fresh, extractor, tmp, batch_size=batch_size, on_batch=bar.update)
        timings["extract_s"] = time.perf_counter() - start
        start = time.perf_counter()
        new = store.array()
        per_image = model.extractor.grid * model.extractor.grid
        n_old = int(manifest["training"].get("n_patches") or len(old_files) * per_image)
        k_total = extended_bank_size(n_old, len(new), model.coreset.ratio)
        picks = extend_coreset(model.memory_bank_, new, k_total, seed=model.coreset.seed,
                               proj_dim=model.coreset.proj_dim)
        bank = np.concatenate([model.memory_bank_, np.asarray(new[np.sort(picks)], dtype=np.float32)])
        model.set_bank(np.ascontiguousarray(bank))
        model.n_train_features_ = n_old + len(new)
        timings["coreset_s"] = time.perf_counter() - start
        del new
    metrics, threshold = _evaluated(model, dataset, spec, timings, batch_size, progress) if evaluate_after else (
        None, None)
    previous = manifest["training"]
    training = {
        "spec": spec,
        "n_images": len(old_files) + len(store.files),
        "n_patches": model.n_train_features_,
        "files": old_files + store.files,
        "skipped": list(previous.get("skipped", [])) + store.skipped,
        "fit": "incremental",
        "parent_bank": manifest["bank_id"],
        "added_files": store.files,
        "increments": int(previous.get("increments", 0)) + 1,
        "timings": timings,
    }
    saved = save_bank(out, model, training=training, metrics=metrics, threshold=threshold)
    return {
        "bank": str(out), "bank_id": saved["bank_id"], "bank_size": saved["bank_size"], "fit": "incremental",
        "parent_bank": manifest["bank_id"], "n_train": training["n_images"], "n_added": len(store.files),
        "n_extracted": len(store.files) + len(store.skipped), "increments": training["increments"],
        "skipped": store.skipped, "metrics": metrics, "threshold": threshold, "timings": timings,
    }
