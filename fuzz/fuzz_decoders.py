#!/usr/bin/env python3
"""Fuzz ringcc's decoders of received bytes with atheris (libFuzzer for Python).

Every decoder of something a peer or the rendezvous store hands ringcc is exposed, as
the production function itself, in the private module ringcc._C._fuzz. This harness
drives all of them: the first input byte picks a sub-target, the rest is its input
(a few parameter bytes, then the message). A decoder may accept its input (the harness
then checks the bounds the decoder promises) or raise ringcc.Error (PeerError, ...),
ValueError or TypeError. Anything else -- another exception, a failed bound, a crash, a
hang, memory past -rss_limit_mb -- is a finding, and libFuzzer writes the input to
crash-*/timeout-*/oom-* files.

    python3 fuzz/fuzz_decoders.py --seconds 300            # fixed time, fresh seeds
    python3 fuzz/fuzz_decoders.py --runs 5000 --corpus DIR # fixed number of inputs
    python3 fuzz/fuzz_decoders.py --make-corpus DIR        # seeds from real messages
    python3 fuzz/fuzz_decoders.py --replay DIR_OR_FILE ... # rerun saved inputs (no atheris needed)

--make-corpus captures real traffic: a 2-rank TCP communicator and a parameter server
with its client talk through a recording proxy on 127.0.0.1, and their rendezvous
records, shared-memory segment header and every frame, handshake message, request and
reply become seed inputs for the matching sub-target. Without --corpus a run seeds a
temporary corpus that way. Other libFuzzer flags go after `--`.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import struct
import sys
import tempfile
import threading
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import ringcc
from ringcc._native import _C

F = _C._fuzz
ALLOWED = (ringcc.Error, ValueError, TypeError)  # what a decoder may raise on bad input

FRAME = F.FRAME_HEADER_BYTES
PS_HDR = F.PS_HEADER_BYTES
MAX_KEY_ELEMENTS = 1 << 28  # ps_protocol.h kMaxKeyElements
MAX_DISCARD = MAX_KEY_ELEMENTS * 4 + 4096  # ps_protocol.h kMaxDiscardBytes: most a server reads of a refused body
PS_TYPES = {"HELLO": 1, "REGISTER": 2, "INIT": 3, "PUSH_PULL": 4, "PULL": 5, "SHUTDOWN": 6, "SHM_PROBE": 7,
            "SHM_ATTACH": 8, "AUTH": 9, "OK": 16, "DATA": 17, "ERROR": 18, "CHALLENGE": 19}


# The native decoders are not compiled for coverage; what the fuzzer learns from them is
# which check refused an input. Each distinct refusal (its type and text, with numbers
# and the echoed input left out) calls one of these functions, which are instrumented
# when fuzzing, so an input that gets past one more check counts as new coverage.
_BUCKETS = 1024
_OUTCOMES: List[Callable[[], None]] = [lambda: None] * _BUCKETS
_VARYING = re.compile(r"(?:'[^']*'|\\x[0-9a-f]{2}|0x[0-9a-f]+|\d+|[^\x00-\x7f])+")
_RECORD_ECHO = re.compile(r" \(record: .*|(?<=tcp endpoint: ).*|(?<=ringcc version: ).*", re.S)  # its bytes
_ADDRESS_ECHO = re.compile(r"'.*'", re.S)  # an address's own bytes (quotes inside too)


def refused(e: BaseException, echo: Optional[re.Pattern] = None) -> None:
    text = str(e)
    if echo is not None:
        text = echo.sub("", text)
    _OUTCOMES[zlib.crc32((type(e).__name__ + _VARYING.sub("#", text)).encode()) % _BUCKETS]()


def u8(data: bytes, i: int) -> int:
    return data[i] if i < len(data) else 0


def le(data: bytes, off: int, n: int) -> int:
    return int.from_bytes(data[off:off + n].ljust(n, b"\0"), "little")


# --------------------------------------------------------------------------- sub-targets
# Each takes the input after the selector byte. Seeds (make_corpus) use the same layouts.


def t_frame_header(data: bytes) -> None:
    """[sender] + 64-byte frame header (+ anything)."""
    sender, msg = u8(data, 0), data[1:]
    try:
        h = F.frame_header(msg, sender)
    except ALLOWED as e:
        return refused(e)
    assert h["sender"] == sender, h
    cap = {1: F.MAX_FRAME_PAYLOAD, 2: F.MAX_ABORT_TEXT, 3: 0}[h["type"]]
    assert h["payload_bytes"] <= cap, h
    assert 0 <= h["abort_kind"] <= 4, h


def t_abort_frame(data: bytes) -> None:
    """[sender] + bytes readable on an idle link (an abort frame is a header + text)."""
    sender, msg = u8(data, 0), data[1:]
    try:
        got = F.abort_frame(msg, sender)
    except ALLOWED as e:
        return refused(e)
    if got is not None:
        kind, text = got
        assert 0 <= kind <= 4 and len(text) <= 4 * F.MAX_ABORT_TEXT, got
        text.encode("utf-8")  # must be valid (strict) UTF-8


def t_peer_text(data: bytes) -> None:
    """Any bytes, as a peer's error text."""
    text = F.peer_text(data)
    assert "\0" not in text and len(text) <= 4 * len(data), text
    text.encode("utf-8")
    try:
        original = data.decode("utf-8")
    except UnicodeDecodeError:
        return
    if all(c in "\n\t" or (" " <= c and c != "\x7f") for c in original if c < "\x80"):
        assert text == original, (data, text)  # clean UTF-8 text passes unchanged


