"""Bandwidth of the CUDA kernels (ringcc.kernels on GPU tensors), in one run, against the
device's own copy bandwidth and against the torch operation a user would write.

Each kernel moves a known number of bytes (read + written); its rate is compared with
a device-to-device `copy_` of the same fp32 buffer (the memory-bound ceiling, measured
here rather than taken from the data sheet) and with its torch counterpart:
reduce(sum) vs `add_`, compress vs `(x * s).half()`, decompress vs `.float()`,
pack vs `torch.cat`, unpack vs `torch._foreach_copy_`. The torch lines do less work
(no block scaling) but are the baseline to beat. Goal (issue 7): >= 90% of copy.

    python bench/cuda_kernels.py [--sizes 1M,16M,256M] [--reps 50] [--json PATH]

Needs a GPU and a ringcc build with CUDA kernels. Timing uses CUDA events around
--reps launches after a warm-up, so launch overhead counts only at small sizes.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import ringcc
from ringcc import kernels as K
from ringcc._native import _C


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def seconds_per_call(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def rows_for(nbytes: int, reps: int):
    n = nbytes // 4
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, device="cuda", generator=g)
    y = torch.randn(n, device="cuda", generator=g)
    out = torch.empty_like(x)
    wire = K.compress(x, "fp16")
    half = x.half()
    stream = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731
    pieces = [t.contiguous() for t in x.split(max(1, n // 1000))]
    targets = [torch.empty_like(t) for t in pieces]
    flat = torch.empty_like(x)
    f32 = _C.DataType.float32
    cases = [
        # name, bytes moved, ringcc call, torch call
        ("reduce sum fp32", 3 * nbytes,
         lambda: _C._cuda_reduce(out.data_ptr(), x.data_ptr(), y.data_ptr(), n, f32, _C.ReduceOp.sum, stream()),
         lambda: torch.add(x, y, out=out)),
        ("compress fp16", nbytes + wire.numel(), lambda: K.compress(x, "fp16", out=wire),
         lambda: torch.mul(x, 0.5).half()),
        ("decompress fp16", wire.numel() + nbytes, lambda: K.decompress(wire, n, "fp16", out=out),
         lambda: out.copy_(half)),
        ("decompress+add+compress fp16", 2 * wire.numel() + nbytes,
         lambda: K.decompress_add_compress(wire, y, "fp16", out=wire), None),
        ("error feedback fp16", 4 * nbytes, lambda: K.error_feedback(out, y, "fp16"), None),
        ("pack 1000 tensors", 2 * nbytes, lambda: K.pack(pieces, out=flat), lambda: torch.cat(pieces, out=flat)),
        ("unpack 1000 tensors", 2 * nbytes, lambda: K.unpack(flat, targets),
         lambda: torch._foreach_copy_(targets, list(flat.split([t.numel() for t in targets])))),
    ]
    copy_s = seconds_per_call(lambda: out.copy_(x), reps)
    copy_rate = 2 * nbytes / copy_s
    for name, moved, ours, theirs in cases:
        t = seconds_per_call(ours, reps)
        row = {"kernel": name, "size_bytes": nbytes, "time_us": t * 1e6, "GBps": moved / t / 1e9,
               "fraction_of_copy": moved / t / copy_rate, "copy_GBps": copy_rate / 1e9}
        if theirs is not None:
            row["torch_time_us"] = seconds_per_call(theirs, reps) * 1e6
            row["speedup_vs_torch"] = row["torch_time_us"] / row["time_us"]
        yield row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1M,16M,256M", help="fp32 buffer sizes in bytes (K/M/G suffixes)")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--json", help="write the rows here")
    a = p.parse_args(argv)
    if not (ringcc.info()["cuda"] and torch.cuda.is_available()):
        print("needs a GPU and a ringcc build with CUDA kernels", file=sys.stderr)
        return 2
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, ringcc {ringcc.__version__}")
    print("| kernel | size | time (us) | GB/s | of copy | torch (us) | speedup |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    for size in (parse_size(s) for s in a.sizes.split(",")):
        for r in rows_for(size, a.reps):
            rows.append(r)
            torch_cols = (f"{r['torch_time_us']:.1f} | {r['speedup_vs_torch']:.2f}x" if "torch_time_us" in r
                          else "- | -")
            print(f"| {r['kernel']} | {size >> 20} MiB | {r['time_us']:.1f} | {r['GBps']:.0f} | "
                  f"{r['fraction_of_copy']:.0%} | {torch_cols} |", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
