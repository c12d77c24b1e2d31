"""Benchmark uploadguard.images.compress_image against naive Pillow and libvips.

Generates photo-like JPEGs (smooth gradients, shapes, thin lines and sensor-like
noise; EXIF orientation 6, quality 90, about 2.4 bits per pixel like a phone photo)
of 12 MP (4000x3000) and 48 MP (8000x6000) in a temporary directory, then shrinks
each to a 2048-pixel long edge with:

naive    Image.open, ImageOps.exif_transpose, LANCZOS resize, save(quality=85, optimize=True)
bounded  compress_image(path, max_dimension=2048)             (long edge 90-100 % of 2048)
bounded-noopt  the same with optimize=False (no Huffman optimisation: faster, ~5 % larger)
exact    compress_image(path, max_dimension=2048, exact=True)  (long edge exactly 2048)
vips     pyvips.Image.thumbnail(path, 2048) + jpegsave_buffer(Q=85, optimize_coding=True),
         the anchor, skipped with a note when pyvips or libvips is missing

Every run of every variant is a fresh process (so its peak RSS, VmHWM, is its own),
which first handles a tiny photo so that lazily imported plugins are loaded, as in a
long-running server, and then times the real one. Runs are interleaved across
variants so background load hits them alike; the table shows medians of wall time
and of CPU time (user + system, all threads: libvips and the two-strip resize of
exact mode use a second core, so their CPU time exceeds their wall time). PSNR is
measured against a reference computed here: the full decode, turned upright and
LANCZOS-resized to each variant's output size (so speed is not bought with quality).
Finally a batch of 10 photos goes through compress_images() on 1 and 2 threads.

``--amplifiers`` instead times compress_image, in this process, on files built to
cost more than their pixels (issue 9, item 4: many JPEG scans, segments, PNG chunks,
inflating PNG text, GIF blocks, garbage, huge EXIF, many frames), each beside a
normal file with as many pixels; run it with ``PYTHONPATH`` pointing at another
checkout to measure that version.

Usage::

    python bench/bench_images.py            # 5 runs, 12 and 48 MP, about a minute
    python bench/bench_images.py --quick    # 2 runs, 12 MP only (smoke test)
    python bench/bench_images.py --amplifiers   # about 20 s

This is a benchmark, not a test: it prints a Markdown table and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LONG_EDGE = 2048
VARIANTS = ("naive", "bounded", "bounded-noopt", "exact", "vips")
# Targets from issue 5, as fractions of naive: (time, peak RSS) per size.
TARGETS = {
    ("bounded", "12 MP"): (0.25, 0.35), ("bounded", "48 MP"): (0.16, 0.10),
    ("exact", "12 MP"): (0.75, None), ("exact", "48 MP"): (0.31, None),
}


# -- child process: one variant, one image --------------------------------------------


def _peak_rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
    return usage.ru_utime + usage.ru_stime


def _run_variant(variant: str, path: str) -> tuple[bytes, tuple[int, int]]:
    from PIL import Image, ImageOps

    if variant == "naive":
        im = ImageOps.exif_transpose(Image.open(path))
        scale = LONG_EDGE / max(im.size)
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        im.save(buffer, "JPEG", quality=85, optimize=True)
        return buffer.getvalue(), im.size
    if variant == "vips":
        import pyvips  # type: ignore[import-untyped]

        thumb = pyvips.Image.thumbnail(path, LONG_EDGE)
        return thumb.jpegsave_buffer(Q=85, optimize_coding=True, strip=True), (thumb.width, thumb.height)
    from uploadguard.images import compress_image, compress_images

    if variant.startswith("batch"):
        results = compress_images([path] * 10, workers=int(variant[5:]), max_dimension=LONG_EDGE)
        return results[0].data, (results[0].width, results[0].height)
    result = compress_image(path, max_dimension=LONG_EDGE, exact=variant == "exact",
                            optimize=variant != "bounded-noopt")
    return result.data, (result.width, result.height)


def child(variant: str, path: str, warmup: str, output: str) -> None:
    sys.path.insert(0, ROOT)
    import PIL.Image  # noqa: F401  - every variant pays for the same imports
    import PIL.ImageOps  # noqa: F401

    import uploadguard.images  # noqa: F401

    _run_variant("bounded" if variant.startswith("batch") else variant, warmup)
    started, cpu = time.perf_counter(), _cpu_seconds()
    data, size = _run_variant(variant, path)
    elapsed, cpu = time.perf_counter() - started, _cpu_seconds() - cpu
    with open(output, "wb") as out:
        out.write(data)
    print(json.dumps({"seconds": elapsed, "cpu": cpu, "peak_kib": _peak_rss_kib(),
                      "bytes": len(data), "size": size}))


# -- parent: images, runs, reference, table -------------------------------------------


def make_photo(width: int, height: int, seed: int) -> Any:
    """Smooth gradients, blurred shapes, sharp lines and per-channel noise."""
    from PIL import Image, ImageChops, ImageDraw, ImageFilter

    rnd = random.Random(seed)
    small = (width // 8, height // 8)
    channels = []
    for angle in (0, 90, 200):
        ramp = Image.linear_gradient("L").rotate(angle, resample=Image.Resampling.BICUBIC)
        ring = Image.radial_gradient("L")
        channels.append(ImageChops.add(ramp.resize(small), ring.resize(small), scale=2.0))
    base = Image.merge("RGB", channels)
    draw = ImageDraw.Draw(base)
    for _ in range(60):
        x, y, s = rnd.randrange(small[0]), rnd.randrange(small[1]), rnd.randrange(5, max(6, small[0] // 6))
        color = tuple(rnd.randrange(256) for _ in range(3))
        if rnd.random() < 0.5:
            draw.ellipse((x, y, x + s, y + s), fill=color)
        else:
            draw.rectangle((x, y, x + s, y + s // 2), fill=color)
    base = base.filter(ImageFilter.GaussianBlur(1)).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(base)
    for _ in range(200):
        x, y = rnd.randrange(width), rnd.randrange(height)
        end = (x + rnd.randrange(-width // 4, width // 4), y + rnd.randrange(-height // 4, height // 4))
        draw.line((x, y, *end), fill=tuple(rnd.randrange(256) for _ in range(3)),
                  width=rnd.randrange(1, 6))
    noise = Image.merge("RGB", [Image.effect_noise((width, height), 8) for _ in range(3)])
    return ImageChops.add(base, noise, offset=-128)


def write_photo(path: str, width: int, height: int, seed: int = 1) -> None:
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6  # sensor-shaped pixels of a photo taken in portrait: turn 90 degrees
    make_photo(width, height, seed).save(path, "JPEG", quality=90, exif=exif.tobytes())


def psnr(a: Any, b: Any) -> float:
    from PIL import ImageChops

    histogram = ImageChops.difference(a.convert("RGB"), b.convert("RGB")).histogram()
    squares = sum(count * (value % 256) ** 2 for value, count in enumerate(histogram))
    mse = squares / (a.width * a.height * 3)
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def run_child(variant: str, path: str, warmup: str, workdir: str) -> dict[str, Any]:
    output = os.path.join(workdir, f"out-{variant}-{os.path.basename(path)}")
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", variant, path,
                           warmup, output], capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["output"] = output
    return result


def vips_available() -> str | None:
    """libvips version, or None when pyvips cannot load it."""
    done = subprocess.run([sys.executable, "-c", "import pyvips; print(pyvips.version(0), "
                           "pyvips.version(1), pyvips.version(2), sep='.')"],
                          capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def machine() -> str:
    import PIL
    from PIL import features

    model = "unknown CPU"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (f"{datetime.date.today().isoformat()}, {os.cpu_count()} cores ({model}), "
            f"Linux {platform.release()}, Python {platform.python_version()}, Pillow "
            f"{PIL.__version__} (libjpeg-turbo {features.version('libjpeg_turbo')})")


# -- amplifiers: files whose cost is not in their pixels --------------------------------


def _encoded(im: Any, fmt: str = "JPEG", **params: Any) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, fmt, **params)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _before_idat(png: bytes, chunks: bytes) -> bytes:
    at = png.index(b"IDAT") - 4
    return png[:at] + chunks + png[at:]


def _with_empty_scans(data: bytes, extra: int) -> bytes:
    """``extra`` more copies of the first luma AC scan (with its Huffman table): each codes nothing."""
    import re

    pos, previous = 2, (0, 0)
    while data[pos + 1] != 0xD9:
        end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if data[pos + 1] == 0xDA:
            found = re.compile(rb"\xff[^\x00\xd0-\xd7]").search(data, end)
            assert found is not None
            end = found.start()
            header = data[pos + 4:pos + 10]
            if previous[0] == 0xC4 and header[:2] == b"\x01\x01" and header[3] and not header[5] >> 4:
                return data[:end] + data[previous[1]:end] * extra + data[end:]
        previous, pos = (data[pos + 1], pos), end
    raise ValueError("no luma AC scan")


def amplifier_cases() -> list[tuple[str, bytes, dict[str, Any]]]:
    import struct
    import zlib

    from PIL import Image

    tiny = Image.new("RGB", (64, 64), (200, 30, 30))
    png, jpeg = _encoded(tiny, "PNG"), _encoded(tiny)
    gif = _encoded(tiny.convert("P"), "GIF")
    palette_end = 13 + 3 * 2 ** ((gif[10] & 7) + 1)
    flat = _encoded(Image.new("RGB", (4000, 3000), (90, 120, 150)), quality=90, progressive=True)
    exif = (b"Exif\0\0II*\0" + struct.pack("<IH", 8, 5000)
            + b"".join(struct.pack("<HHI", 0x8000 + i, 3, 1) + b"\1\0\0\0" for i in range(5000))
            + struct.pack("<I", 0))
    frames = [Image.new("RGB", (64, 64), (i % 256, 0, 0)) for i in range(5000)]
    small = make_photo(320, 240, 2)
    return [
        ("12 MP photo, progressive q90 (reference)", _encoded(make_photo(4000, 3000, 1), quality=90,
                                                              progressive=True), {}),
        ("12 MP flat, progressive: libjpeg's 10 scans", flat, {}),
        ("the same + 90 empty scans (100: the limit)", _with_empty_scans(flat, 90), {}),
        ("the same + 1,000 empty scans", _with_empty_scans(flat, 1000), {}),
        ("64x64 PNG (reference)", png, {}),
        ("64x64 JPEG + 200,000 empty comment segments",
         jpeg[:2] + b"\xff\xfe\x00\x02" * 200_000 + jpeg[2:], {}),
        ("64x64 PNG + 200,000 empty private chunks", _before_idat(png, _png_chunk(b"prVt", b"") * 200_000), {}),
        ("64x64 PNG + 60 zTXt chunks of 1 MB text",
         _before_idat(png, _png_chunk(b"zTXt", b"c\0\0" + zlib.compress(b"a" * 10**6, 9)) * 60), {}),
        ("64x64 PNG, EXIF with 5,000 tags, keep_exif", _encoded(tiny, "PNG", exif=exif), {"keep_exif": True}),
        ("64x64 GIF + 1,000,000 one-byte comment blocks",
         gif[:palette_end] + b"\x21\xfe" + b"\x01x" * 10**6 + b"\0" + gif[palette_end:], {}),
        ("320x240 JPEG (reference)", _encoded(small, quality=90), {}),
        ("320x240 JPEG + 1 MB of garbage between segments",
         (lambda d: d[:2] + b"\xff\xfe\x00\x03x" + b"\0" * 10**6 + d[2:])(_encoded(small, quality=90)), {}),
        ("64x64 GIF, 5,000 frames", _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:]), {}),
        ("64x64 WebP, 5,000 frames", _encoded(frames[0], "WEBP", save_all=True, append_images=frames[1:]), {}),
        ("64x64 APNG, 5,000 frames", _encoded(frames[0], "PNG", save_all=True, append_images=frames[1:]), {}),
    ]


def amplifiers(runs: int) -> None:
    import uploadguard.images as images

    print(f"# {machine()}; uploadguard.images from {images.__file__}")
    print(f"# load average at start: {os.getloadavg()[0]:.2f}; median of {runs} runs, in-process")
    print()
    print("| file | size | time | outcome |")
    print("|---|---:|---:|---|")
    images.compress_image(_encoded(make_photo(320, 240, 3), quality=90))  # warm-up
    for label, data, options in amplifier_cases():
        seconds, outcome = [], ""
        for _ in range(runs):
            started = time.perf_counter()
            try:
                result = images.compress_image(data, **options)
                outcome = f"{result.format} {result.width}x{result.height}"
            except images.ImageError as exc:
                outcome = f"ImageError {exc.code!r}"
            seconds.append(time.perf_counter() - started)
        size = f"{len(data) / 1024:.0f} KiB"
        print(f"| {label} | {size} | {statistics.median(seconds) * 1000:.1f} ms | {outcome} |")
    print()
    print(f"# load average at end: {os.getloadavg()[0]:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="2 runs, 12 MP only")
    parser.add_argument("--runs", type=int, default=None, help="runs per variant (default 5)")
    parser.add_argument("--amplifiers", action="store_true",
                        help="time files built to cost more than their pixels instead")
    parser.add_argument("--child", nargs=4, metavar=("VARIANT", "PATH", "WARMUP", "OUTPUT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    if args.amplifiers:
        amplifiers(args.runs or 3)
        return 0
    runs = args.runs or (2 if args.quick else 5)
    sizes = {"12 MP": (4000, 3000)} if args.quick else {"12 MP": (4000, 3000), "48 MP": (8000, 6000)}
    vips = vips_available()
    variants = [v for v in VARIANTS if v != "vips" or vips]

    from PIL import Image, ImageOps

    print(f"# {machine()}; libvips {vips or 'not available (vips row skipped)'}")
    print(f"# load average at start: {os.getloadavg()[0]:.2f}; {runs} runs per variant, medians")
    with tempfile.TemporaryDirectory(prefix="bench-images-") as workdir:
        warmup = os.path.join(workdir, "warmup.jpg")
        write_photo(warmup, 320, 240)
        rows: list[dict[str, Any]] = []
        for label, (width, height) in sizes.items():
            path = os.path.join(workdir, f"photo-{label.split()[0]}mp.jpg")
            write_photo(path, width, height)
            bpp = os.path.getsize(path) * 8 / (width * height)
            samples: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
            for _ in range(runs):
                for variant in variants:
                    samples[variant].append(run_child(variant, path, warmup, workdir))
            full = ImageOps.exif_transpose(Image.open(path))
            references: dict[tuple[int, int], Any] = {}
            base = {key: statistics.median(s[key] for s in samples["naive"])
                    for key in ("seconds", "cpu", "peak_kib")}
            for variant in variants:
                row = {key: statistics.median(s[key] for s in samples[variant])
                       for key in ("seconds", "cpu", "peak_kib")}
                last = samples[variant][-1]
                out_size = tuple(last["size"])
                if out_size not in references:
                    references[out_size] = full.resize(out_size, Image.Resampling.LANCZOS)
                row.update(label=label, variant=variant, bytes=last["bytes"], size=out_size,
                           psnr=psnr(Image.open(last["output"]), references[out_size]),
                           source=f"{os.path.getsize(path) / 2**20:.1f} MiB, {bpp:.1f} bpp",
                           **{f"{key}_ratio": row[key] / base[key] for key in base})
                rows.append(row)
            del full, references
        print()
        print("| image | variant | time | vs naive | CPU time | vs naive | peak RSS | vs naive "
              "| output | size | PSNR |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|")
        for r in rows:
            print(f"| {r['label']} ({r['source']}) | {r['variant']} | {r['seconds'] * 1000:.0f} ms "
                  f"| {r['seconds_ratio']:.2f}x | {r['cpu'] * 1000:.0f} ms | {r['cpu_ratio']:.2f}x "
                  f"| {r['peak_kib'] / 1024:.0f} MiB | {r['peak_kib_ratio']:.2f}x "
                  f"| {r['bytes'] / 1024:.0f} KiB | {r['size'][0]}x{r['size'][1]} "
                  f"| {r['psnr']:.2f} dB |")
        print()
        for r in rows:
            if (r["variant"], r["label"]) in TARGETS:
                t_target, m_target = TARGETS[r["variant"], r["label"]]
                verdicts = [f"time {r['seconds_ratio']:.3f}x (target <= {t_target}x: "
                            f"{'met' if r['seconds_ratio'] <= t_target else 'MISSED'})"]
                if m_target is not None:
                    verdicts.append(f"peak RSS {r['peak_kib_ratio']:.3f}x (target <= {m_target}x: "
                                    f"{'met' if r['peak_kib_ratio'] <= m_target else 'MISSED'})")
                print(f"- {r['variant']} {r['label']}: " + "; ".join(verdicts))

        path = os.path.join(workdir, "photo-12mp.jpg")
        print()
        print("| batch of 10 x 12 MP, bounded | wall time | photos/s | speed-up | CPU time |")
        print("|---|---:|---:|---:|---:|")
        batch_samples: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
        for _ in range(max(1, runs - 2)):
            for workers, found in batch_samples.items():
                found.append(run_child(f"batch{workers}", path, warmup, workdir))
        batch = {workers: {key: statistics.median(r[key] for r in found) for key in ("seconds", "cpu")}
                 for workers, found in batch_samples.items()}
        for workers, b in batch.items():
            print(f"| compress_images(workers={workers}) | {b['seconds'] * 1000:.0f} ms "
                  f"| {10 / b['seconds']:.1f} | {batch[1]['seconds'] / b['seconds']:.2f}x "
                  f"| {b['cpu'] * 1000:.0f} ms |")
    print()
    print(f"# load average at end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
