"""Benchmark `retrieve index` extraction: end-to-end vs forward-only vs a naive per-image loop, and memory.

Hardware is printed in the header. Ratios are measured in one run, against baselines run here:
  forward-only  = the same model on pre-decoded tensors at the same batch size and runtime settings
  naive loop    = PIL open -> transform -> model(x[None]) one image at a time (same model, same runtime)
  memory        = peak RSS of a `retrieve index` subprocess for N1 vs N2 images (streamed shards)
  dtypes        = forward-only img/s for float32/bf16 x contiguous/channels_last: how the CPU default
                  (`device.resolve_runtime`) was chosen
  compare       = end-to-end `build_index` img/s of several backbones on the same JPEGs, interleaved
                  over rounds, as ratios to the first (the default backbone against resnet50/resnet18)

    python bench/extract.py [--n 2000] [--backbone resnet18] [--memory 2000,20000] [--dtypes resnet18,resnet50]
                            [--compare efficientnet_lite0,resnet50,resnet18 --rounds 2]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipelines.index_folder import build_index
from retrieval.backbones import load_backbone
from retrieval.config import IndexConfig
from retrieval.device import Runtime, machine_summary, resolve_runtime
from retrieval.embed import default_batch_size, forward, prepare_model
from retrieval.images import Transform, load_tensor, open_image, scan
from retrieval.samples import CLASSES, SampleConfig, make_samples


def header() -> str:
    return "" + machine_summary()


def make_jpegs(root: Path, n: int, size: int = 256) -> Path:
    per_class = -(-n // len(CLASSES))
    if not (root / "train").exists() or sum(1 for _ in root.rglob("*.jpg")) < per_class * len(CLASSES):
        make_samples(root, SampleConfig(per_class=per_class, test_per_class=0, size=size, format="jpg"))
    return root / "train"


def bench_throughput(images: Path, backbone_name: str, batch_size: int | None, naive_n: int) -> None:
    runtime = resolve_runtime("auto", "auto")
    backbone = load_backbone(backbone_name, "none")
    model = prepare_model(backbone, runtime)
    transform = Transform(backbone.preprocess)
    bs = batch_size or default_batch_size(runtime)
    entries, _ = scan(images)
    print(f"runtime: {runtime.describe()}, batch {bs}, {len(entries)} JPEGs 256x256, {backbone_name}")

    # 1. forward-only on pre-decoded tensors (decode excluded, same batch size)
    decoded = torch.stack([load_tensor(e.path, transform)[0] for e in entries[: bs * 8]])
    forward(model, runtime, transform, decoded[:bs])  # warm-up
    t = time.perf_counter()
    n = 0
    while n < len(entries):
        for s in range(0, len(decoded), bs):
            forward(model, runtime, transform, decoded[s : s + bs])
            n += len(decoded[s : s + bs])
    fwd = n / (time.perf_counter() - t)

    # 2. end-to-end build_index (scan, decode in workers, embed, shards, FAISS, commit)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        report = build_index(
            IndexConfig(
                images=images, index=Path(tmp) / "idx", backbone=backbone_name, weights="none", batch_size=bs
            )
        )
        wall = time.perf_counter() - t
    load = report.stages.get("load model", 0.0)
    e2e = report.embedded / (wall - load)
    e2e_all = report.embedded / wall

    # 3. naive loop, as users write it: PIL open -> transform -> model(x[None]), torch defaults (fp32)
    plain = load_backbone(backbone_name, "none").eval()
    t = time.perf_counter()
    with torch.no_grad():
        for e in entries[:naive_n]:
            plain(transform(open_image(e.path))[None])
    naive = naive_n / (time.perf_counter() - t)
    # 3b. the same loop with our runtime settings (bf16 autocast, channels_last): batching alone
    t = time.perf_counter()
    with torch.inference_mode(), runtime.autocast():
        for e in entries[:naive_n]:
            x = transform(open_image(e.path))[None].to(runtime.device)
            model(x.contiguous(memory_format=torch.channels_last) if runtime.channels_last else x)
    naive_rt = naive_n / (time.perf_counter() - t)

    print(f"forward-only (pre-decoded):  {fwd:8.1f} img/s")
    print(
        f"end-to-end index:            {e2e:8.1f} img/s  (incl. model load: {e2e_all:.1f} img/s; stages: "
        + ", ".join(f"{k} {v:.1f}s" for k, v in report.stages.items())
        + ")"
    )
    print(f"naive per-image loop (fp32): {naive:8.1f} img/s  ({naive_n} images)")
    print(
        f"per-image loop, our runtime: {naive_rt:8.1f} img/s  ({naive_n} images; batch 1, bf16/channels_last)"
    )
    print(f"RATIO end-to-end / forward-only = {e2e / fwd:.2f}  (target >= 0.85)")
    print(f"RATIO end-to-end / naive loop   = {e2e / naive:.2f}  (target >= 2)")
    print(
        f"RATIO end-to-end / per-image loop with our runtime = {e2e / naive_rt:.2f}  (batching + overlap alone)"
    )


def bench_compare(images: Path, names: list[str], rounds: int) -> None:
    """End-to-end img/s (model load excluded) of each backbone, interleaved so drift hits all alike.
    Random weights: the same arithmetic as the ImageNet ones, which cannot all be fetched offline."""
    rates: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names:
            with tempfile.TemporaryDirectory() as tmp:
                t = time.perf_counter()
                report = build_index(
                    IndexConfig(images=images, index=Path(tmp) / "idx", backbone=name, weights="none")
                )
                wall = time.perf_counter() - t - report.stages.get("load model", 0.0)
            rates[name].append(report.embedded / wall)
            print(f"compare round {r + 1} {name:20s} {rates[name][-1]:8.1f} img/s end to end", flush=True)
    base = sum(rates[names[0]])
    for name in names:
        print(
            f"COMPARE {name:20s} {sum(rates[name]) / rounds:8.1f} img/s  {names[0]}/{name} = {base / sum(rates[name]):.2f}"
        )


def bench_dtypes(backbones: list[str], batch_size: int, seconds: float = 8.0) -> None:
    """Forward-only img/s on random uint8 batches for each dtype x memory format, on the CPU."""
    cpu = torch.device("cpu")
    for name in backbones:
        backbone = load_backbone(name, "none")
        transform = Transform(backbone.preprocess)
        x = torch.randint(
            0, 256, (batch_size, 3, backbone.preprocess.size, backbone.preprocess.size), dtype=torch.uint8
        )
        rates = {}
        for dtype in (None, torch.bfloat16):
            for channels_last in (False, True):
                runtime = Runtime(device=cpu, autocast_dtype=dtype, channels_last=channels_last)
                model = prepare_model(load_backbone(name, "none"), runtime)
                forward(model, runtime, transform, x)  # warm-up (oneDNN primitive creation)
                n, t = 0, time.perf_counter()
                while time.perf_counter() - t < seconds:
                    forward(model, runtime, transform, x)
                    n += batch_size
                rates[(dtype, channels_last)] = n / (time.perf_counter() - t)
        base = rates[(None, False)]
        cells = "  ".join(
            f"{'bf16' if d else 'fp32'} {'channels_last' if cl else 'contiguous'} {r:6.1f} ({r / base:.2f}x)"
            for (d, cl), r in rates.items()
        )
        print(f"dtypes {name} batch {batch_size}: {cells}")


def bench_memory(root: Path, counts: list[int], backbone_name: str) -> None:
    for n in counts:
        images = make_jpegs(root / f"mem{n}", n)
        with tempfile.TemporaryDirectory() as tmp:
            code = (
                "import resource,sys;from pipelines.index_folder import build_index;"
                "from retrieval.config import IndexConfig;"
                f"r=build_index(IndexConfig(images={str(images)!r},index={tmp + '/idx'!r},backbone={backbone_name!r},weights='none'));"
                "print(r.indexed, r.embedded/r.seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
            )
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            indexed, rate, self_kb = out.stdout.split()
            children_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            print(
                f"memory: {indexed} images -> peak RSS main process {int(self_kb) / 1024:.0f} MiB "
                f"(largest child incl. loader workers so far {max(before, children_kb) / 1024:.0f} MiB), {float(rate):.1f} img/s"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--naive", type=int, default=200, help="images for the naive loop")
    ap.add_argument(
        "--memory", default="2000,20000", help="image counts for the memory comparison ('' skips)"
    )
    ap.add_argument("--dtypes", default="", help="backbones for the dtype x memory-format table ('' skips)")
    ap.add_argument("--compare", default="", help="backbones for the end-to-end comparison ('' skips)")
    ap.add_argument("--rounds", type=int, default=2, help="compare: interleaved rounds")
    ap.add_argument("--skip-throughput", action="store_true", help="only the other parts")
    ap.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "retrieve-bench-extract"))
    args = ap.parse_args()
    print(header())
    root = Path(args.data)
    images = make_jpegs(root / f"n{args.n}", args.n)
    if not args.skip_throughput:
        bench_throughput(images, args.backbone, args.batch_size, args.naive)
    if args.compare:
        bench_compare(images, args.compare.split(","), args.rounds)
    if args.dtypes:
        bench_dtypes(args.dtypes.split(","), args.batch_size or 32)
    if args.memory:
        bench_memory(root, [int(c) for c in args.memory.split(",")], args.backbone)


if __name__ == "__main__":
    main()
