"""Data-pipeline throughput: JPEG decode, views, and the full stream from local and S3 shards.

    python scripts/bench_data.py [--images 512] [--img-size 224] [--seconds 8] [--small-img-size 64]
                                 [--batch-size 32] [--shard-size 64] [--skip-s3]

Generates ~500x375 JPEGs (quality 90, ~60 KB: data.synthetic shapes upscaled with
band-limited texture), then measures, each for --seconds:

    (a)  bare decode: PIL decode of the JPEG bytes from memory (data.decode.decode_rgb), nothing else
    (b)  plain PIL: decode_rgb + one uint8 view (RandomResizedCrop bicubic, flip; data.views); the stream
         normalises whole batches to float in the main process, which (d) and (e) include
    (a*) bare decode as the loader does it: data.decode.decode_pixels (simplejpeg for JPEGs)
    (c)  the loader's path: decode_pixels(min_size=draft_min_size(...)) + the same view
    (b') (c') the same at --small-img-size, where draft mode pays on 500x375 images
    (d)  the full stream: shards on local disk (file://) through data.stream.build_train_loader,
         one loader worker process (which decodes), batches of --batch-size
    (e)  the same shards on an S3 endpoint (scripts/s3_endpoint.py, moto on 127.0.0.1,
         started for the run and stopped at the end)

(a)-(c') run in this process, one thread (torch.set_num_threads(1)), interleaved in
short rounds so that load from other processes hits them alike. "per core" is images
per CPU-second: CPU time of this process and, for (d)/(e), of its loader workers (the
S3 endpoint's CPU is not counted; a real object store is another machine). The first
batch of a stream (worker start, shuffle-buffer fill) is not timed. Prints a markdown
table and whether the goals are met; timings are never asserted.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from PIL import Image

from data.config import DataConfig
from data.decode import decode_pixels, decode_rgb
from data.shards import write_shards
from data.synthetic import render_sample
from data.views import build_view_transform, draft_min_size, make_views

ENDPOINT_SCRIPT = Path(__file__).resolve().parent / "s3_endpoint.py"
WIDTH, HEIGHT = 500, 375
JPEG_QUALITY = 90
GOAL_DECODE_VIEW = 500.0  # images/s per core, decode + RandomResizedCrop(224) from ~500x375 JPEGs
GOAL_S3_VS_LOCAL = 0.9  # S3 stream per core / local stream per core


# --- data ---------------------------------------------------------------------------------


def _noise_field(rng: np.random.Generator, cell: int, height: int, width: int) -> np.ndarray:
    """Gaussian noise on a grid of `cell` px, bicubically upsampled to (height, width): band-limited texture."""
    small = rng.standard_normal((height // cell + 1, width // cell + 1)).astype(np.float32)
    return np.asarray(Image.fromarray(small, mode="F").resize((width, height), Image.Resampling.BICUBIC))


def bench_jpegs(num: int, seed: int = 0) -> list[bytes]:
    """`num` WIDTH x HEIGHT JPEGs: data.synthetic shapes upscaled, plus texture cut from shared fields."""
    rng = np.random.default_rng(seed)
    h2, w2 = 2 * HEIGHT, 2 * WIDTH
    # Luminance texture at several scales (grey-level std ~20) and smoother colour texture.
    luma = sum(a * _noise_field(rng, c, h2, w2) for c, a in ((16, 14.0), (4, 10.0), (2, 7.0), (1, 6.0)))
    chroma = np.stack([8 * _noise_field(rng, 16, h2, w2) + 4 * _noise_field(rng, 4, h2, w2) for _ in range(3)], -1)
    texture = luma[..., None] + chroma  # (2H, 2W, 3)
    out = []
    for index in range(num):
        shape, _ = render_sample(index, seed)
        base = np.asarray(shape.resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC), dtype=np.float32)
        y, x = int(rng.integers(0, HEIGHT)), int(rng.integers(0, WIDTH))
        pixels = np.clip(base + texture[y : y + HEIGHT, x : x + WIDTH], 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=JPEG_QUALITY)
        out.append(buf.getvalue())
    return out


# --- measuring ----------------------------------------------------------------------------


@dataclass
class Measure:
    """Images processed, wall seconds and CPU seconds they took."""

    images: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0

    def add(self, images: int, wall_s: float, cpu_s: float) -> None:
        self.images, self.wall_s, self.cpu_s = self.images + images, self.wall_s + wall_s, self.cpu_s + cpu_s

    @property
    def rate(self) -> float:
        return self.images / self.wall_s if self.wall_s else 0.0

    @property
    def per_core(self) -> float:
        return self.images / self.cpu_s if self.cpu_s else 0.0

    @property
    def cores(self) -> float:
        return self.cpu_s / self.wall_s if self.wall_s else 0.0


def run_in_process(
    stages: dict[str, Callable[[bytes, int], object]], data: list[bytes], seconds: float, chunk: int = 16
) -> dict[str, Measure]:
    """Run every stage for about `seconds`, in interleaved rounds of `chunk` images each."""
    for fn in stages.values():  # warm-up: first-call allocations, lazy imports
        for i in range(4):
            fn(data[i % len(data)], i)
    results = {name: Measure() for name in stages}
    deadline = time.perf_counter() + seconds * len(stages)
    start = 0
    while time.perf_counter() < deadline:
        for name, fn in stages.items():
            wall, cpu = time.perf_counter(), time.process_time()
            for i in range(start, start + chunk):
                fn(data[i % len(data)], i)
            results[name].add(chunk, time.perf_counter() - wall, time.process_time() - cpu)
        start += chunk
    return results


class ClientCpu:
    """CPU seconds used by this process and its children (loader workers), minus excluded processes."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude

    def snapshot(self) -> tuple[float, dict[int, float]]:
        """(this process + reaped children, {live child pid: its CPU}) now."""
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
        own = time.process_time() + reaped.ru_utime + reaped.ru_stime
        live = {}
        for child in psutil.Process().children(recursive=True):
            if child.pid in self.exclude:
                continue
            try:
                times = child.cpu_times()
            except psutil.NoSuchProcess:
                continue
            live[child.pid] = times.user + times.system
        return own, live

    @staticmethod
    def between(start: tuple[float, dict[int, float]], end: tuple[float, dict[int, float]]) -> float:
        # A worker alive at the start and reaped since counts in RUSAGE_CHILDREN whole: its CPU
        # before the start is taken off with the start's live sum.
        return end[0] - start[0] + sum(end[1].values()) - sum(start[1].values())


