"""Time per ``grasp_regions`` call on one CPU core, with and without depth.

    python -m lens_ros.bench.grasp [--runs 200]

The scene is a 60 x 40 x 80 mm box on a table seen from above at 0.6 m (a mask of the size a
real tabletop object has), at 640x480 and 1280x720, plus a large object covering a fifth of the
image as the worst case. Goal (issue 4): under 5 ms at 640x480.
"""

from __future__ import annotations

import argparse
import os

# One core also means one BLAS thread: OpenBLAS's threads only contend on small matrices.
for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import numpy as np  # noqa: E402

from lens_ros.bench import median_ms  # noqa: E402


def tabletop(width: int, height: int, object_m=(0.06, 0.04, 0.08), yaw_deg: float = 25.0, distance_m: float = 0.6):
    """Depth (float32 m), mask and intrinsics of a box on a table seen straight from above.

    The horizontal field of view is 65 degrees at both sizes, as on common RGB-D cameras.
    """
    import cv2

    from lens_ros.grasp import Intrinsics

    fx = width / 2 / np.tan(np.radians(65 / 2))
    intrinsics = Intrinsics(fx, fx, (width - 1) / 2, (height - 1) / 2)
    top = distance_m - object_m[2]
    size_px = (object_m[0] * fx / top, object_m[1] * fx / top)
    mask = np.zeros((height, width), np.uint8)
    corners = cv2.boxPoints(((width / 2, height / 2), size_px, yaw_deg))
    cv2.fillPoly(mask, [np.round(corners).astype(np.int32)], 1)
    depth = np.full((height, width), distance_m, np.float32)
    depth[mask > 0] = top
    return mask.astype(bool), depth, intrinsics


def report(runs: int) -> None:
    """Print the timing table (on whatever cores the process may use)."""
    from lens_ros.grasp import grasp_regions

    print("grasp_regions, median ms")
    print(f"  {'size':<10}{'object':<16}{'mask px':>9}{'2-D':>8}{'3-D':>8}   best 3-D grasp")
    cases = [((640, 480), (0.06, 0.04, 0.08), "60x40x80 mm"), ((1280, 720), (0.06, 0.04, 0.08), "60x40x80 mm"),
             ((640, 480), (0.3, 0.15, 0.08), "300x150x80 mm"), ((1280, 720), (0.3, 0.15, 0.08), "300x150x80 mm")]
    for (width, height), size, label in cases:
        mask, depth, intrinsics = tabletop(width, height, size)
        planar = median_ms(lambda: grasp_regions(mask), runs)
        spatial = median_ms(lambda: grasp_regions(mask, depth=depth, intrinsics=intrinsics), runs)
        best = grasp_regions(mask, depth=depth, intrinsics=intrinsics)[0]
        what = (f"width {best.width_m * 1000:.0f} mm at z {best.position_m[2]:.3f} m" if best.has_3d
                else f"2-D only: {best.reason}")
        print(f"  {f'{width}x{height}':<10}{label:<16}{int(mask.sum()):>9}{planar:>8.2f}{spatial:>8.2f}   {what}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args(argv)
    import cv2

    # One core: the node's worker shares the robot's CPU with everything else.
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    cv2.setNumThreads(1)
    print("on one CPU core")
    report(args.runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