def t_record(data: bytes) -> None:
    """[expected rank] + a rendezvous record line."""
    rank, line = u8(data, 0), data[1:]
    try:
        p = F.rendezvous_record(line, rank)
    except ALLOWED as e:
        return refused(e, _RECORD_ECHO)
    assert len(line) <= F.MAX_RECORD_BYTES and p["rank"] == rank, p
    assert 1 <= p["streams"] <= 64 and p["pid"] >= 1 and len(p["host"]) <= 1024, p
    assert p["nonce"] < 1 << 64 and (p["shm"] == "" or p["shm"].startswith("/ringcc-")), p
    if p["tcp"]:
        _, port = F.address(p["tcp"].encode())
        assert 1 <= port <= 65535


def t_mesh_hello(data: bytes) -> None:
    """[size, rank, streams, tcp-mask] + the first bytes of a connection."""
    size = 1 + u8(data, 0) % 8
    rank = u8(data, 1) % size
    streams = 1 + u8(data, 2) % 4
    use_tcp = [bool(u8(data, 3) >> r & 1) for r in range(size)]
    try:
        got = F.mesh_hello(data[4:], rank, size, streams, use_tcp)
    except ALLOWED as e:
        return refused(e)
    if got is not None:
        frm, stream = got
        assert rank < frm < size and use_tcp[frm] and 0 <= stream < streams, (got, rank, size, streams)


def t_address(data: bytes) -> None:
    """A "host:port" string."""
    try:
        host, port = F.address(data)
    except ALLOWED as e:
        return refused(e, _ADDRESS_ECHO)
    assert 1 <= port <= 65535 and 0 < len(host) < len(data), (host, port)


def t_segment_header(data: bytes) -> None:
    """[world size, expected rank] + file size (u64) + the first 32 bytes of a control block."""
    world = 1 + u8(data, 0) % 16
    rank = u8(data, 1) % world
    file_size = le(data, 2, 8)
    try:
        ring = F.segment_header(data[10:], file_size, rank, world)
    except ALLOWED as e:
        return refused(e)
    assert 4096 <= ring <= 1 << 30 and ring % 64 == 0 and file_size < 1 << 40, (ring, file_size)


def t_ring_fill(data: bytes) -> None:
    """head, tail, capacity: three u64."""
    head, tail, cap = le(data, 0, 8), le(data, 8, 8), le(data, 16, 8)
    try:
        fill = F.ring_fill(head, tail, cap)
    except ALLOWED as e:
        return refused(e)
    assert fill <= cap and (head + fill) % (1 << 64) == tail, (head, tail, cap, fill)


def t_ps_header(data: bytes) -> None:
    """A 64-byte parameter-server header."""
    try:
        h = F.ps_header(data)
    except ALLOWED as e:
        return refused(e)
    assert h["type"] in PS_TYPES and h["flags"] in (0, 1), h