def stream_batches(cfg: DataConfig, urls: list[str], img_size: int, batch_size: int) -> Iterator[dict[str, Any]]:
    """The training stream of one rank (the one place that knows data.stream's API)."""
    from data.needs import DataNeeds
    from data.stream import build_train_loader

    loader = build_train_loader(
        cfg, DataNeeds(views=1), urls=urls, img_size=img_size, batch_size=batch_size, rank=0, world_size=1, seed=0
    )
    try:
        yield from loader
    finally:
        loader.close()


def measure_stream(
    cfg: DataConfig, urls: list[str], img_size: int, batch_size: int, seconds: float, exclude: set[int]
) -> Measure:
    """Images/s of the stream after its first batch, for about `seconds`."""
    meter = ClientCpu(exclude)
    batches = stream_batches(cfg, urls, img_size, batch_size)
    try:
        first = next(batches)
        assert first["views"][0].shape == (batch_size, 3, img_size, img_size), first["views"][0].shape
        wall, cpu = time.perf_counter(), meter.snapshot()
        images = 0
        while time.perf_counter() - wall < seconds:
            images += len(next(batches)["views"][0])
        return Measure(images, time.perf_counter() - wall, ClientCpu.between(cpu, meter.snapshot()))
    finally:
        batches.close()


# --- the S3 endpoint ------------------------------------------------------------------------


