#!/usr/bin/env python3
"""Emulated multi-host runs on one machine (needs root): `ringcc bench`, and network faults.

Builds H "hosts" as network namespaces plugged into a bridge that lives in a namespace of
its own ("switch"), so no traffic touches the machine's real network. Every host link is
rate-limited in both directions with a token bucket (`tc tbf`). Everything it made
(namespaces, links, processes) is deleted on exit, also after a failure, Ctrl-C or
SIGTERM.

Bench (the default, --scenario bench). One torchrun agent per host starts the ranks
(`--nnodes H`, c10d rendezvous at host 0), and the bench measures ringcc and gloo side
by side. Each result is reported as a fraction of the link bound of a ring allreduce,

    t_bound = 2 (n - 1) / n * S / B      (n ranks on n hosts, S bytes, B link rate)

i.e. busbw / B. Before the job, the links are measured with plain TCP streams: one
alone, then every host sending to its right neighbour at once (a ring's traffic without
its data dependencies): what the emulated network itself delivers. After it, the report
lists each host's shaper and TCP counters (packets, drops, retransmissions).

The hosts' TCP congestion control is cubic (the kernel's default) unless
--congestion-control names another: the machine's own choice does not leak into the
emulated hosts. (Under bbr the veth links' microsecond round trips made plain streams
in the ring pattern fall to 85-98% of the rate here.)

    sudo python3 bench/emulate_hosts.py --hosts 4 --rate-gbit 2 --sizes 1M,16M,64M \\
        --out-md bench/results/emulated_4hosts_2gbit.md

Network faults (--scenario allreduce | ps-async). One rank per host runs
bench/fault_worker.py (a stream of exactly checked ringcc allreduces, or async
parameter-server training with the server and the store on host 0); each rank prints
its events (ready, step, error, done, exit) with CLOCK_MONOTONIC times, which every
namespace shares with the harness. Faults:

    --cut HOST --cut-at-step K   when HOST's rank reports step K, cut HOST off the switch:
                                 --cut-how drop (the port stops forwarding; links stay
                                 up) or down (the port goes down; the host loses carrier)
    --slow HOST                  --slow-rate-mbit R: HOST's link at R Mbit/s both ways;
                                 --sleep-s S [--sleep-every K]: HOST's rank computes
                                 (sleeps) S s before every K-th step
    --op-timeout T               the ringcc timeout of the ranks (communicator, server)

The fault is applied on an event the job printed, never after a guessed delay. The
summary has one line per rank (steps, steps after the cut, step times, the error and
how long after the cut it came, when it exited); --out-json writes the full report
(the plan, every rank's events, exit status and output, what was left behind).

    sudo python3 bench/emulate_hosts.py --scenario allreduce --hosts 4 --rate-gbit 1 \\
        --cut 2 --cut-at-step 20 --op-timeout 10
    sudo python3 bench/emulate_hosts.py --scenario ps-async --hosts 4 --cut 3 --cut-how down
    sudo python3 bench/emulate_hosts.py --scenario allreduce --hosts 4 --rate-gbit 1 --steps 4 \\
        --slow 2 --slow-rate-mbit 20 --sleep-s 4 --sleep-every 2

tests/test_network_faults.py runs these (the drop cut in the default suite, the others
with `pytest -m slow`); tests/test_emulation.py runs the bench (`pytest -m slow`).
This kernel has no netem, so a slow link is emulated by its rate, not by latency.

Exit status: 0 when the bench ran and verified every result (faults: when every rank
ended by itself and nothing was left behind, whatever the ranks reported), 77 when the
machine cannot host the emulation (not root, no iproute2, no network namespaces, no
bridge or tbf), 1 otherwise.
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
import threading
import time
from typing import Callable, List, Optional, Tuple

SKIP = 77  # "cannot run here" (as in automake), used by the opt-in test to skip
SUBNET = "10.77.0"
RDZV_PORT = 29400


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True)


def unavailable() -> Optional[str]:
    """Why this machine cannot run the emulation, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and tc)"
    for tool in ("ip", "tc", "bridge"):
        if shutil.which(tool) is None:
            return f"'{tool}' (iproute2) is not installed"
    probe = f"rccprobe{os.getpid()}"
    r = sh("ip", "netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    try:
        # Everything a topology and its faults use, once, inside the probe namespace
        # (a root container may lack the bridge or tbf in its kernel, say).
        for what, cmd in (("a bridge", ["ip", "link", "add", "rccbr", "type", "bridge"]),
                          ("a veth pair", ["ip", "link", "add", "rccva", "type", "veth", "peer", "name", "rccvb"]),
                          ("a bridge port", ["ip", "link", "set", "rccva", "master", "rccbr"]),
                          ("a link up", ["ip", "link", "set", "rccva", "up"]),
                          ("a bridge port state", ["bridge", "link", "set", "dev", "rccva", "state", "0"]),
                          ("a tc tbf qdisc", ["tc", "qdisc", "add", "dev", "rccva", "root", "tbf", "rate", "1gbit",
                                              "burst", "262144", "latency", "20ms"])):
            r = sh("ip", "netns", "exec", probe, *cmd, check=False)
            if r.returncode != 0:
                return f"cannot create {what} in a network namespace: {r.stderr.strip()}"
    finally:
        sh("ip", "netns", "del", probe, check=False)
    return None


class Topology:
    """H namespaces on one bridge, each link shaped to `rate_gbit` both ways."""

    def __init__(self, hosts: int, rate_gbit: float, burst_bytes: int, mtu: int = 9000,
                 congestion_control: Optional[str] = None):
        tag = f"rcc{os.getpid() % 100000}"
        self.switch = f"{tag}sw"
        self.hosts = [f"{tag}h{i}" for i in range(hosts)]
        self.rate_gbit = rate_gbit
        self.burst_bytes = burst_bytes
        self.mtu = mtu
        # None: whatever new namespaces inherit from the machine
        self.congestion_control = congestion_control
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
            if self.congestion_control:
                self._in(ns, "sysctl", "-q", "-w", f"net.ipv4.tcp_congestion_control={self.congestion_control}")
            self._in(self.switch, "ip", "link", "set", f"port{i}", "master", "br0")
            self._in(self.switch, "ip", "link", "set", f"port{i}", "up")
            # Host egress (eth0) and host ingress (the switch port's egress).
            for where, dev in ((ns, "eth0"), (self.switch, f"port{i}")):
                self._in(where, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
                         "burst", str(self.burst_bytes), "latency", "20ms")

    def down(self) -> None:
        # A process still inside would keep its namespace alive after `ip netns del`
        # (a torchrun agent's workers outlive the agent's SIGKILL, say): end them first.
        # Only this topology's namespaces are searched, so only what this run started.
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for ns in reversed(self.made):
            sh("ip", "netns", "del", ns, check=False)
        self.made.clear()

    def pids(self) -> List[int]:
        """Processes running inside this topology's namespaces."""
        found: List[int] = []
        for ns in self.made:
            found += [int(p) for p in sh("ip", "netns", "pids", ns, check=False).stdout.split()]
        return found

    def _netns_add(self, ns: str) -> None:
        sh("ip", "netns", "add", ns)
        self.made.append(ns)

    @staticmethod
    def _in(ns: str, *cmd: str) -> None:
        sh("ip", "netns", "exec", ns, *cmd)

    # ------------------------------------------------------------------ faults
    # Host i's link is the veth pair "eth0" (in the host) <-> "port<i>" (on the switch).
    # Faults act on the switch side, as a failing cable or switch port would: the
    # processes on the host see nothing but their traffic going unanswered.
    CUT_HOW = ("drop", "down")

    def cut(self, i: int, how: str = "drop") -> None:
        """Cut host i off the network, both directions, for every peer at once.

        "drop": the switch port stops forwarding (bridge port state "disabled"); the
        host's link stays up and every frame to or from it vanishes without a reply
        (a partition, a dead switch port). "down": the switch port is set down, so the
        host's eth0 also loses carrier (an unplugged cable). Neither sends a reset, so
        open TCP connections just stop moving."""
        if how == "drop":
            self._in(self.switch, "bridge", "link", "set", "dev", f"port{i}", "state", "0")
        elif how == "down":
            self._in(self.switch, "ip", "link", "set", f"port{i}", "down")
        else:
            raise ValueError(f"cut: how must be one of {self.CUT_HOW}, got {how!r}")

    def heal(self, i: int) -> None:
        """Undo cut(i): the switch port up and forwarding again. Address resolution that
        failed during the cut would refuse new connections ("no route to host") for a
        while, so every host forgets its failed neighbour entries."""
        self._in(self.switch, "ip", "link", "set", f"port{i}", "up")
        self._in(self.switch, "bridge", "link", "set", "dev", f"port{i}", "state", "3")
        for ns in self.hosts:
            self._in(ns, "ip", "neigh", "flush", "dev", "eth0")

    def shape(self, i: int, rate_gbit: Optional[float] = None) -> None:
        """Re-shape host i's link, both directions, to `rate_gbit` (default: the
        topology's rate). A slow link makes that host's transfers slow without losing
        anything. (This kernel has no netem, so delay is emulated by rate, not latency.)"""
        rate = f"{(rate_gbit if rate_gbit is not None else self.rate_gbit) * 1e6:.0f}kbit"
        for where, dev in ((self.hosts[i], "eth0"), (self.switch, f"port{i}")):
            self._in(where, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
                     "burst", str(self.burst_bytes), "latency", "20ms")

    # ------------------------------------------------------------------ statistics
    TCP_COUNTERS = ("TcpOutSegs", "TcpRetransSegs", "TcpExtTCPLostRetransmit", "TcpExtTCPTimeouts",
                    "TcpExtTCPFastRetrans", "TcpExtTCPSackRecovery", "TcpExtTCPSpuriousRTOs")

    def link_stats(self) -> List[dict]:
        """Per host, since the namespaces were made: what each shaper (host egress
        "eth0", host ingress "port<i>") sent, dropped and delayed, and the host's TCP
        segment and retransmission counters. A drop costs the ring a retransmission;
        "overlimits" counts packets the bucket made wait (the shaping itself)."""
        out = []
        for i, ns in enumerate(self.hosts):
            host = {"host": i}
            for key, where, dev in (("egress", ns, "eth0"), ("ingress", self.switch, f"port{i}")):
                q = sh("ip", "netns", "exec", where, "tc", "-s", "-j", "qdisc", "show", "dev", dev, check=False)
                try:
                    tbf = next(x for x in json.loads(q.stdout) if x.get("kind") == "tbf")
                    host[key] = {k: tbf.get(k) for k in ("bytes", "packets", "drops", "overlimits", "requeues")}
                except (ValueError, StopIteration):
                    host[key] = None
            counters = {}
            # -a absolute values, -s leave nstat's history file alone, -z keep zeros.
            for line in sh("ip", "netns", "exec", ns, "nstat", "-asz", check=False).stdout.splitlines():
                f = line.split()
                if len(f) >= 2 and f[0] in self.TCP_COUNTERS:
                    counters[f[0]] = int(f[1])
            host["tcp"] = counters
            out.append(host)
        return out

    def __enter__(self) -> "Topology":
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def left_behind(self) -> List[str]:
        """Namespaces of this topology that still exist (empty after down())."""
        out = sh("ip", "netns", "list", check=False).stdout
        present = {line.split()[0] for line in out.splitlines() if line.strip()}
        return sorted(present & set([self.switch, *self.hosts]))


def host_env(i: int, **extra: str) -> dict:
    """Environment of a process on emulated host i: ringcc and gloo use the host's eth0,
    and ranks on different hosts never take the shared-memory path (every namespace
    shares the machine's IPC namespace, so ringcc would otherwise detect one host)."""
    return dict(os.environ, RINGCC_HOST_ID=f"emulated-host-{i}", GLOO_SOCKET_IFNAME="eth0",
                RINGCC_SOCKET_IFNAME="eth0", OMP_NUM_THREADS="1", **extra)


class JobError(RuntimeError):
    pass


class _Proc:
    def __init__(self, host: int, popen: subprocess.Popen):
        self.host = host
        self.popen = popen
        self.lines: List[Tuple[float, str]] = []  # (CLOCK_MONOTONIC when read, line)
        self.t_exit: Optional[float] = None  # when its output ended and it was reaped
        self.killed = False
        self.reader: Optional[threading.Thread] = None


class Job:
    """Processes started in host namespaces, their output (stdout and stderr) read line
    by line as it comes, each line stamped with the time it was read. A caller waits for
    an event that a process printed (wait_for), never for a guessed time, and then acts
    (cut a link, say). stop() kills whatever is still running; use it in a finally."""

    def __init__(self, topo: Topology):
        self.topo = topo
        self.procs: List[_Proc] = []
        self._cond = threading.Condition()

    def start(self, host: int, argv: List[str], env: Optional[dict] = None) -> int:
        cmd = ["ip", "netns", "exec", self.topo.hosts[host], *argv]  # netns exec execs: the pid is argv's
        popen = subprocess.Popen(cmd, env=env if env is not None else host_env(host), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, errors="replace")
        proc = _Proc(host, popen)
        proc.reader = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.procs.append(proc)
        proc.reader.start()
        return len(self.procs) - 1

    def _read(self, proc: _Proc) -> None:
        for line in proc.popen.stdout:
            with self._cond:
                proc.lines.append((time.monotonic(), line.rstrip("\n")))
                self._cond.notify_all()
        proc.popen.wait()
        with self._cond:
            proc.t_exit = time.monotonic()
            self._cond.notify_all()

    def wait_for(self, index: int, match: Callable[[str], bool], timeout: float) -> str:
        """The first line of process `index` (already printed or still to come) for which
        match(line) is true. JobError if the process ends or `timeout` passes first."""
        proc = self.procs[index]
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for _, line in proc.lines[seen:]:
                    if match(line):
                        return line
                seen = len(proc.lines)
                if proc.t_exit is not None:
                    raise JobError(f"process {index} (host {proc.host}) exited with {proc.popen.returncode} "
                                   f"before the awaited event:\n{self.output(index)[-3000:]}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise JobError(f"process {index} (host {proc.host}) did not print the awaited event "
                                   f"within {timeout:.0f} s:\n{self.output(index)[-3000:]}")
                self._cond.wait(left)

    def wait_for_record(self, index: int, match: Callable[[dict], bool], timeout: float) -> dict:
        """Like wait_for, on the ``@rcc {json}`` event records of bench/fault_worker.py."""
        line = self.wait_for(index, lambda l: (r := parse_record(l)) is not None and match(r), timeout)
        return parse_record(line)

    def wait(self, timeout: float) -> bool:
        """Wait until every process has exited; False if `timeout` passed first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while any(p.t_exit is None for p in self.procs):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def stop(self) -> None:
        """Kill every process still running and reap it (idempotent)."""
        for proc in self.procs:
            if proc.popen.poll() is None:
                proc.killed = True
                proc.popen.kill()
        for proc in self.procs:
            proc.popen.wait()
            if proc.reader is not None:
                proc.reader.join(10)

    def output(self, index: int) -> str:
        return "\n".join(line for _, line in self.procs[index].lines)

    def records(self, index: int) -> List[dict]:
        return [r for r in (parse_record(line) for _, line in self.procs[index].lines) if r is not None]


def parse_record(line: str) -> Optional[dict]:
    """The event of a ``@rcc {json}`` line (bench/fault_worker.py), else None."""
    if not line.startswith("@rcc "):
        return None
    try:
        return json.loads(line[5:])
    except ValueError:
        return None


_SINK = """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 5301)); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); buf = bytearray(1 << 20)
while c.recv_into(buf):
    pass
