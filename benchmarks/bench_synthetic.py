"""Benchmark: milliseconds to render one synthetic re-ID image (``render_person``), against reading an image.

For each size (128x64 and 256x128) and camera style (0: mild camera effects, 1: strong per-camera style) it
prints the time per rendered image and its ratio to a baseline measured in the same run on the same kind of
image: decoding an in-memory PNG of the same size with PIL and resampling it bilinearly to that size (what a
file-backed dataset pays per image before the tensor transforms, without the disk read). Both wall-clock and
CPU (process) time are reported; on a shared machine the CPU figures are the ones to compare. Rounds are
interleaved (render, baseline, render, ...) and the median round is kept.

    python benchmarks/bench_synthetic.py
    python benchmarks/bench_synthetic.py --images 400 --rounds 7 --json synthetic_bench.json

This replaces the wall-clock assertion of the former ``test_synthetic_render_speed`` test (flaky under load).
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import time

from PIL import Image

from nasreid.data import render_person

SIZES = ((128, 64), (256, 128))


def _time(fn, n: int) -> tuple[float, float]:
    """(wall ms, CPU ms) per call of ``fn(i)`` for ``i`` in ``range(n)``."""
    w, c = time.perf_counter(), time.process_time()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - w) / n * 1e3, (time.process_time() - c) / n * 1e3


def bench(height: int, width: int, style: float, images: int, rounds: int, ids: int = 20,
          cams: int = 4) -> dict[str, float]:
    def render(i: int) -> Image.Image:
        return render_person(1, i % ids, i % cams, i, height, width, camera_style=style)

    for i in range(ids * cams):  # warm the identity / camera attribute caches (as in a training epoch)
        render(i)
    pngs = []
    for i in range(ids):
        buf = io.BytesIO()
        render(i).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    box = (0.5, 0.5, width - 0.5, height - 0.5)  # a box other than the full image forces a real resample

    def read(i: int) -> Image.Image:
        img = Image.open(io.BytesIO(pngs[i % ids])).convert("RGB")
        return img.resize((width, height), Image.BILINEAR, box=box)

    rw, rc, bw, bc = [], [], [], []
    for _ in range(rounds):
        w, c = _time(render, images)
        rw.append(w)
        rc.append(c)
        w, c = _time(read, images)
        bw.append(w)
        bc.append(c)
    med = statistics.median
    return {"height": height, "width": width, "camera_style": style,
            "render_ms_wall": med(rw), "render_ms_cpu": med(rc),
            "png_read_ms_wall": med(bw), "png_read_ms_cpu": med(bc),
            "ratio_wall": med(rw) / med(bw), "ratio_cpu": med(rc) / med(bc)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200, help="images per timing round")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median kept)")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args()
    rows = [bench(h, w, s, args.images, args.rounds) for h, w in SIZES for s in (0.0, 1.0)]
    print(f"{'size':>8} {'style':>5} | {'render ms (wall / CPU)':>22} | {'PNG decode+resample ms':>22} |"
          f" {'render / PNG (wall / CPU)':>25}")
    for r in rows:
        print(f"{r['height']:>4}x{r['width']:<3} {r['camera_style']:>5.1f} | {r['render_ms_wall']:>10.3f} / "
              f"{r['render_ms_cpu']:<9.3f} | {r['png_read_ms_wall']:>10.3f} / {r['png_read_ms_cpu']:<9.3f} |"
              f" {r['ratio_wall']:>11.2f}x / {r['ratio_cpu']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
