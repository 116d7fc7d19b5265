#!/usr/bin/env python3
"""Emulated multi-host run of `ringcc bench` on one machine (needs root).

Builds H "hosts" as network namespaces plugged into a bridge that lives in a namespace of
its own ("switch"), so no traffic touches the machine's real network. Every host link is
rate-limited in both directions with a token bucket (`tc tbf`). One torchrun agent per
host starts the ranks (`--nnodes H`, c10d rendezvous at host 0), and the bench measures
ringcc and gloo side by side. Each result is reported as a fraction of the link bound of
a ring allreduce,

    t_bound = 2 (n - 1) / n * S / B      (n ranks on n hosts, S bytes, B link rate)

i.e. busbw / B. Everything it made is deleted on exit, also after a failure or Ctrl-C.

    sudo python3 bench/emulate_hosts.py --hosts 4 --rate-gbit 2 --sizes 1M,16M,64M \\
        --out-md bench/results/emulated_4hosts_2gbit.md

Exit status: 0 when the bench ran and verified every result, 77 when the machine cannot
host the emulation (not root, no `ip`/`tc`, no network namespaces), 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import List, Optional

SKIP = 77  # "cannot run here" (as in automake), used by the opt-in test to skip
SUBNET = "10.77.0"
RDZV_PORT = 29400


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True)


def unavailable() -> Optional[str]:
    """Why this machine cannot run the emulation, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"'{tool}' (iproute2) is not installed"
    probe = f"rccprobe{os.getpid()}"
    r = sh("ip", "netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    sh("ip", "netns", "del", probe, check=False)
    return None


class Topology:
    """H namespaces on one bridge, each link shaped to `rate_gbit` both ways."""

    def __init__(self, hosts: int, rate_gbit: float, burst_bytes: int, mtu: int = 9000):
        tag = f"rcc{os.getpid() % 100000}"
        self.switch = f"{tag}sw"
        self.hosts = [f"{tag}h{i}" for i in range(hosts)]
        self.rate_gbit = rate_gbit
        self.burst_bytes = burst_bytes
        self.mtu = mtu
        self.made: List[str] = []

    def ip_of(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def up(self) -> None:
        rate = f"{self.rate_gbit}gbit"
        self._netns_add(self.switch)
        self._in(self.switch, "ip", "link", "add", "br0", "type", "bridge")
        self._in(self.switch, "ip", "link", "set", "br0", "up")
        for i, ns in enumerate(self.hosts):
            self._netns_add(ns)
            # veth pair: "eth0" inside the host, "port<i>" on the switch's bridge.
            sh("ip", "link", "add", f"{ns}e", "netns", ns, "type", "veth", "peer", "name", f"port{i}",
               "netns", self.switch)
            self._in(ns, "ip", "link", "set", f"{ns}e", "name", "eth0", "mtu", str(self.mtu))
            self._in(self.switch, "ip", "link", "set", f"port{i}", "mtu", str(self.mtu))
            self._in(ns, "ip", "addr", "add", f"{self.ip_of(i)}/24", "dev", "eth0")
            self._in(ns, "ip", "link", "set", "eth0", "up")
            self._in(ns, "ip", "link", "set", "lo", "up")
            self._in(self.switch, "ip", "link", "set", f"port{i}", "master", "br0")
            self._in(self.switch, "ip", "link", "set", f"port{i}", "up")
            # Host egress (eth0) and host ingress (the switch port's egress).
            for where, dev in ((ns, "eth0"), (self.switch, f"port{i}")):
                self._in(where, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
                         "burst", str(self.burst_bytes), "latency", "20ms")

    def down(self) -> None:
        for ns in reversed(self.made):
            sh("ip", "netns", "del", ns, check=False)
        self.made.clear()

    def _netns_add(self, ns: str) -> None:
        sh("ip", "netns", "add", ns)
        self.made.append(ns)

    @staticmethod
    def _in(ns: str, *cmd: str) -> None:
        sh("ip", "netns", "exec", ns, *cmd)


_SINK = """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 5301)); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); buf = bytearray(1 << 20)
while c.recv_into(buf):
    pass
"""
_SOURCE = """
import socket, sys, time
c = socket.create_connection((sys.argv[1], 5301)); data = b"x" * (1 << 20); n = 0; t0 = time.perf_counter()
while time.perf_counter() - t0 < 2.0:
    c.sendall(data); n += len(data)
c.shutdown(socket.SHUT_WR); c.recv(1); print(n * 8 / (time.perf_counter() - t0) / 1e9)
"""


def measure_link(topo: Topology) -> float:
    """Gbit/s of one plain TCP stream from host 1 to host 0 through the shaped links:
    what the emulated link really delivers (token-bucket shaping loses a little)."""
    sink = subprocess.Popen(["ip", "netns", "exec", topo.hosts[0], sys.executable, "-c", _SINK],
                            stdout=subprocess.PIPE, text=True)
    try:
        sink.stdout.readline()  # "ready": listening
        out = subprocess.run(["ip", "netns", "exec", topo.hosts[1], sys.executable, "-c", _SOURCE, topo.ip_of(0)],
                             capture_output=True, text=True, timeout=60, check=True)
        return float(out.stdout.strip())
    finally:
        sink.kill()
        sink.wait()


def run_job(topo: Topology, nproc_per_host: int, bench_args: List[str], json_path: str, timeout: float) -> str:
    """torchrun in every host namespace; returns the table printed by global rank 0."""
    procs = []
    logs = []
    for i, ns in enumerate(topo.hosts):
        env = dict(os.environ, RINGCC_HOST_ID=f"emulated-host-{i}", GLOO_SOCKET_IFNAME="eth0",
                   RINGCC_SOCKET_IFNAME="eth0", OMP_NUM_THREADS="1")
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run",
               "--nnodes", str(len(topo.hosts)), "--nproc-per-node", str(nproc_per_host),
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{topo.ip_of(0)}:{RDZV_PORT}",
               "--rdzv-id", f"ringcc-emulation-{os.getpid()}", "--local-addr", topo.ip_of(i),
               # torchrun decides who hosts the store by host name, which all namespaces share.
               "--rdzv-conf", f"is_host={1 if i == 0 else 0}",
               "-m", "ringcc", "bench", *bench_args, "--json", json_path, "--no-progress"]
        log = tempfile.TemporaryFile(mode="w+")
        logs.append(log)
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0]
    if failed:
        detail = "\n".join(f"--- host {i} (exit {rc}):\n{outputs[i][-4000:]}" for i, rc in failed)
        raise RuntimeError(f"the emulated job failed:\n{detail}")
    return next((o for o in outputs if "# allreduce" in o or "# ringcc bench" in o), outputs[0])