class Endpoint:
    """scripts/s3_endpoint.py as a subprocess: started, its exports parsed, stopped with SIGTERM."""

    def __init__(self, bucket: str = "pretrain", timeout_s: float = 60.0) -> None:
        self.bucket = bucket
        self.env: dict[str, str] = {}
        self.process = subprocess.Popen(
            [sys.executable, str(ENDPOINT_SCRIPT), "--bucket", bucket],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )
        # readline blocks; a timer kills a script that never prints, which ends the read.
        watchdog = threading.Timer(timeout_s, self.process.kill)
        watchdog.start()
        try:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                if line.startswith("export "):
                    name, _, value = line.removeprefix("export ").strip().partition("=")
                    self.env[name] = value
                elif "moto_server pid" in line:
                    break
        finally:
            watchdog.cancel()
        if "AWS_ENDPOINT_URL" not in self.env:
            code = self.stop()
            raise RuntimeError(f"{ENDPOINT_SCRIPT.name} printed no endpoint (exit code {code})")

    @property
    def storage_options(self) -> dict[str, Any]:
        return {
            "client_kwargs": {"endpoint_url": self.env["AWS_ENDPOINT_URL"]},
            "key": self.env["AWS_ACCESS_KEY_ID"],
            "secret": self.env["AWS_SECRET_ACCESS_KEY"],
        }

    def pids(self) -> set[int]:
        """The script and moto_server below it."""
        try:
            return {self.process.pid} | {p.pid for p in psutil.Process(self.process.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            return {self.process.pid}

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()
        finally:
            if self.process.stdout is not None:
                self.process.stdout.close()


# --- report ---------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _table(rows: list[tuple[str, Measure, str]], base: Measure) -> str:
    lines = [
        "| stage | images/s | per core | cores busy | vs (a) | vs (d) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, m, vs_d in rows:
        lines.append(
            f"| {label} | {m.rate:.0f} | {m.per_core:.0f} | {m.cores:.2f} | {m.per_core / base.per_core:.2f}x | {vs_d} |"
        )
    return "\n".join(lines)


def _write(data: list[bytes], out_url: str, shard_size: int, storage_options: dict[str, Any]) -> list[str]:
    """`data` as .jpg samples in shards at `out_url`; their URLs."""
    samples = ({"__key__": f"bench-{index:06d}", "jpg": jpeg} for index, jpeg in enumerate(data))
    manifest = write_shards(samples, out_url, prefix="train", shard_size=shard_size, storage_options=storage_options)
    return manifest.shard_urls()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512, help="JPEGs generated and written (default 512)")
    parser.add_argument("--img-size", type=int, default=224, help="view size (default 224)")
    parser.add_argument("--seconds", type=float, default=8.0, help="time per measured stage (default 8)")
    parser.add_argument(
        "--small-img-size", type=int, default=64, help="view size of rows (b') (c'); 0 skips them (default 64)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="stream batch size (default 32)")
    parser.add_argument("--shard-size", type=int, default=64, help="samples per shard (default 64)")
    parser.add_argument("--skip-s3", action="store_true", help="skip (e), the S3 endpoint")
    args = parser.parse_args(argv)
    if args.images < args.batch_size or args.images < 8:
        parser.error(f"--images must be >= --batch-size and >= 8, got {args.images}")
    torch.set_num_threads(1)
    load_before = os.getloadavg()

    started = time.perf_counter()
    data = bench_jpegs(args.images)
    mean_kb = sum(map(len, data)) / len(data) / 1000
    print(
        f"generated {len(data)} {WIDTH}x{HEIGHT} JPEGs (q{JPEG_QUALITY}, mean {mean_kb:.0f} KB) in "
        f"{time.perf_counter() - started:.1f} s",
        file=sys.stderr,
    )

    cfg = DataConfig()
    sizes = [args.img_size] + ([args.small_img_size] if args.small_img_size else [])
    transforms = {size: build_view_transform(cfg, size) for size in sizes}
    bounds = {size: draft_min_size(size, cfg.crop_scale_min) for size in sizes}

    def view(size: int, fast: bool) -> Callable[[bytes, int], object]:
        if fast:  # what the loader does
            return lambda jpeg, i: make_views(decode_pixels(jpeg, min_size=bounds[size]), transforms[size], 1, i)
        return lambda jpeg, i: make_views(decode_rgb(jpeg), transforms[size], 1, i)

    stages: dict[str, Callable[[bytes, int], object]] = {
        "a": lambda jpeg, i: decode_rgb(jpeg),
        "a*": lambda jpeg, i: decode_pixels(jpeg),
    }
    labels = {
        "a": "(a) decode only: PIL, full size",
        "a*": "(a*) decode only: decode_pixels (simplejpeg), full size",
    }
    for size, tag in zip(sizes, ("", "'"), strict=False):
        drafted = decode_rgb(data[0], min_size=bounds[size]).size
        stages[f"b{tag}"] = view(size, fast=False)
        stages[f"c{tag}"] = view(size, fast=True)
        labels[f"b{tag}"] = f"(b{tag}) decode + view {size} px: PIL"
        labels[f"c{tag}"] = (
            f"(c{tag}) decode + view {size} px: fast path (min_size {bounds[size]} -> {drafted[0]}x{drafted[1]})"
        )
    print(f"in-process stages {', '.join(stages)}: {args.seconds:.0f} s each", file=sys.stderr)
    results = run_in_process(stages, data, args.seconds)

    rows: list[tuple[str, Measure, str]] = [(labels[k], m, "") for k, m in results.items()]
    local, remote = Measure(), Measure()
    endpoint = None if args.skip_s3 else Endpoint()
    try:
        with tempfile.TemporaryDirectory(prefix="bench_data-") as tmp:
            streams = {"d": (DataConfig(num_workers=1, shuffle_buffer=64), _write(data, tmp, args.shard_size, {}))}
            if endpoint is not None:
                so = endpoint.storage_options
                url = f"s3://{endpoint.bucket}/bench"
                cfg_s3 = DataConfig(num_workers=1, shuffle_buffer=64, storage_options=so)
                streams["e"] = (cfg_s3, _write(data, url, args.shard_size, so))
                print(f"(e) S3 endpoint {endpoint.env['AWS_ENDPOINT_URL']}, shards at {url}", file=sys.stderr)
            # Alternating halves, each a fresh loader, so that a change of load hits both streams.
            exclude = set() if endpoint is None else endpoint.pids()
            for _ in range(2):
                for key, (stream_cfg, urls) in streams.items():
                    m = measure_stream(stream_cfg, urls, args.img_size, args.batch_size, args.seconds / 2, exclude)
                    (local if key == "d" else remote).add(m.images, m.wall_s, m.cpu_s)
    finally:
        if endpoint is not None:
            endpoint.stop()
    rows.append((f"(d) stream, local shards, 1 loader worker, {args.img_size} px", local, ""))
    if endpoint is not None:
        vs_local = f"{remote.per_core / local.per_core:.2f}x"
        rows.append(("(e) stream, S3 endpoint (moto, 127.0.0.1), same shards", remote, vs_local))

    print(
        f"\nMachine: {os.cpu_count()} cores, {_cpu_model()}; torch {torch.__version__}, 1 thread per process; "
        f"load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after. "
        f"Images: {len(data)} JPEGs {WIDTH}x{HEIGHT}, q{JPEG_QUALITY}, mean {mean_kb:.0f} KB; 1 view per image; "
        f"streams: batch {args.batch_size}, {args.shard_size} samples/shard, shuffle buffer 64.\n"
    )
    print(_table(rows, results["a"]))
    print()
    fast = results["c"]
    met = "met" if fast.per_core >= GOAL_DECODE_VIEW else "NOT met"
    print(
        f"goal decode + RandomResizedCrop({args.img_size}) >= {GOAL_DECODE_VIEW:.0f} images/s per core: "
        f"{met} ({fast.per_core:.0f}, row (c))"
    )
    if endpoint is not None:
        ratio = remote.per_core / local.per_core
        met = "met" if ratio >= GOAL_S3_VS_LOCAL else "NOT met"
        print(f"goal S3 stream >= {GOAL_S3_VS_LOCAL}x local per core: {met} ({ratio:.2f}x)")
    print(f"\ntotal {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
