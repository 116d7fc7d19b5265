"""Summarise a ringcc DDP timeline (RINGCC_TIMELINE) per step: how much of the bucket
exchanges' time (the union of their launch-to-completion intervals) fell inside backward."""
import json
import sys


def union(intervals):
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


ev = json.load(open(sys.argv[1]))["traceEvents"]
steps = sorted({e["args"]["step"] for e in ev if e.get("args", {}).get("step") is not None})
print("| step | buckets | launched before backward ended | backward (ms) | exchanges in flight (ms) | of which during backward |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
for st in steps:
    b = next(e for e in ev if e["name"] == "backward" and e["args"].get("step") == st)
    b0, b1 = b["ts"], b["ts"] + b["dur"]
    ar = [(e["ts"], e["ts"] + e["dur"]) for e in ev if e["name"] == "allreduce" and e["args"].get("step") == st]
    busy = union(ar)
    inside = union([(max(a, b0), min(c, b1)) for a, c in ar if min(c, b1) > max(a, b0)])
    print(f"| {st} | {len(ar)} | {sum(1 for a, _ in ar if a < b1)} | {b['dur']/1e3:.1f} | {busy/1e3:.1f} | "
          f"{inside/1e3:.1f} ({100*inside/busy:.0f}%) |")