def t_ps_request(data: bytes) -> None:
    """[state bits] + region (u32) + the key's numel (u32) + request header + key name."""
    bits = u8(data, 0)
    region = le(data, 1, 4)
    numel = le(data, 5, 4) % (MAX_KEY_ELEMENTS + 1) or 1
    msg = data[9:]
    key = None
    if bits & 32 and len(msg) >= PS_HDR:
        key = (le(msg, 16, 8), msg[PS_HDR:PS_HDR + 256], numel)  # registered under the id the header names
    try:
        d = F.ps_request(msg, bool(bits & 1), bool(bits & 2), bool(bits & 4), bool(bits & 8), region,
                         bool(bits & 16), key)
    except ALLOWED as e:
        return refused(e)
    if not d["accepted"]:
        assert 0 <= d["error_code"] <= 7 and d["error"], d
        return
    t, n = d["type"], d["payload_bytes"]
    authed = bool(bits & 1)
    assert authed or t in ("HELLO", "AUTH"), d  # nothing else before the proof
    assert not d["flags"] or (t in ("INIT", "PUSH_PULL") and bits & 8 and n <= region), d
    bounds = {"HELLO": 32, "AUTH": 32, "REGISTER": 256, "SHM_PROBE": 1024, "SHM_ATTACH": 128, "PULL": 0,
              "SHUTDOWN": 0, "INIT": 4 * numel, "PUSH_PULL": 4 * numel}
    assert t in bounds, d  # a server accepts requests only
    assert n <= bounds[t] and n <= MAX_DISCARD, d


def t_ps_reply(data: bytes) -> None:
    """region (u32) + the request header + the reply header."""
    region = le(data, 0, 4)
    req, rep = data[4:4 + PS_HDR], data[4 + PS_HDR:]
    try:
        d = F.ps_reply(rep, req, region)
    except ALLOWED as e:
        return refused(e)
    n = d["payload_bytes"]
    if d["type"] == "ERROR":
        assert n <= F.MAX_ERROR_TEXT and not d["flags"], d
    else:
        assert n <= MAX_DISCARD and (not d["flags"] or n <= region), d


TARGETS: List[Tuple[str, Callable[[bytes], None]]] = [
    ("frame_header", t_frame_header),
    ("abort_frame", t_abort_frame),
    ("peer_text", t_peer_text),
    ("record", t_record),
    ("mesh_hello", t_mesh_hello),
    ("address", t_address),
    ("segment_header", t_segment_header),
    ("ring_fill", t_ring_fill),
    ("ps_header", t_ps_header),
    ("ps_request", t_ps_request),
    ("ps_reply", t_ps_reply),
]
INDEX = {name: i for i, (name, _) in enumerate(TARGETS)}


def test_one_input(data: bytes) -> None:
    if data:
        TARGETS[data[0] % len(TARGETS)][1](data[1:])


# --------------------------------------------------------------------------- seeds


class _Store:
    """set/get store shared by the seed jobs' threads."""

    def __init__(self) -> None:
        self._d: Dict[str, bytes] = {}
        self._lock = threading.Lock()

    def set(self, key, value) -> None:
        with self._lock:
            self._d[key] = value if isinstance(value, bytes) else str(value).encode()

    def get(self, key):
        with self._lock:
            return self._d.get(key)


class _Rewrite:
    """A view of a store whose values under keys ending in `suffix` are replaced."""

    def __init__(self, store: _Store, suffix: str, fn: Callable[[bytes], bytes]) -> None:
        self._store, self._suffix, self._fn = store, suffix, fn

    def set(self, key, value) -> None:
        self._store.set(key, value)

    def get(self, key):
        v = self._store.get(key)
        return self._fn(v) if v is not None and key.endswith(self._suffix) else v


