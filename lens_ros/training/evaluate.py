"""Evaluate a LENS model on a labelled split: ``lens-eval --model M --data SPEC``.

``SPEC`` is a data spec as ``lens-train`` reads it (``lens_ros.training.specs``), with every
expression of the split (default val) rather than one random one per ref.

Runs ``LensPipeline.segment`` on every sample, exactly as the node answers a command, and
scores the answers with the LENS / LISA metrics (LENS_REFERENCE §5, ``SegmentationMetrics``):
cIoU, gIoU (empty union = 1.0), box accuracy (IoU >= 0.5), found rate and mean latency.

What is scored, and why:

* A sample whose image or annotation cannot be read, or that the pipeline refuses
  (``InvalidInputError``: unusable image or command), is an error row: counted in ``errors``,
  left out of the metrics, and the evaluation goes on. One bad file must not cost a whole split;
  a large ``errors`` count in the summary says the numbers cover fewer samples than asked.
* A sample without a ground-truth mask (an episode whose operator only said success/failure)
  is run and written to the per-sample rows, but left out of the metrics (``no_mask`` counts
  them): there is no mask to score it against.
* Latency is ``timings.total_ms`` of each request. The pipeline reuses an image's embeddings
  when the next sample has the same image (RefCOCO lists every sentence of a ref in a row), so
  such samples skip the image encoders, as a robot asking several commands about one frame does.

Outputs (``write_report``): ``report.json`` (summary, model, data spec, settings, date) and
``samples.csv`` (one row per sample, errors included).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from lens_ros.training.data import Sample
from lens_ros.training.metrics import SegmentationMetrics, box_iou
from lens_ros.training.specs import DATA_SPEC_FORMS, load_data

__all__ = ["EvaluationReport", "evaluate", "write_report", "eval_main"]

REPORT_JSON = "report.json"
SAMPLES_CSV = "samples.csv"
CSV_COLUMNS = ("index", "source", "expression", "found", "iou", "box_iou", "latency_ms", "error", "reasoning")
REASONING_CHARS = 200  # enough to see what the model said; full answers make the CSV unreadable
DEFAULT_OUT = "lens_eval_out"


@dataclass
class EvaluationReport:
    """The result of ``evaluate``: metrics for the split and one row per sample."""

    summary: dict  # SegmentationMetrics.summary() + samples, errors, no_mask
    rows: list[dict]  # keys CSV_COLUMNS; iou / box_iou / latency_ms None where not computed
    model: str = ""
    data: str = ""  # the data spec (or a description of the samples)
    date: str = ""  # ISO 8601, UTC, when the evaluation started
    settings: dict = field(default_factory=dict)  # the pipeline's configuration


# -- evaluation -----------------------------------------------------------------------------------
def _truncate(text: str, limit: int = REASONING_CHARS) -> str:
    text = " ".join(text.split())  # one line per CSV row, whatever the model wrote
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _row(index: int, source: str, expression: str, *, found: bool = False, iou: float | None = None,
         box_overlap: float | None = None, latency_ms: float | None = None, error: str = "",
         reasoning: str = "") -> dict:
    return {"index": index, "source": source, "expression": expression, "found": found, "iou": iou,
            "box_iou": box_overlap, "latency_ms": latency_ms, "error": error, "reasoning": _truncate(reasoning)}


def evaluate(pipeline, samples: Sequence[Sample], limit: int | None = None, progress: bool = True, *,
             data: str = "") -> EvaluationReport:
    """Run ``pipeline.segment`` on the first ``limit`` samples (all when None) and score them.

    See the module docstring for how errors and samples without a mask are counted. ``data``
    names the samples in the report (``eval_main`` passes the data spec).
    """
    from tqdm import tqdm

    from lens_ros.images import InvalidInputError

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    count = len(samples) if limit is None else min(limit, len(samples))
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    metrics = SegmentationMetrics()
    rows: list[dict] = []
    errors = no_mask = 0
    bar = tqdm(range(count), total=count, desc="lens-eval", unit="sample", disable=not progress, file=sys.stderr)
    for index in bar:
        try:
            sample = samples[index]
        except (OSError, ValueError) as error:  # an unreadable image or annotation: this sample only
            errors += 1
            rows.append(_row(index, f"sample {index}", "", error=f"cannot load sample: {error}"))
            continue
        try:
            result = pipeline.segment(sample.image, sample.expression)
        except InvalidInputError as error:
            errors += 1
            rows.append(_row(index, sample.source, sample.expression, error=str(error)))
            continue
        latency = float(result.timings.total_ms)
        pred_box = result.box if result.found else None
        overlap = None
        if sample.box is not None:
            overlap = 0.0 if pred_box is None else box_iou(pred_box, sample.box)  # a miss, as the metrics count it
        iou = None
        if sample.mask is None:
            no_mask += 1
        else:
            pred_mask = result.mask if result.found else None
            iou = metrics.add(pred_mask, sample.mask, pred_box, sample.box, result.found, latency, ignore=sample.ignore)
        rows.append(_row(index, sample.source, sample.expression, found=bool(result.found), iou=iou,
                         box_overlap=overlap, latency_ms=latency, error=result.error, reasoning=result.reasoning))
        if progress and len(metrics):
            bar.set_postfix(cIoU=f"{metrics.summary()['cIoU']:.3f}", errors=errors, refresh=False)
    bar.close()
    summary = {"samples": count, "errors": errors, "no_mask": no_mask, **metrics.summary()}
    config = getattr(pipeline, "config", None)
    settings = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else {}
    model = getattr(pipeline, "model_name", "") or settings.get("model", "")
    return EvaluationReport(summary=summary, rows=rows, model=str(model), data=data, date=date, settings=settings)


# -- output ---------------------------------------------------------------------------------------
def json_ready(value):
    """``value`` for ``json.dump``: NaN / inf as null (JSON has no NaN; a metric no sample qualified
    for is 'not available'), paths as strings, dict keys as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(key): json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_report(report: EvaluationReport, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``report.json`` and ``samples.csv`` into ``out_dir`` (created); return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / REPORT_JSON
    document = {"model": report.model, "data": report.data, "date": report.date, "settings": report.settings,
                "summary": report.summary}
    json_path.write_text(json.dumps(json_ready(document), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    csv_path = out / SAMPLES_CSV
    with csv_path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in report.rows:
            writer.writerow({key: "" if row.get(key) is None else row[key] for key in CSV_COLUMNS})
    return json_path, csv_path


def _metric(value, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def summary_line(summary: dict) -> str:
    """The summary in one line, for the terminal."""
    return (f"{summary['count']}/{summary['samples']} samples scored ({summary['errors']} errors, "
            f"{summary['no_mask']} without mask): cIoU {_metric(summary['cIoU'])} gIoU {_metric(summary['gIoU'])} "
            f"box acc {_metric(summary['box_accuracy'])} found {_metric(summary['found_rate'])} "
            f"mean latency {_metric(summary['mean_latency_ms'], 0)} ms")


# -- entry point ----------------------------------------------------------------------------------
def eval_main(argv: Sequence[str] | None = None) -> int:
    """``lens-eval``: evaluate a model on a data spec; user errors are one line on stderr, exit 2."""
    from lens_ros.cli import _fail

    parser = argparse.ArgumentParser(prog="lens-eval", description="Evaluate a LENS model on a labelled split "
                                     "(cIoU, gIoU, box accuracy, found rate, latency).")
    parser.add_argument("--model", required=True, help="Hugging Face id, checkpoint directory or 'tiny'")
    parser.add_argument("--data", required=True, help="data spec: " + "; ".join(DATA_SPEC_FORMS))
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N samples only")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default ./{DEFAULT_OUT})")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--dtype", default=None,
                        help="float32, bfloat16 or float16 (default: bfloat16 on cuda, else float32)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="generation limit (default 256)")
    parser.add_argument("--cot", action="store_true", help="chain-of-thought prompt (for OuyBin/LENS_ReasonSeg_CoT)")
    parser.add_argument("--offline", action="store_true", help="never download; use the local Hugging Face cache only")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from lens_ros.model.checkpoint import CheckpointError, ModelUnavailableError
    from lens_ros.pipeline import LensPipeline, PipelineConfig

    if args.limit is not None and args.limit < 1:
        return _fail(f"--limit must be at least 1, got {args.limit}")
    try:  # the data first: a wrong path should not wait for a model to load
        samples = load_data(args.data, training=False, work_dir=args.out)
    except (OSError, ValueError) as error:
        return _fail(str(error))
    if len(samples) == 0:
        return _fail(f"data {args.data!r} holds no samples")
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    options = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens is not None else {}
    try:
        config = PipelineConfig(model=args.model, device=args.device, dtype=dtype, cot=args.cot,
                                allow_download=not args.offline, **options)
        pipeline = LensPipeline.from_config(config)
    except (ModelUnavailableError, CheckpointError, ValueError) as error:
        return _fail(str(error))
    report = evaluate(pipeline, samples, limit=args.limit, progress=not args.no_progress, data=args.data)
    try:
        json_path, csv_path = write_report(report, args.out)
    except OSError as error:
        return _fail(f"cannot write the report to {args.out}: {error}")
    print(summary_line(report.summary))
    print(f"wrote {json_path} and {csv_path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(eval_main())