def bound_table(rows: List[dict], rate_gbit: float) -> str:
    link = rate_gbit * 1e9 / 8  # bytes/s
    lines = [f"{'size':>10} {'backend':>8} {'placement':>12} {'time(us)':>11} {'busbw(GB/s)':>11} "
             f"{'bound(us)':>10} {'of bound':>8} {'#wrong':>6}"]
    for r in sorted(rows, key=lambda r: (r["collective"], r["size_bytes"], r["placement"], r["backend"])):
        if r.get("time_us") is None:
            lines.append(f"{r['size_bytes']:>10} {r['backend']:>8} {r['placement']:>12} failed: {r.get('error')}")
            continue
        n = r["nranks"]
        factor = 2 * (n - 1) / n if r["collective"] == "allreduce" else (n - 1) / n
        bound_us = factor * r["size_bytes"] / link * 1e6
        lines.append(f"{r['size_bytes']:>10} {r['backend']:>8} {r['placement']:>12} {r['time_us']:>11.0f} "
                     f"{r['busbw_GBps']:>11.4f} {bound_us:>10.0f} {bound_us / r['time_us']:>8.1%} {r['wrong']:>6}")
        r["fraction_of_link_bound"] = bound_us / r["time_us"]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog="Arguments after -- go to `ringcc bench` unchanged.")
    ap.add_argument("--hosts", type=int, default=4)
    ap.add_argument("--nproc-per-host", type=int, default=1)
    ap.add_argument("--rate-gbit", type=float, default=2.0, help="link rate per host and direction")
    ap.add_argument("--burst-bytes", type=int, default=256 << 10,
                    help="token bucket depth (default 256 KiB, 1 ms at 2 Gbit/s: the smallest with which one TCP "
                         "stream gets ~98%% of the rate here; smaller buckets lose throughput to timer slack)")
    ap.add_argument("--mtu", type=int, default=9000, help="link MTU (default 9000, jumbo frames)")
    ap.add_argument("--sizes", default="1M,16M,64M")
    ap.add_argument("--iters", type=int, default=None,
                    help="timed calls per cell (default: ringcc bench's choice for about --target-seconds)")
    ap.add_argument("--target-seconds", type=float, default=1.0)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds for the whole job")
    ap.add_argument("--out-json", help="write the rows (with fraction_of_link_bound) here")
    ap.add_argument("--out-md", help="write a markdown report here")
    ap.add_argument("bench_args", nargs="*", help="extra `ringcc bench` arguments (after --)")
    a = ap.parse_args()
    if a.hosts < 2:
        ap.error("--hosts must be >= 2")
    why = unavailable()
    if why:
        print(f"emulate_hosts: skipped: {why}", file=sys.stderr)
        return SKIP

    topo = Topology(a.hosts, a.rate_gbit, a.burst_bytes, a.mtu)
    # SIGTERM (e.g. from a test's timeout) must still tear the namespaces down.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    bench_args = ["-c", "allreduce", "--sizes", a.sizes, "--warmup", "1", "--target-seconds", str(a.target_seconds),
                  *(["--iters", str(a.iters)] if a.iters else []), *a.bench_args]
    started = datetime.datetime.now(datetime.timezone.utc)
    with tempfile.TemporaryDirectory() as tmp:
        json_path = os.path.join(tmp, "rows.json")
        try:
            topo.up()
            link_gbit = measure_link(topo)
            table = run_job(topo, a.nproc_per_host, bench_args, json_path, a.timeout)
        except (RuntimeError, subprocess.CalledProcessError, KeyboardInterrupt) as exc:
            detail = exc.stderr if isinstance(exc, subprocess.CalledProcessError) else str(exc)
            print(f"emulate_hosts: {type(exc).__name__}: {detail}", file=sys.stderr)
            return 1
        finally:
            topo.down()
        with open(json_path) as f:
            rows = json.load(f)
    summary = bound_table(rows, a.rate_gbit)
    header = (f"{a.hosts} emulated hosts x {a.nproc_per_host} rank(s), {a.rate_gbit:g} Gbit/s per link and "
              f"direction (tc tbf, burst {a.burst_bytes} B, MTU {a.mtu}), fraction of t = 2(n-1)/n * S / B")
    header += f"; one TCP stream measured {link_gbit:.3f} Gbit/s ({link_gbit / a.rate_gbit:.1%} of the rate)"
    print(table)
    print()
    print("# " + header)
    print(summary)
    if a.out_json:
        with open(a.out_json, "w") as f:
            json.dump(rows, f, indent=1)
            f.write("\n")
    if a.out_md:
        cmd = "sudo python3 " + " ".join(shlex.quote(x) for x in sys.argv)
        with open(a.out_md, "w") as f:
            f.write(f"# ringcc vs gloo on emulated hosts\n\n- date (UTC): {started:%Y-%m-%d %H:%M}\n"
                    f"- setup: {header}\n- machine: {os.cpu_count()} CPUs (all hosts share them)\n"
                    f"- command: `{cmd}`\n\n```\n{summary}\n```\n\nFull bench output:\n\n```\n{table.strip()}\n```\n")
    return 1 if any(r.get("wrong") or r.get("time_us") is None for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
