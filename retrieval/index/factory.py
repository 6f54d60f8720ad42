"""Which FAISS indexes to try for n vectors of d dims, and what each one holds in RAM (the memory model)."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from retrieval.errors import RetrieveError

# FAISS's guideline: below ~100k vectors exact search is fast enough and needs no training.
FLAT_BELOW = 100_000
ID_BYTES = 8  # int64 id stored beside every code in the inverted lists
IDMAP_BYTES = 48  # IndexIDMap2: the id array plus its reverse hash map, per vector
FASTSCAN_BLOCK = 32  # x4fs codes are packed 32 vectors to a block: each list rounds up to it
# k-means needs about 39 points per list to be stable (FAISS warns below that).
POINTS_PER_LIST = 39


@dataclass(frozen=True)
class Candidate:
    """One factory string to build and measure, with its estimated RAM for the vectors at hand."""

    factory: str
    bytes: int
    lossy: bool  # its codes lose precision: the sweep tries re-ranking from the stored vectors

    @property
    def nlist(self) -> int | None:
        m = re.search(r"IVF(\d+)", self.factory)
        return int(m.group(1)) if m else None


def nlist_for(n: int) -> int:
    """Inverted lists for n vectors: the power of two nearest 4 sqrt(n), with >= 39 points a list."""
    k = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    while k > 1 and n / k < POINTS_PER_LIST:
        k //= 2
    return max(1, k)


def _pq_sizes(d: int) -> list[int]:
    """Sub-quantizer counts that divide d, from 4 to 32 dims each (FAISS's usual range)."""
    return sorted({m for m in (d // 32, d // 16, d // 8, d // 4) if m >= 2 and d % m == 0})


def estimate_bytes(factory: str, n: int, d: int) -> int | None:
    """RAM of `factory` holding n vectors of d dims, or None for strings the model does not know."""
    per_vector, fixed, dim = 0.0, 0.0, d
    parts = factory.replace(" ", "").split(",")
    ivf = None
    for i, part in enumerate(parts):
        if m := re.fullmatch(r"OPQ(\d+)(?:_(\d+))?", part):
            out = int(m.group(2) or dim)
            fixed += 4 * out * dim
            dim = out
        elif m := re.fullmatch(r"PCAR?(\d+)", part):
            out = int(m.group(1))
            fixed += 4 * out * (dim + 1)
            dim = out
        elif m := re.fullmatch(r"IVF(\d+)(?:_HNSW(\d+))?", part):
            ivf = int(m.group(1))
            fixed += 4 * ivf * dim + (ivf * 8 * int(m.group(2)) if m.group(2) else 0)
            per_vector += ID_BYTES
        elif m := re.fullmatch(r"HNSW(\d+)", part) if i == 0 else None:
            per_vector += 2 * 4 * int(m.group(1)) * 1.05  # level 0 holds 2M links; upper levels ~5%
            if len(parts) == 1:
                per_vector += 4 * dim
        elif part == "Flat":
            per_vector += 4 * dim
        elif m := re.fullmatch(r"SQ(4|6|8|fp16)", part):
            per_vector += dim * (2 if m.group(1) == "fp16" else int(m.group(1)) / 8)
            fixed += 8 * dim
        elif m := re.fullmatch(r"PQ(\d+)(?:x(\d+))?(fs)?", part):
            sub, bits = int(m.group(1)), int(m.group(2) or 8)
            per_vector += math.ceil(sub * bits / 8)
            fixed += 4 * dim * (1 << bits)  # the codebooks: 2^bits centroids per sub-space
            if m.group(3) and ivf:
                fixed += ivf * FASTSCAN_BLOCK * math.ceil(sub / 2)  # half-empty last block per list
        elif part in ("RFlat", "Refine(Flat)"):
            per_vector += 4 * d
        else:
            return None
    if ivf is None:
        per_vector += IDMAP_BYTES  # HNSW / Flat keep no ids: an IDMap2 holds them
    return math.ceil(per_vector * n + fixed + 4096)


def candidates(n: int, d: int) -> list[Candidate]:
    """The approximate indexes `--search auto` measures for n x d vectors, cheapest first.

    FAISS's guidelines: IVF with ~4 sqrt(n) lists; Flat codes, 8-bit scalar codes, or product
    codes (4-bit fast-scan and 8-bit) that the sweep re-ranks from the stored vectors. OPQ and HNSW
    are left to `--search` by name: OPQ trains for minutes on 2 cores, HNSW cannot remove vectors.
    """
    k = nlist_for(n)
    strings = [f"IVF{k},PQ{m}x4fs" for m in _pq_sizes(d)]
    strings += [f"IVF{k},PQ{m}" for m in _pq_sizes(d)[-1:]]
    strings += [f"IVF{k},SQ8", f"IVF{k},Flat"]
    out = [Candidate(s, estimate_bytes(s, n, d) or 0, lossy=not s.endswith("Flat")) for s in strings]
    return sorted(out, key=lambda c: c.bytes)


_UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "T": 1e12, "TB": 1e12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int | None) -> int | None:
    """'2GB', '512MB', '1.5GiB' or a byte count -> bytes; None stays None."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else ""
    if not m or unit not in _UNITS:
        raise RetrieveError(f"cannot read {text!r} as a memory size; write it like 2GB, 512MB or 1.5GiB")
    return int(float(m.group(1)) * _UNITS[unit])


def default_max_memory() -> int:
    """Half of this machine's RAM: room for the vectors being read and everything else running."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 8 * 10**9
