"""Data validation with Great Expectations, over a per-image metadata table.

Before any training, every image of the training and evaluation sets is opened once and
described by one row (readable, mode, size, brightness, sha256, mask check). A Great
Expectations suite then checks the table; failures name the offending files, and the
Data Docs HTML report is written next to the result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pandas loads when a validation runs, not with every flow
    import pandas as pd

from .datasets import Sample
from .images import ImageError, read_image, read_mask


@dataclasses.dataclass(frozen=True)
class ValidationConfig:
    """What the image sets must satisfy (the ``validation`` section of ``params.yaml``).

    Attributes:
        min_side, max_side: allowed range of image width and height, in pixels.
        brightness_min, brightness_max: allowed range of mean gray level (0-255): all-black
            or blown-out frames are camera faults, not parts.
        allow_unreadable: keep going when some files are unreadable (they are skipped by
            training); false stops the run.
    """

    min_side: int = 32
    max_side: int = 8192
    brightness_min: float = 5.0
    brightness_max: float = 250.0
    allow_unreadable: bool = False


@dataclasses.dataclass
class ValidationResult:
    """Outcome of a validation run.

    Attributes:
        success: every expectation held.
        failures: ``[{"expectation", "column", "files"}]`` for each failed expectation.
        docs: path of the Data Docs ``index.html``.
        table: the metadata table that was checked.
    """

    success: bool
    failures: list[dict[str, Any]]
    docs: Path | None
    table: pd.DataFrame

    def summary(self) -> str:
        if self.success:
            return f"{len(self.table)} images passed validation"
        lines = [f"validation failed ({len(self.failures)} expectation(s)):"]
        for failure in self.failures:
            files = failure["files"]
            shown = ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
            lines.append(f"  {failure['expectation']} on {failure['column']}: {shown}")
        if self.docs:
            lines.append(f"  report: {self.docs}")
        return "\n".join(lines)


def describe(samples: Sequence[Sample], split: str) -> list[dict[str, Any]]:
    """One metadata row per sample; unreadable files get ``readable=False`` and a reason."""
    rows = []
    for sample in samples:
        row: dict[str, Any] = {
            "path": sample.path, "split": split, "label": sample.label, "readable": True, "reason": "",
            "mode": "", "width": 0, "height": 0, "brightness": 0.0, "sha256": "", "mask_ok": True,
        }
        try:
            data = Path(sample.path).read_bytes()
            row["sha256"] = hashlib.sha256(data).hexdigest()
            image = read_image(sample.path)
            row["mode"] = "gray" if image.ndim == 2 else "rgb"
            row["height"], row["width"] = image.shape[:2]
            row["brightness"] = float(image.mean())
            if sample.mask:
                try:
                    read_mask(sample.mask, image.shape[:2])
                except ImageError as exc:
                    row["mask_ok"] = False
                    row["reason"] = str(exc)
        except (ImageError, OSError) as exc:
            row["readable"] = False
            row["reason"] = str(exc)
        rows.append(row)
    return rows


def metadata_table(train: Sequence[Sample], test: Sequence[Sample]) -> pd.DataFrame:
    """Metadata of both sets, with ``duplicate`` (same bytes seen earlier in the same split)
    and ``in_both_splits`` (same bytes in training and evaluation) flags."""
    import pandas as pd

    table = pd.DataFrame(describe(train, "train") + describe(test, "test"))
    has_hash = table["sha256"] != ""
    table["duplicate"] = has_hash & table.duplicated(subset=["split", "sha256"], keep="first")
    train_hashes = set(table.loc[(table["split"] == "train") & has_hash, "sha256"])
    test_hashes = set(table.loc[(table["split"] == "test") & has_hash, "sha256"])
    table["in_both_splits"] = has_hash & table["sha256"].isin(train_hashes & test_hashes)
    return table


def _expectations(config: ValidationConfig) -> list[Any]:
    import great_expectations as gx
    from great_expectations.expectations.row_conditions import Column

    e = gx.expectations
    readable = Column("readable") == True  # noqa: E712 - builds a GX condition, not a Python comparison
    out = [
        e.ExpectColumnValuesToBeBetween(column="width", min_value=config.min_side, max_value=config.max_side,
                                        row_condition=readable),
        e.ExpectColumnValuesToBeBetween(column="height", min_value=config.min_side, max_value=config.max_side,
                                        row_condition=readable),
        e.ExpectColumnValuesToBeBetween(column="brightness", min_value=config.brightness_min,
                                        max_value=config.brightness_max,
                                        row_condition=readable),
        e.ExpectColumnValuesToBeInSet(column="duplicate", value_set=[False]),
        e.ExpectColumnValuesToBeInSet(column="in_both_splits", value_set=[False]),
        e.ExpectColumnValuesToBeInSet(column="mask_ok", value_set=[True]),
        e.ExpectColumnValuesToBeInSet(column="mode", value_set=["gray", "rgb", ""]),
    ]
    if not config.allow_unreadable:
        out.insert(0, e.ExpectColumnValuesToBeInSet(column="readable", value_set=[True]))
    return out


def run_suite(table: pd.DataFrame, config: ValidationConfig, out_dir: str | Path) -> ValidationResult:
    """Check ``table`` with the Great Expectations suite; write Data Docs under ``out_dir``."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="file", project_root_dir=str(out_dir))
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    name = "tracebank_images"
    for old_checkpoint in list(context.checkpoints.all()):
        context.checkpoints.delete(old_checkpoint.name)
    for old_definition in list(context.validation_definitions.all()):
        context.validation_definitions.delete(old_definition.name)
    for old_suite in list(context.suites.all()):
        context.suites.delete(old_suite.name)
    if name in [ds.name for ds in context.data_sources.all().values()]:
        context.data_sources.delete(name)
    asset = context.data_sources.add_pandas(name).add_dataframe_asset("metadata")
    batch = asset.add_batch_definition_whole_dataframe("all")
    suite = context.suites.add(gx.ExpectationSuite(name=name))
    for expectation in _expectations(config):
        suite.add_expectation(expectation)
    definition = context.validation_definitions.add(gx.ValidationDefinition(data=batch, suite=suite, name=name))
    checkpoint = context.checkpoints.add(gx.Checkpoint(
        name=name,
        validation_definitions=[definition],
        actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs")],
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["path"]},
    ))
    result = checkpoint.run(batch_parameters={"dataframe": table})
    failures = []
    for run in result.run_results.values():
        for item in run.results:
            if item.success:
                continue
            files = sorted({row["path"] for row in item.result.get("unexpected_index_list") or []})
            expectation = item.expectation_config
            failures.append({
                "expectation": expectation.type if expectation else "unknown",
                "column": expectation.kwargs.get("column") if expectation else None,
                "files": files,
            })
    docs = next(iter(sorted(out_dir.glob("**/data_docs/local_site/index.html"))), None)
    outcome = ValidationResult(bool(result.success), failures, docs, table)
    (out_dir / "validation.json").write_text(json.dumps(
        {"success": outcome.success, "failures": failures, "docs": str(docs) if docs else None,
         "n_images": len(table)}, indent=2, default=_plain) + "\n")
    table.to_csv(out_dir / "image_metadata.csv", index=False)
    return outcome


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def validate_samples(
    train: Sequence[Sample], test: Sequence[Sample], config: ValidationConfig, out_dir: str | Path
) -> ValidationResult:
    """Describe and check both sets; see :func:`run_suite`."""
    return run_suite(metadata_table(train, test), config, out_dir)
