"""Throughput of the CPU compression and bucketing kernels (ringcc.kernels).

Each kernel is timed against what one would write in torch (and NumPy where it has the
type) and against the memory-bound ceiling: the bytes the kernel must move (read +
written) at the rate a plain torch `copy_` of the same fp32 buffer moves them. The
torch/NumPy lines do less work (no block scaling) but are the baseline to beat.

    python bench/compress_kernels.py [--sizes 65536,16777216] [--pieces 1000] [--torch-threads 1]

Prints a markdown table per size: median time of --reps runs, GB/s of bytes moved,
fraction of the copy_ rate, and speedup of ringcc over each alternative.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import threading
import time

import numpy as np
import torch

import ringcc
from ringcc import kernels as K
from ringcc._native import _C


def median_seconds(fn, reps: int, min_time: float = 0.2) -> float:
    fn()  # warm up: fault pages in, fill caches
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 50 * reps:
            break
    return statistics.median(times)


def with_level(level, fn):
    def run():
        previous = _C._simd_level()
        _C._set_simd_level(level)
        try:
            fn()
        finally:
            _C._set_simd_level(previous)
    return run


def split_sizes(total: int, pieces: int, rng) -> list:
    """`pieces` sizes summing to `total`, uneven like a model's parameters."""
    w = rng.pareto(1.2, pieces) + 0.01
    sizes = np.maximum(1, (w / w.sum() * total).astype(np.int64))
    sizes[-1] += total - sizes.sum()
    if sizes[-1] < 1:  # rounding overshoot: take it from the largest piece
        i = int(np.argmax(sizes))
        sizes[i] += sizes[-1] - 1
        sizes[-1] = 1
    return [int(s) for s in sizes]


