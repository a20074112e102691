"""``lens-export``: the ONNX graphs of a model's stages for one camera resolution.

    lens-export --model OuyBin/LENS --image-size 640x480 --out engines/ [--dtype float32] [--device cpu] [--engines]

writes, under ``--out``, one directory per graph (named by what it depends on: the onnxruntime
backend's cache layout, so ``backend:=onnxruntime export_dir:=<out>`` uses them as they are) and
``manifest.json`` (model, weights hashes, image size, shapes, opset, dtype, library versions).
Each graph is run once by onnxruntime against the torch stage it replaces, and the largest
difference is printed; in float32 a difference over 1e-4 x max(1, |reference|) fails the export.
``--engines`` then builds the TensorRT engines of those graphs (``engines/`` under ``--out``, the
tensorrt backend's cache), so that a robot's first activation does not build them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

EXIT_USAGE = 2
TOLERANCE = 1e-4  # relative to max(1, |reference|), float32


def load_for_export(source: str, device: str, dtype: str, allow_download: bool):
    """(model, processor) of a checkpoint source, or of ``real-size`` (Qwen2.5-VL-3B's vision tower
    and SAM2 Hiera-L with random weights: lens_ros.model.real_size)."""
    from lens_ros.model.checkpoint import DTYPES, load_lens_model
    from lens_ros.model.real_size import REAL_SIZE, build_real_size_model

    if source != REAL_SIZE:
        return load_lens_model(source, device=device, dtype=dtype, allow_download=allow_download)
    model, processor = build_real_size_model(dtype=DTYPES[dtype])
    for module in (model.sam, model.vlm.model.visual):  # the language model stays on the meta device
        module.to(device)
    model.learnable_query.data = model.learnable_query.data.to(device)
    return model, processor


def export_model(model_source: str, image_size: tuple[int, int], out: Path, device: str = "cpu",
                 dtype: str = "float32", allow_download: bool = False) -> dict:
    """Export (or find in ``out``) every stage's graph for ``image_size`` and check each against torch.
    A real-size model has no mask pass graph: its language model is not materialised."""
    import numpy as np

    from lens_ros.accel import check, export
    from lens_ros.accel.onnxruntime_backend import OnnxRuntimeStages

    model, processor = load_for_export(model_source, device, dtype, allow_download)
    backend = OnnxRuntimeStages(model, cache_dir=out, source=model_source)
    width, height = image_size
    rgb = (np.random.default_rng(0).random((height, width, 3)) * 255).astype(np.uint8)
    given = check.stage_inputs(model, processor, rgb)
    skipped = check.stages_not_runnable(model)
    start = time.perf_counter()
    exported = check.stage_outputs(backend, given, skip=skipped)  # exports each graph on first use
    export_s = time.perf_counter() - start
    reference = check.reference_outputs(model, given, skip=skipped)
    checks = {stage: check.max_difference(reference[stage], exported[stage]) for stage in exported}
    graphs = {stage: {"directory": directory, **json.loads((out / directory / f"{stage}.json").read_text())}
              for stage, directory in sorted(backend.used.items())}
    manifest = {"format": export.MANIFEST_FORMAT, "model": model_source, "image_size": [width, height],
                "device": device, "dtype": dtype, "opset": export.OPSET, "versions": export.library_versions(),
                "weights_sha256": {stage: backend.weights(stage) for stage in graphs},
                "graphs": graphs, "export_s": round(export_s, 1),
                "not_exported": {stage: "the language model is not materialised (real-size: shapes only)"
                                 for stage in skipped},
                "max_abs_difference": {stage: {"value": d, "reference_max": s} for stage, (d, s) in checks.items()}}
    (out / export.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def export_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lens-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hugging Face id, checkpoint directory, 'tiny', or 'real-size' "
                        "(Qwen2.5-VL-3B's vision tower and SAM2 Hiera-L, random weights)")
    parser.add_argument("--image-size", required=True, help="the camera's WIDTHxHEIGHT, e.g. 640x480")
    parser.add_argument("--out", required=True, help="output directory (the node's export_dir)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where the check runs (default cpu)")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default float32)")
    parser.add_argument("--allow-download", action="store_true", help="fetch the model when it is not cached")
    parser.add_argument("--engines", action="store_true",
                        help="also build the TensorRT engines (needs TensorRT and --device cuda)")
    args = parser.parse_args(argv)
    from lens_ros.images import parse_image_size

    try:
        image_size = parse_image_size(args.image_size)
        if args.engines:  # before a long export: TensorRT and a GPU must be there
            import torch

            from lens_ros.accel.tensorrt_backend import import_tensorrt, require_cuda

            import_tensorrt()
            require_cuda(torch.device(args.device))
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        manifest = export_model(args.model, image_size, out, device=args.device, dtype=args.dtype,
                                allow_download=args.allow_download)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    failed = False
    for stage, graph in manifest["graphs"].items():
        check = manifest["max_abs_difference"][stage]
        bad = args.dtype == "float32" and check["value"] > TOLERANCE * check["reference_max"]
        failed |= bad
        shapes = ", ".join(f"{name} {spec['shape']}" for name, spec in graph["inputs"].items())
        print(f"{stage}: {graph['directory']}/{graph['file']} ({shapes}); onnxruntime vs torch max abs difference "
              f"{check['value']:.2e} (reference max {check['reference_max']:.3g}){' OVER TOLERANCE' if bad else ''}")
    for stage, why in manifest["not_exported"].items():
        print(f"{stage}: not exported: {why}")
    print(f"manifest: {out / 'manifest.json'}")
    if args.engines and not failed:
        import torch

        from lens_ros.accel.tensorrt_backend import build_engines

        for engine in build_engines(out, manifest, torch.device(args.device)):
            print(f"engine: {engine}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(export_main())