class _Recorder:
    """A TCP proxy on 127.0.0.1 to `target` that records both directions of every
    connection: streams[i] = [client-to-server bytes, server-to-client bytes]."""

    def __init__(self, target: Tuple[str, int]) -> None:
        self.target = target
        self.streams: List[List[bytearray]] = []
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.address = "127.0.0.1:%d" % self._sock.getsockname()[1]
        self._threads: List[threading.Thread] = []
        self._conns: List[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                a, _ = self._sock.accept()
            except OSError:
                return
            b = socket.create_connection(self.target)
            self._conns += [a, b]
            rec = [bytearray(), bytearray()]
            self.streams.append(rec)
            for src, dst, buf in ((a, b, rec[0]), (b, a, rec[1])):
                t = threading.Thread(target=self._pump, args=(src, dst, buf), daemon=True)
                t.start()
                self._threads.append(t)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, buf: bytearray) -> None:
        while True:
            try:
                chunk = src.recv(1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            buf += chunk
            try:
                dst.sendall(chunk)
            except OSError:
                return

    def close(self) -> None:
        """Ends every relayed connection (the jobs are over; what they sent is recorded)."""
        self._sock.close()
        for c in self._conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(30)
        for c in self._conns:
            c.close()


def _split_frames(stream: bytes) -> List[bytes]:
    """Mesh data stream -> frames (header + padded payload)."""
    out, off = [], 0
    while off + FRAME <= len(stream):
        n = struct.unpack_from("<Q", stream, off + 16)[0]
        end = off + FRAME + ((n + 7) & ~7)
        out.append(bytes(stream[off:end]))
        off = end
    return out


def _split_ps(stream: bytes) -> List[bytes]:
    """Parameter-server stream -> messages (header + payload on the socket)."""
    out, off = [], 0
    while off + PS_HDR <= len(stream):
        n, flags = struct.unpack_from("<Q", stream, off + 32)[0], struct.unpack_from("<H", stream, off + 14)[0]
        end = off + PS_HDR + (0 if flags & 1 else n)
        out.append(bytes(stream[off:end]))
        off = end
    return out


def _mesh_seeds() -> Dict[str, List[bytes]]:
    """A 2-rank TCP job, rank 1 dialling rank 0 through a recorder."""
    import numpy as np

    store = _Store()
    name = "fuzzseed%d" % os.getpid()
    recorder: List[_Recorder] = []

    def to_proxy(value: bytes) -> bytes:
        fields = dict(f.split("=", 1) for f in value.decode().split(";") if "=" in f)
        if not recorder:
            host, port = fields["tcp"].rsplit(":", 1)
            recorder.append(_Recorder((host, int(port))))
        return value.replace(("tcp=" + fields["tcp"]).encode(), ("tcp=" + recorder[0].address).encode())

    records: List[bytes] = []
    errors: List[BaseException] = []

    def rank(r: int) -> None:
        view = store if r == 0 else _Rewrite(store, "/info/0", to_proxy)
        try:
            c = ringcc.Communicator(view, r, 2, name=name, transport="tcp", listen_address="127.0.0.1", timeout=60)
            x = np.arange(1000, dtype=np.float32)
            c.allreduce(x)
            c.allreduce(x, compression="fp16")
            c.allgather(np.arange(5, dtype=np.int64))
            c.broadcast(np.arange(7, dtype=np.float64), root=0)
            if r == 0:
                c.send(np.arange(3, dtype=np.int32), peer=1, tag=5)
            else:
                c.recv(np.empty(3, dtype=np.int32), peer=0, tag=5)
            c.barrier()
            if r == 1:
                c.abort("seed: rank 1 aborts on purpose \u2713")
            else:
                try:
                    c.barrier()
                except ringcc.Error:
                    pass
                c.close()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise RuntimeError(f"seed job failed: {errors[0]!r}")
    for key in sorted(k for k in store._d if "/info/" in k):
        records.append(store._d[key])
    rec = recorder[0]
    rec.close()
    seeds: Dict[str, List[bytes]] = {k: [] for k in INDEX}
    for r, line in enumerate(records):
        seeds["record"].append(bytes([r]) + line)
        fields = dict(f.split("=", 1) for f in line.decode().split(";") if "=" in f)
        seeds["address"].append(fields["tcp"].encode())
    for c2s, s2c in rec.streams:
        hello, c2s_frames = bytes(c2s[:F.MESH_HELLO_BYTES]), _split_frames(bytes(c2s[F.MESH_HELLO_BYTES + 36:]))
        seeds["mesh_hello"].append(bytes([1, 0, 0, 0b10]) + hello)  # size 2, rank 0, 1 stream, rank 1 over TCP
        for frames, sender in ((c2s_frames, 1), (_split_frames(bytes(s2c[72 + 4:])), 0)):
            for f in frames:
                seeds["frame_header"].append(bytes([sender]) + f)
                if f[6] == 2:  # abort frame
                    seeds["abort_frame"].append(bytes([sender]) + f)
                    seeds["peer_text"].append(f[FRAME:FRAME + struct.unpack_from("<Q", f, 16)[0]])
    return seeds


def _segment_seed() -> bytes:
    """The header of a real shared-memory segment (rank 0 of 2) and its size."""
    c = _C.Communicator(rank=0, size=2, transport="shm", listen_host="", shm_ring_bytes=1 << 16, tcp_streams=1,
                        tcp_stripe_bytes=1 << 18, timeout=5.0, spin_seconds=0.0, segment_bytes=1 << 18,
                        small_message_bytes=1 << 16, algorithm=_C.Algorithm.auto)
    name = dict(f.split("=", 1) for f in c.local_info().split(";"))["shm"]
    path = "/dev/shm" + name
    with open(path, "rb") as f:
        head = f.read(32)
    size = os.path.getsize(path)
    del c
    return bytes([1, 0]) + struct.pack("<Q", size) + head


def _ps_seeds() -> Dict[str, List[bytes]]:
    """A parameter server and one worker (sync, TCP payloads) through a recorder."""
    import numpy as np

    from ringcc import ps

    seeds: Dict[str, List[bytes]] = {k: [] for k in INDEX}
    for transport in ("tcp", "auto"):
        store = _Store()
        server = ps.Server(store, 0, 1, 1, listen_host="127.0.0.1", transport=transport).start()
        host, port = server.address.rsplit(":", 1)
        rec = _Recorder((host, int(port)))
        view = _Rewrite(store, "server/0", lambda v, a=rec.address: a.encode())
        client = ps.Client(view, 0, 1, 1, timeout=60, transport=transport, shard_elements=1000)
        g = np.arange(1500, dtype=np.float32)
        client.register("w", g.size)
        client.init("w", g)
        client.push_pull("w", g.copy())
        client.push_pull("w", g.copy(), compression="bf16")
        client.pull("w", np.empty_like(g))
        try:
            client.register("w", 7)  # refused: another numel (an ERROR reply)
        except ValueError:
            pass
        client.shutdown()
        client.close()
        server.wait(30)
        server.stop()
        rec.close()
        for c2s, s2c in rec.streams:
            requests, replies = _split_ps(bytes(c2s)), _split_ps(bytes(s2c))
            region = 0
            authed = 0
            for req, rep in zip(requests, replies):
                mtype = req[6]
                if mtype == PS_TYPES["SHM_ATTACH"]:
                    region = struct.unpack_from("<Q", req, 48)[0]
                seeds["ps_header"] += [req[:PS_HDR], rep[:PS_HDR]]
                state = authed | (2 if mtype == PS_TYPES["AUTH"] else 0) | (4 if mtype == PS_TYPES["SHM_ATTACH"] else 0)
                state |= (8 if region and mtype != PS_TYPES["SHM_ATTACH"] else 0) | 32
                numel = struct.unpack_from("<Q", req, 24)[0] or 1
                seeds["ps_request"].append(bytes([state]) + struct.pack("<II", region, numel) + req[:PS_HDR] +
                                           (req[PS_HDR:] if mtype == PS_TYPES["REGISTER"] else b"w#0"))
                seeds["ps_reply"].append(struct.pack("<I", region) + req[:PS_HDR] + rep[:PS_HDR])
                if rep[6] == PS_TYPES["ERROR"]:
                    seeds["peer_text"].append(rep[PS_HDR:])
                if mtype == PS_TYPES["AUTH"]:
                    authed = 1
    return seeds


def make_corpus(directory: str) -> int:
    """Writes seed inputs from real messages into `directory`; returns how many."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    seeds: Dict[str, List[bytes]] = {k: [] for k in INDEX}
    for part in (_mesh_seeds(), _ps_seeds()):
        for k, v in part.items():
            seeds[k] += v
    seeds["segment_header"].append(_segment_seed())
    seeds["address"] += [b"[::1]:29500", b"10.0.0.7:1", b"host:65535"]
    seeds["ring_fill"] += [struct.pack("<QQQ", 0, 0, 1 << 20), struct.pack("<QQQ", (1 << 64) - 8, 56, 4096)]
    seeds["peer_text"] += ["caf\u00e9 \u2713 \U0001f600\n\tend".encode(), b"\xff\xc0\xaf\xed\xa0\x80\xf4\x90\x80\x80"]
    n = 0
    for name, items in seeds.items():
        for i, item in enumerate(items):
            (out / f"seed-{name}-{i:03d}").write_bytes(bytes([INDEX[name]]) + item)
            n += 1
    return n


# --------------------------------------------------------------------------- running


def replay(paths: List[str]) -> int:
    """Runs every file (or every file in every directory) once; returns the number of
    findings (inputs whose sub-target raised something other than the allowed errors)."""
    files: List[Path] = []
    for p in map(Path, paths):
        files += sorted(x for x in p.iterdir() if x.is_file()) if p.is_dir() else [p]
    findings = 0
    for f in files:
        data = f.read_bytes()
        try:
            test_one_input(data)
        except BaseException as e:  # noqa: BLE001 - a finding, reported
            findings += 1
            target = TARGETS[data[0] % len(TARGETS)][0] if data else "-"
            print(f"FINDING {f} ({target}): {type(e).__name__}: {e}\n  input: {data.hex()}", flush=True)
    print(f"replayed {len(files)} input(s), {findings} finding(s)", flush=True)
    return findings


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: List[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, help="fuzz for this many seconds, then stop")
    ap.add_argument("--runs", type=int, help="fuzz this many inputs, then stop")
    ap.add_argument("--corpus", help="corpus directory (read and extended); default: fresh seeds in a temp dir")
    ap.add_argument("--artifacts", default=".", help="where crash-/timeout-/oom- inputs are written (default: .)")
    ap.add_argument("--rss-limit-mb", type=int, default=2048, help="memory above this is a finding (default 2048)")
    ap.add_argument("--make-corpus", metavar="DIR", help="write seeds from real messages to DIR and exit")
    ap.add_argument("--replay", nargs="+", metavar="PATH", help="run saved inputs once and exit")
    args = ap.parse_args(argv)
    if args.make_corpus:
        print(f"wrote {make_corpus(args.make_corpus)} seed input(s) to {args.make_corpus}")
        return 0
    if args.replay:
        return 1 if replay(args.replay) else 0
    if args.seconds is None and args.runs is None:
        ap.error("give --seconds or --runs (a fuzzing run is opt-in and bounded)")
    try:
        import atheris
    except ImportError:
        print("atheris is not installed (pip install atheris; wheels for CPython 3.11-3.13 on linux x86_64)",
              file=sys.stderr)
        return 2
    corpus = args.corpus
    if corpus is None:
        corpus = tempfile.mkdtemp(prefix="ringcc-fuzz-")
    if not any(Path(corpus).glob("*")):
        print(f"seeded {make_corpus(corpus)} input(s) into {corpus}", flush=True)
    lf = [sys.argv[0], corpus, f"-rss_limit_mb={args.rss_limit_mb}", "-timeout=10", "-print_final_stats=1",
          "-max_len=4096", "-use_value_profile=1", f"-artifact_prefix={os.path.join(args.artifacts, '')}"]
    if args.seconds is not None:
        lf.append(f"-max_total_time={args.seconds}")
    if args.runs is not None:
        lf.append(f"-runs={args.runs}")
    # Coverage comes from the harness's Python code: the sub-targets' branches on what
    # their decoder returned, the refusal reasons (see refused()), and, with value
    # profiling, the comparisons made there.
    global TARGETS
    TARGETS = [(name, atheris.instrument_func(fn)) for name, fn in TARGETS]
    for fn in (u8, le, refused, test_one_input):
        atheris.instrument_func(fn)
    _OUTCOMES[:] = [atheris.instrument_func(eval("lambda: None")) for _ in range(_BUCKETS)]  # distinct code objects
    atheris.Setup(lf + extra, test_one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