"""
# Connects, says so, and sends for 2 s once a line arrives on stdin (the harness starts
# every stream of a measurement at once that way); prints Gbit/s.
_SOURCE = """
import socket, sys, time
c = socket.create_connection((sys.argv[1], 5301)); data = b"x" * (1 << 20); n = 0
print("connected", flush=True); sys.stdin.readline(); t0 = time.perf_counter()
while time.perf_counter() - t0 < 2.0:
    c.sendall(data); n += len(data)
c.shutdown(socket.SHUT_WR); c.recv(1); print(n * 8 / (time.perf_counter() - t0) / 1e9, flush=True)
"""


def measure_streams(topo: Topology, pairs: List[Tuple[int, int]]) -> List[float]:
    """Gbit/s of plain TCP streams (source host, sink host), all sending at once for 2 s
    through the shaped links: what the emulated network really delivers (token-bucket
    shaping and the hosts sharing the machine's CPUs lose a little)."""
    procs: List[subprocess.Popen] = []

    def start(host: int, code: str, *args: str) -> subprocess.Popen:
        p = subprocess.Popen(["ip", "netns", "exec", topo.hosts[host], sys.executable, "-c", code, *args],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(p)
        return p

    try:
        for sink in [start(dst, _SINK) for dst in sorted({d for _, d in pairs})]:
            sink.stdout.readline()  # "ready": listening
        sources = [start(src, _SOURCE, topo.ip_of(dst)) for src, dst in pairs]
        for p in sources:
            if p.stdout.readline().strip() != "connected":
                raise RuntimeError("measuring the links: a test stream could not connect")
        for p in sources:
            p.stdin.write("go\n")
            p.stdin.flush()
        return [float(p.communicate(timeout=60)[0].strip()) for p in sources]
    finally:
        for p in procs:
            p.kill()
            p.wait()


def measure_link(topo: Topology) -> Tuple[float, List[float]]:
    """One stream alone (host 1 -> host 0), then every host sending to its right
    neighbour at once: the traffic pattern of a ring, without its data dependencies."""
    n = len(topo.hosts)
    alone = measure_streams(topo, [(1, 0)])[0]
    ring = measure_streams(topo, [(i, (i + 1) % n) for i in range(n)]) if n > 2 else []
    return alone, ring


def run_job(topo: Topology, nproc_per_host: int, bench_args: List[str], json_path: str, timeout: float) -> str:
    """torchrun in every host namespace; returns the table printed by global rank 0."""
    job = Job(topo)
    try:
        for i in range(len(topo.hosts)):
            job.start(i, [sys.executable, "-m", "torch.distributed.run",
                          "--nnodes", str(len(topo.hosts)), "--nproc-per-node", str(nproc_per_host),
                          "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{topo.ip_of(0)}:{RDZV_PORT}",
                          "--rdzv-id", f"ringcc-emulation-{os.getpid()}", "--local-addr", topo.ip_of(i),
                          # torchrun decides who hosts the store by host name, which all namespaces share.
                          "--rdzv-conf", f"is_host={1 if i == 0 else 0}",
                          "-m", "ringcc", "bench", *bench_args, "--json", json_path, "--no-progress"])
        job.wait(timeout)
    finally:
        job.stop()
    outputs = [job.output(i) for i in range(len(job.procs))]
    failed = [(i, p.popen.returncode) for i, p in enumerate(job.procs) if p.popen.returncode != 0]
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


def stats_summary(stats: List[dict]) -> str:
    """One line per host from Topology.link_stats()."""
    lines = []
    for h in stats:
        tcp = h["tcp"]
        q = "; ".join(f"{k} {h[k]['packets']} packets, {h[k]['drops']} dropped" if h.get(k) else f"{k} unknown"
                      for k in ("egress", "ingress"))
        lines.append(f"host {h['host']}: {q}; TCP {tcp.get('TcpOutSegs', 0)} segments out, "
                     f"{tcp.get('TcpRetransSegs', 0)} retransmitted, {tcp.get('TcpExtTCPTimeouts', 0)} timeouts")
    return "\n".join(lines)


WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fault_worker.py")
WORKER_PORT = 29500  # rank 0's store (and gloo rendezvous) on host 0


def fault_plan_steps(a: argparse.Namespace) -> int:
    if a.steps is not None:
        return a.steps
    if a.scenario == "ps-async":
        return 300
    return 5000 if a.cut is not None else 20  # with a cut: more than the run can reach before it


def run_fault_job(topo: Topology, a: argparse.Namespace) -> dict:
    """One rank per host runs bench/fault_worker.py; the fault plan is applied when the
    victim reports the step it waits for. Returns the report (see main's --out-json)."""
    n = len(topo.hosts)
    steps = fault_plan_steps(a)
    report = dict(scenario=a.scenario, hosts=n, rate_gbit=a.rate_gbit, op_timeout_s=a.op_timeout, steps=steps,
                  namespaces=[topo.switch, *topo.hosts], fault=None, slow=None, failure=None, all_exited=False,
                  ranks=[])
    if a.slow is not None:
        if a.slow_rate_mbit:
            topo.shape(a.slow, a.slow_rate_mbit / 1000)
        report["slow"] = dict(host=a.slow, rate_mbit=a.slow_rate_mbit, sleep_s=a.sleep_s,
                              sleep_every=a.sleep_every)
    job = Job(topo)
    try:
        for i in range(n):
            argv = [sys.executable, WORKER, a.scenario, "--rank", str(i), "--world", str(n), "--master", topo.ip_of(0),
                    "--port", str(WORKER_PORT), "--steps", str(steps), "--elements", str(a.elements),
                    "--timeout", str(a.op_timeout)]
            if a.slow is not None and a.sleep_s:
                argv += ["--sleep-rank", str(a.slow), "--sleep-s", str(a.sleep_s),
                         "--sleep-every", str(a.sleep_every)]
            if a.cut is not None:
                argv += ["--lost-ranks", str(a.cut)]
            job.start(i, argv)
        deadline = time.monotonic() + a.timeout
        if a.cut is not None:
            job.wait_for_record(a.cut, lambda r: r["ev"] == "step" and r["step"] >= a.cut_at_step,
                                deadline - time.monotonic())
            t0 = time.monotonic()
            topo.cut(a.cut, a.cut_how)
            report["fault"] = dict(kind="cut", host=a.cut, how=a.cut_how, at_step=a.cut_at_step, t_start=t0,
                                   t_done=time.monotonic())
        report["all_exited"] = job.wait(max(0.0, deadline - time.monotonic()))
        if not report["all_exited"]:
            report["failure"] = f"processes still running after {a.timeout:.0f} s were killed"
    except JobError as exc:
        report["failure"] = str(exc)
    finally:
        job.stop()
        for i, proc in enumerate(job.procs):
            other = [line for _, line in proc.lines if not line.startswith("@rcc ")]
            report["ranks"].append(dict(rank=i, host=proc.host, pid=proc.popen.pid, exit=proc.popen.returncode,
                                        killed=proc.killed, t_exit=proc.t_exit, records=job.records(i),
                                        log_tail="\n".join(other)[-4000:]))
        # Whatever still runs on the emulated hosts after the job's own processes were
        # reaped (down() will end it, but it should not be there).
        report["processes_left"] = topo.pids()
        report["link_stats"] = topo.link_stats()
    return report


def fault_summary(report: dict) -> str:
    out = []
    f, slow = report["fault"], report["slow"]
    if f:
        out.append(f"cut host {f['host']} ({f['how']}) when it reported step {f['at_step']}; "
                   f"the cut took {f['t_done'] - f['t_start']:.3f} s")
    if slow:
        out.append(f"slow host {slow['host']}: link {slow['rate_mbit'] or report['rate_gbit'] * 1000:g} Mbit/s, "
                   f"sleeps {slow['sleep_s']:g} s before " + ("every step" if slow["sleep_every"] == 1 else
                                                          f"one step in {slow['sleep_every']}"))
    t_ref = f["t_start"] if f else None
    for r in report["ranks"]:
        steps = [e for e in r["records"] if e["ev"] == "step"]
        err = next((e for e in r["records"] if e["ev"] == "error"), None)
        done = next((e for e in r["records"] if e["ev"] == "done"), None)
        line = f"rank {r['rank']} (host {r['host']}): exit {r['exit']}{' (killed)' if r['killed'] else ''}, " \
               f"{len(steps)} steps"
        if t_ref is not None:
            line += f", {sum(e['t'] > t_ref for e in steps)} after the cut"
        dts = [e["dt"] for e in steps if "dt" in e]
        if dts:
            line += (" (" + " ".join(f"{dt:.2f}" for dt in dts) + " s)") if len(dts) <= 8 else \
                f" ({min(dts):.3f}-{max(dts):.3f} s each)"
        if done:
            line += ", done" + (f", final loss {done['final_loss']:.3g}" if "final_loss" in done else "")
        if err:
            when = f" {err['t'] - t_ref:.2f} s after the cut" if t_ref is not None else ""
            line += f", {err['type']}{when}: {err['message']}"
        if t_ref is not None and r["t_exit"] is not None:
            line += f"; exited {r['t_exit'] - t_ref:.2f} s after the cut"
        out.append(line)
    if report["failure"]:
        out.append(f"FAILED: {report['failure']}")
    return "\n".join(out)


def fault_main(a: argparse.Namespace) -> int:
    topo = Topology(a.hosts, a.rate_gbit, a.burst_bytes, a.mtu, a.congestion_control)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    report = None
    try:
        topo.up()
        report = run_fault_job(topo, a)
    except (subprocess.CalledProcessError, KeyboardInterrupt) as exc:
        detail = exc.stderr if isinstance(exc, subprocess.CalledProcessError) else "interrupted"
        print(f"emulate_hosts: {type(exc).__name__}: {detail}", file=sys.stderr)
    finally:
        topo.down()
    if report is None:
        return 1
    report["namespaces_left"] = topo.left_behind()
    print(fault_summary(report))
    print(stats_summary(report["link_stats"]))
    if a.out_json:
        with open(a.out_json, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    clean = not report["namespaces_left"] and not report["processes_left"]
    return 0 if report["all_exited"] and not report["failure"] and clean else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog="Arguments after -- go to `ringcc bench` unchanged.")
    ap.add_argument("--scenario", choices=["bench", "allreduce", "ps-async"], default="bench",
                    help="bench: `ringcc bench` under torchrun (default); allreduce / ps-async: the fault runs of "
                         "bench/fault_worker.py, one rank per host")
    ap.add_argument("--hosts", type=int, default=4)
    ap.add_argument("--nproc-per-host", type=int, default=1)
    ap.add_argument("--rate-gbit", type=float, default=2.0, help="link rate per host and direction")
    ap.add_argument("--burst-bytes", type=int, default=256 << 10,
                    help="token bucket depth (default 256 KiB, 1 ms at 2 Gbit/s: the smallest with which one TCP "
                         "stream gets ~98%% of the rate here; smaller buckets lose throughput to timer slack)")
    ap.add_argument("--mtu", type=int, default=9000, help="link MTU (default 9000, jumbo frames)")
    ap.add_argument("--congestion-control", metavar="ALG", default="cubic",
                    help="TCP congestion control of the emulated hosts (default cubic, the kernel's own default; "
                         "see /proc/sys/net/ipv4/tcp_available_congestion_control). With bbr, veth's microsecond "
                         "round trips made even plain TCP streams in a ring pattern lose 2-15%% of the rate here "
                         "(bench/results/emulated_4hosts_2gbit.md)")
    ap.add_argument("--sizes", default="1M,16M,64M")
    ap.add_argument("--iters", type=int, default=None,
                    help="timed calls per cell (default: ringcc bench's choice for about --target-seconds)")
    ap.add_argument("--target-seconds", type=float, default=1.0)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds for the whole job")
    ap.add_argument("--out-json", help="bench: write the rows (with fraction_of_link_bound) here; fault scenarios: "
                                       "the report (fault plan, every rank's events and exit, teardown)")
    ap.add_argument("--out-md", help="write a markdown report here")
    faults = ap.add_argument_group("fault scenarios (--scenario allreduce / ps-async)")
    faults.add_argument("--cut", type=int, metavar="HOST", help="cut this host off the network mid-run")
    faults.add_argument("--cut-how", choices=Topology.CUT_HOW, default="drop",
                        help="drop: the switch port stops forwarding, links stay up (default); "
                             "down: the switch port goes down (the host loses carrier)")
    faults.add_argument("--cut-at-step", type=int, default=20,
                        help="cut when the victim reports this many completed steps (default 20)")
    faults.add_argument("--slow", type=int, metavar="HOST", help="make this host (its link and/or its rank) slow")
    faults.add_argument("--slow-rate-mbit", type=float, default=0.0,
                        help="the slow host's link rate in Mbit/s, both directions (default: unchanged)")
    faults.add_argument("--sleep-s", type=float, default=0.0,
                        help="the slow host's rank computes this long (sleeps) before a step")
    faults.add_argument("--sleep-every", type=int, default=1, metavar="K",
                        help="... before steps 0, K, 2K, ... (default 1: every step)")
    faults.add_argument("--op-timeout", type=float, default=10.0,
                        help="ringcc timeout of the communicator / parameter server, seconds (default 10)")
    faults.add_argument("--steps", type=int, default=None,
                        help="steps per rank (default: allreduce 20, 5000 with --cut; ps-async 300)")
    faults.add_argument("--elements", type=int, default=1 << 18, help="float32 values per allreduce (default 256K)")
    ap.add_argument("bench_args", nargs="*", help="extra `ringcc bench` arguments (after --)")
    a = ap.parse_args()
    if a.hosts < 2:
        ap.error("--hosts must be >= 2")
    if a.scenario == "bench":
        if a.cut is not None or a.slow is not None:
            ap.error("--cut and --slow need --scenario allreduce or ps-async")
    else:
        for opt, host in (("--cut", a.cut), ("--slow", a.slow)):
            if host is not None and not 0 <= host < a.hosts:
                ap.error(f"{opt} {host}: hosts are 0..{a.hosts - 1}")
        if a.scenario == "ps-async" and a.cut == 0:
            ap.error("--cut 0: host 0 holds the store and the parameter server; cut a worker's host")
        if a.nproc_per_host != 1 or a.bench_args or a.out_md:
            ap.error("fault scenarios run one rank per host and take no bench arguments or --out-md")
    why = unavailable()
    if why:
        print(f"emulate_hosts: skipped: {why}", file=sys.stderr)
        return SKIP
    if a.scenario != "bench":
        return fault_main(a)
    return bench_main(a)


def bench_main(a: argparse.Namespace) -> int:
    topo = Topology(a.hosts, a.rate_gbit, a.burst_bytes, a.mtu, a.congestion_control)
    # SIGTERM (e.g. from a test's timeout) must still tear the namespaces down.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    bench_args = ["-c", "allreduce", "--sizes", a.sizes, "--warmup", "1", "--target-seconds", str(a.target_seconds),
                  *(["--iters", str(a.iters)] if a.iters else []), *a.bench_args]
    started = datetime.datetime.now(datetime.timezone.utc)
    with tempfile.TemporaryDirectory() as tmp:
        json_path = os.path.join(tmp, "rows.json")
        try:
            topo.up()
            alone, ring = measure_link(topo)
            cc = sh("ip", "netns", "exec", topo.hosts[0], "sysctl", "-n", "net.ipv4.tcp_congestion_control",
                    check=False).stdout.strip() or "unknown"
            table = run_job(topo, a.nproc_per_host, bench_args, json_path, a.timeout)
            stats = topo.link_stats()
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
              f"direction (tc tbf, burst {a.burst_bytes} B, MTU {a.mtu}, TCP {cc}), fraction of t = 2(n-1)/n * S / B")
    header += f"; one TCP stream alone measured {alone:.3f} Gbit/s ({alone / a.rate_gbit:.1%} of the rate)"
    if ring:
        header += (f"; {len(ring)} streams at once, each host to its right neighbour: "
                   f"{min(ring):.3f}-{max(ring):.3f} Gbit/s ({min(ring) / a.rate_gbit:.1%}-"
                   f"{max(ring) / a.rate_gbit:.1%})")
    print(table)
    print()
    print("# " + header)
    print(summary)
    print()
    print("# the links over the whole job (every backend's cells and warm-up)")
    print(stats_summary(stats))
    if a.out_json:
        with open(a.out_json, "w") as f:
            json.dump(rows, f, indent=1)
            f.write("\n")
    if a.out_md:
        cmd = "sudo python3 " + " ".join(shlex.quote(x) for x in sys.argv)
        with open(a.out_md, "w") as f:
            f.write(f"# ringcc vs gloo on emulated hosts\n\n- date (UTC): {started:%Y-%m-%d %H:%M}\n"
                    f"- setup: {header}\n- machine: {os.cpu_count()} CPUs (all hosts share them)\n"
                    f"- command: `{cmd}`\n\n```\n{summary}\n```\n\nThe links over the whole job:\n\n"
                    f"```\n{stats_summary(stats)}\n```\n\nFull bench output:\n\n```\n{table.strip()}\n```\n")
    return 1 if any(r.get("wrong") or r.get("time_us") is None for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