def pack_two_threads(flat, tensors):
    """The threading experiment: the pieces split in two halves by bytes, two threads."""
    nbytes = [t.numel() * t.element_size() for t in tensors]
    offsets = np.concatenate([[0], np.cumsum(nbytes)[:-1]]).tolist()
    ptrs = [t.data_ptr() for t in tensors]
    half = int(np.searchsorted(np.cumsum(nbytes), sum(nbytes) / 2))
    parts = [(ptrs[:half], offsets[:half], nbytes[:half]), (ptrs[half:], offsets[half:], nbytes[half:])]
    base = flat.data_ptr()

    def run():
        threads = [threading.Thread(target=_C._pack, args=(base, *p)) for p in parts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return run


def bench_size(n: int, pieces: int, reps: int, levels) -> list:
    rng = np.random.default_rng(0)
    x = torch.from_numpy((rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3, n)).astype(np.float32))
    xn = x.numpy()
    s = 0.5
    nb = (n + 255) // 256
    wire_bytes = K.compressed_nbytes(n)

    # The copy_ rate: a copy of S bytes moves 2S (read + write). The machine is shared,
    # so the ceiling is the best of several medians spread over the run (copy_rate()).
    dst = torch.empty_like(x)
    copy_times = []

    def copy_rate():
        copy_times.append(median_seconds(lambda: dst.copy_(x), reps))
        return 2 * 4 * n / min(copy_times)
    copy_rate()

    rows = []
    for comp, torch_half in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        copy_rate()
        wire = torch.empty(wire_bytes, dtype=torch.uint8)
        moved = 4 * n + 2 * n + 4 * nb
        alts = {f"torch (x*s).{'half' if comp == 'fp16' else 'bfloat16'}()":
                median_seconds(lambda: (x * s).to(torch_half), reps)}
        tmp, hout = torch.empty(n), torch.empty(n, dtype=torch_half)

        def torch_prealloc():  # the same without allocating (and faulting in) new outputs
            torch.mul(x, s, out=tmp)
            hout.copy_(tmp)
        alts["torch preallocated mul + copy_"] = median_seconds(torch_prealloc, reps)
        if comp == "fp16":
            alts["numpy (x*s).astype(float16)"] = median_seconds(lambda: (xn * np.float32(s)).astype(np.float16), reps)
        for level in levels:
            t = median_seconds(with_level(level, lambda: K.compress(x, comp, s, out=wire)), reps)
            rows.append((f"compress {comp} [{level}]", moved, t, alts))

        K.compress(x, comp, s, out=wire)
        acc = torch.zeros(n)
        h = x.to(torch_half)
        moved = 2 * n + 4 * nb + 8 * n
        alts = {"torch acc.add_(h.float())": median_seconds(lambda: acc.add_(h.float()), reps),
                "torch preallocated copy_ + add_": median_seconds(lambda: acc.add_(tmp.copy_(h)), reps)}
        if comp == "fp16":
            hn, accn = h.numpy(), acc.numpy()

            def np_acc():
                np.add(accn, hn, out=accn)  # the ufunc casts float16 -> float32 in its loop
            alts["numpy acc += h"] = median_seconds(np_acc, reps)
        for level in levels:
            t = median_seconds(with_level(level, lambda: K.decompress(wire, n, comp, out=acc, accumulate=True)), reps)
            rows.append((f"decompress+accumulate {comp} [{level}]", moved, t, alts))

        xe, r, y = x.clone(), torch.zeros(n), torch.empty(n)

        def torch_ef():  # the same steps without block scaling
            torch.add(xe, r, out=y)
            q = y.to(torch_half).float()
            torch.sub(y, q, out=r)
            xe.copy_(q)
        alts = {"torch add, round, sub, copy": median_seconds(torch_ef, reps)}
        t = median_seconds(lambda: K.error_feedback(xe, r, comp), reps)
        rows.append((f"error_feedback {comp} [{_C._simd_level()}]", 16 * n, t, alts))

    # Bucketing: `pieces` uneven tensors of n floats in all.
    sizes = split_sizes(n, pieces, rng)
    tensors = list(torch.split(x.clone(), sizes))
    tensors = [t.clone() for t in tensors]
    flat = torch.empty(n)
    arrays = [t.numpy() for t in tensors]
    alts = {"torch.cat(out=)": median_seconds(lambda: torch.cat(tensors, out=flat), reps),
            "numpy concatenate(out=)": median_seconds(lambda: np.concatenate(arrays, out=flat.numpy()), reps)}
    t = median_seconds(lambda: K.pack(tensors, out=flat), reps)
    rows.append((f"pack {len(tensors)} tensors", 8 * n, t, alts))
    # Threading experiment, on the raw binding both times (no Python checks).
    ptrs, nbytes = [q.data_ptr() for q in tensors], [q.nbytes for q in tensors]
    offsets = np.concatenate([[0], np.cumsum(nbytes)[:-1]]).tolist()
    t1 = median_seconds(lambda: _C._pack(flat.data_ptr(), ptrs, offsets, nbytes), reps)
    rows.append((f"_C._pack {len(tensors)} tensors, 1 thread (no checks)", 8 * n, t1, {}))
    t2 = median_seconds(pack_two_threads(flat, tensors), reps)
    rows.append((f"_C._pack {len(tensors)} tensors, 2 threads (no checks)", 8 * n, t2,
                 {"_C._pack, 1 thread": t1}))

    def torch_unpack():
        for dst_t, piece in zip(tensors, torch.split(flat, sizes)):
            dst_t.copy_(piece)
    alts = {"torch split + copy_ loop": median_seconds(torch_unpack, reps)}
    t = median_seconds(lambda: K.unpack(flat, tensors), reps)
    rows.append((f"unpack {len(tensors)} tensors", 8 * n, t, alts))
    rate = copy_rate()
    rows.insert(0, ("copy_ fp32 (torch), best of the run", 8 * n, 2 * 4 * n / rate, {}))
    return rate, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="65536,16777216", help="element counts (fp32)")
    parser.add_argument("--pieces", type=int, default=1000, help="tensors per bucket for pack/unpack")
    parser.add_argument("--reps", type=int, default=7)
    # One thread like the ringcc kernels. With 2 on a shared 2-core VM, torch's parallel
    # ops stalled ~16 ms whenever the other core was busy (seen in a first run).
    parser.add_argument("--torch-threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    info = ringcc.info()
    levels = [lvl for lvl in info["simd_compiled"] if lvl == "generic" or info["simd_best"] == lvl]
    print(f"ringcc {info['version']}, SIMD {info['simd_best']} (compiled: {', '.join(info['simd_compiled'])}), "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads, numpy {np.__version__}, "
          f"{platform.processor() or platform.machine()}")
    print("ringcc kernels run on one thread; GB/s counts bytes read + written.")
    for n in (int(v) for v in args.sizes.split(",")):
        rate, rows = bench_size(n, min(args.pieces, n), args.reps, levels)
        print(f"\n### {n} elements ({4 * n / 2 ** 20:.2f} MiB fp32); copy_ moves {rate / 1e9:.2f} GB/s\n")
        print("| kernel | time | GB/s moved | of copy_ rate | vs alternatives (their time, ringcc speedup) |")
        print("|---|---:|---:|---:|---|")
        for name, moved, t, alts in rows:
            vs = "; ".join(f"{k}: {ta * 1e3:.3f} ms, {ta / t:.2f}x" for k, ta in alts.items())
            print(f"| {name} | {t * 1e3:.3f} ms | {moved / t / 1e9:.2f} | {moved / t / rate:.0%} | {vs} |")


if __name__ == "__main__":
    main()
