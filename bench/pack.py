"""Pack a folder of small files (CIFAR-10's 60k JPEGs) into one .npz to carry to the GPU machine, and back.

The device carries at most 64 MiB a call; CIFAR-10's tar is 93 MB, two thirds of it tar headers and
block padding around ~1 KB files. The same bytes in one array are 55 MB:

    python bench/pack.py pack /tmp/cifar10 .gpu/cifar10.npz      # here (.gpu/ in .git/info/exclude)
    python3 bench/pack.py unpack .gpu/cifar10.npz /tmp/cifar10   # there (bench/gpu.sh does it)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def pack(src: Path, out: Path) -> None:
    files = sorted(p for p in src.rglob("*") if p.is_file())
    blobs = [p.read_bytes() for p in files]
    names = "\n".join(p.relative_to(src).as_posix() for p in files).encode()
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        out,
        blob=np.frombuffer(b"".join(blobs), np.uint8),
        offsets=np.cumsum([0, *map(len, blobs)]),
        names=np.frombuffer(names, np.uint8),
    )
    print(f"packed {len(files)} files, {sum(map(len, blobs)) / 1e6:.1f} MB, into {out}")


def unpack(src: Path, dst: Path) -> None:
    with np.load(src, allow_pickle=False) as z:
        blob, offsets, names = z["blob"].tobytes(), z["offsets"], z["names"].tobytes().decode().split("\n")
    for name, a, b in zip(names, offsets[:-1], offsets[1:], strict=True):
        path = dst / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise SystemExit(f"refusing to write outside {dst}: {name}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob[a:b])
    print(f"unpacked {len(names)} files into {dst}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["pack", "unpack"])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    args = parser.parse_args()
    t = time.perf_counter()
    (pack if args.action == "pack" else unpack)(args.src, args.dst)
    print(f"{time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
