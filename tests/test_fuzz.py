"""Hostile bytes: every length and count ringcc reads from a peer or from the store is
bounded before use.

- A short atheris run over every decoder (fuzz/fuzz_decoders.py, in a subprocess, so
  a crash fails the test with the input printed), skipped where atheris is missing.
- Hypothesis properties per decoder of ringcc._C._fuzz (the production functions):
  random bytes and mutated real messages are decoded or refused with a ringcc error,
  never anything else; valid messages round-trip.
- Regression tests for each bound, end to end where possible: a raw socket speaking
  the documented handshake (docs/architecture.md, "Authentication") then sending an
  oversized frame header to a real rank; a forged rendezvous record; a shared-memory
  segment and ring counters rewritten under a running communicator; parameter-server
  messages from unauthenticated peers and fake servers.
"""

from __future__ import annotations

import hmac
import importlib.util
import mmap
import os
import re
import secrets
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import ringcc
from ringcc import ps
from ringcc._native import _C
from conftest import MemoryStore, SharedStore
from ps_helpers import HDR, PS_MAGIC, PS_VERSION, close_all, make_clients, raw_reply, recv_exact, start_servers

F = _C._fuzz
WAIT = 60.0  # generous bound on any single wait (a hang detector); none should come near it
ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "fuzz" / "fuzz_decoders.py"


def _load_harness():
    spec = importlib.util.spec_from_file_location("fuzz_decoders", HARNESS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


fd = _load_harness()

# --------------------------------------------------------------------------- wire layouts
FRAME_MAGIC, FRAME_VERSION = 0x52434346, 2
DATA, ABORT, BYE = 1, 2, 3
FRAME_FIXED = "<IHBBIIQ"          # magic, version, type, abort kind, sender, reserved, payload bytes
OP_HEADER = "<QQQiBBBBB"          # seq, count, aux, root, collective, dtype, op, has_op, compression
SEGMENT_MAGIC = 0x52494E4743435348  # "RINGCCSH"
HELLO_MAGIC, CHALLENGE_MAGIC, PROOF_MAGIC = 0x52434348, 0x52434343, 0x52434350


def frame(ftype: int, sender: int, payload: int, *, kind: int = 0, op: bytes = b"") -> bytes:
    return (struct.pack(FRAME_FIXED, FRAME_MAGIC, FRAME_VERSION, ftype, kind, sender, 0, payload) + op).ljust(64, b"\0")


def op_header(seq=0, count=0, aux=0, root=-1, kind=10, dtype=5, op=0, has_op=0, compression=0) -> bytes:
    return struct.pack(OP_HEADER, seq, count, aux, root, kind, dtype, op, has_op, compression)


def ps_header(mtype, *, code=0, sender=0, dtype=2, wire=0, flags=0, key=0, numel=0, payload=0, round_=0, aux=0,
              version=PS_VERSION) -> bytes:
    return struct.pack(HDR, PS_MAGIC, version, mtype, code, sender, dtype, wire, flags, key, numel, payload, round_,
                       aux, 0)


def record(rank=1, host="h", tcp="127.0.0.1:1", shm="", pid=None, nonce="00000000000000ab", streams=1) -> bytes:
    pid = os.getpid() if pid is None else pid
    return f"v=2;rank={rank};host={host};tcp={tcp};shm={shm};pid={pid};nonce={nonce};streams={streams}".encode()


# --------------------------------------------------------------------------- the fuzzer itself


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> Path:
    """Seed inputs captured from real traffic (a TCP communicator, a parameter server)."""
    d = tmp_path_factory.mktemp("seeds")
    assert fd.make_corpus(str(d)) > 50
    return d


def test_short_atheris_run(tmp_path, seeds):
    """A few thousand fuzzed inputs over every decoder: no crash, no finding."""
    pytest.importorskip("atheris", reason="atheris is not installed (wheels: CPython 3.11-3.13, linux x86_64)")
    corpus, artifacts = tmp_path / "corpus", tmp_path / "artifacts"
    corpus.mkdir()
    artifacts.mkdir()
    for f in seeds.iterdir():
        (corpus / f.name).write_bytes(f.read_bytes())
    cmd = [sys.executable, str(HARNESS), "--runs", "4000", "--corpus", str(corpus), "--artifacts", str(artifacts),
           "--", "-seed=1"]
    # The timeout is a hang detector only: the run takes seconds.
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    found = sorted(artifacts.iterdir())
    report = "\n".join(f"{f.name}: {f.read_bytes().hex()}" for f in found)
    assert p.returncode == 0 and not found, f"fuzzer finding(s):\n{report}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    assert "Done 4000 runs" in p.stderr, p.stderr[-3000:]


def test_seed_inputs_are_real_messages_that_decode(seeds):
    """Every sub-target has seeds, the real messages among them are accepted by their
    decoder, and replaying the whole corpus finds nothing."""
    names = {f.name.rsplit("-", 1)[0][len("seed-"):] for f in seeds.iterdir()}
    assert names == set(fd.INDEX), names
    assert fd.replay([str(seeds)]) == 0
    for f in seeds.glob("seed-frame_header-*"):
        x = f.read_bytes()[1:]
        assert F.frame_header(x[1:], x[0])["sender"] == x[0]
    for f in seeds.glob("seed-record-*"):
        x = f.read_bytes()[1:]
        assert F.rendezvous_record(x[1:], x[0])["rank"] == x[0]
    for f in seeds.glob("seed-ps_reply-*"):
        x = f.read_bytes()[1:]
        F.ps_reply(x[68:], x[4:68], fd.le(x, 0, 4))


def test_replay_reports_a_finding(tmp_path):
    """Positive control for replay: a sub-target that raises something unexpected (here
    an IndexError, from a stand-in target) is reported as a finding."""
    bad = tmp_path / "bad"
    original = fd.TARGETS[fd.INDEX["ring_fill"]]
    fd.TARGETS[fd.INDEX["ring_fill"]] = ("ring_fill", lambda data: [][1])
    try:
        bad.write_bytes(bytes([fd.INDEX["ring_fill"]]) + bytes(24))
        assert fd.replay([str(bad)]) == 1
    finally:
        fd.TARGETS[fd.INDEX["ring_fill"]] = original


def test_fuzz_run_is_opt_in():
    p = subprocess.run([sys.executable, str(HARNESS)], capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "give --seconds or --runs" in p.stderr


# --------------------------------------------------------------------------- properties per decoder

PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("target", list(fd.INDEX))
@PROPS
@given(data=st.binary(max_size=400))
def test_random_bytes_are_decoded_or_refused(target, data):
    fd.TARGETS[fd.INDEX[target]][1](data)


@pytest.mark.parametrize("target", list(fd.INDEX))
@PROPS
@given(choice=st.data())
def test_mutated_real_messages_are_decoded_or_refused(seeds, target, choice):
    files = sorted(seeds.glob(f"seed-{target}-*"))
    seed = bytearray(files[choice.draw(st.integers(0, len(files) - 1))].read_bytes()[1:])
    for _ in range(choice.draw(st.integers(1, 6))):
        what = choice.draw(st.sampled_from(["byte", "word", "cut", "grow"]))
        if what == "byte" and seed:
            seed[choice.draw(st.integers(0, len(seed) - 1))] = choice.draw(st.integers(0, 255))
        elif what == "word" and len(seed) >= 8:
            at = choice.draw(st.integers(0, len(seed) - 8))
            seed[at:at + 8] = struct.pack("<Q", choice.draw(st.sampled_from(
                [0, 1, 2**31, 2**32 - 1, 2**48, 2**48 + 1, 2**63, 2**64 - 1, 2**64 - 8])))
        elif what == "cut":
            del seed[choice.draw(st.integers(0, len(seed))):]
        else:
            seed += choice.draw(st.binary(max_size=64))
    fd.TARGETS[fd.INDEX[target]][1](bytes(seed))


@PROPS
@given(ftype=st.sampled_from([DATA, ABORT, BYE]), sender=st.integers(0, 2**32 - 1), kind=st.integers(0, 4),
       payload=st.integers(0, 2**48), seq=st.integers(0, 2**64 - 1), count=st.integers(0, 2**64 - 1),
       collective=st.integers(0, 12), dtype=st.integers(0, 8), op=st.integers(0, 7), root=st.integers(-1, 2**31 - 1))
def test_valid_frame_headers_round_trip(ftype, sender, kind, payload, seq, count, collective, dtype, op, root):
    payload = {DATA: payload, ABORT: payload % 4097, BYE: 0}[ftype]
    h = F.frame_header(frame(ftype, sender, payload, kind=kind, op=op_header(seq, count, 0, root, collective, dtype,
                                                                              op, 1)), sender)
    assert (h["type"], h["sender"], h["payload_bytes"]) == (ftype, sender, payload)
    assert h["abort_kind"] == (kind if ftype == ABORT else h["abort_kind"])
    assert f"seq={seq}" in h["op"]


@PROPS
@given(kind=st.integers(0, 4), text=st.text(max_size=300))
def test_abort_frames_round_trip_with_printable_text(kind, text):
    raw = text.encode()[:4096]
    got = F.abort_frame(frame(ABORT, 3, len(raw), kind=kind) + raw + b"\0" * 7, 3)
    assert got == (kind, F.peer_text(raw))
    printable = all(c in "\n\t" or c >= " " and c != "\x7f" for c in text)
    if printable and len(text.encode()) <= 4096:
        assert got[1] == text
    # Incomplete: the text is still in flight.
    if raw:
        assert F.abort_frame(frame(ABORT, 3, len(raw), kind=kind) + raw[:-1], 3) is None


@PROPS
@given(data=st.binary(max_size=200))
def test_peer_text_is_always_valid_utf8_without_nul(data):
    text = F.peer_text(data)
    text.encode("utf-8")  # strict
    assert "\0" not in text
    if b"\\" not in data:  # every byte is kept or escaped, in order: undoing the escapes gives the input
        assert re.sub(rb"\\x([0-9a-f]{2})", lambda m: bytes([int(m.group(1), 16)]), text.encode()) == data


@PROPS
@given(rank=st.integers(0, 1000), host=st.text(st.characters(blacklist_characters=";=", blacklist_categories=("Cs",)),
                                               max_size=100),
       port=st.integers(1, 65535), pid=st.integers(1, 2**31 - 1), nonce=st.integers(1, 2**64 - 1),
       streams=st.integers(1, 64), shm=st.booleans())
def test_valid_records_round_trip(rank, host, port, pid, nonce, streams, shm):
    seg = f"/ringcc-{pid}-{nonce:x}-r{rank}" if shm else ""
    line = record(rank, host, f"10.1.2.3:{port}", seg, pid, f"{nonce:016x}", streams)
    p = F.rendezvous_record(line, rank)
    assert (p["rank"], p["host"], p["tcp"], p["shm"], p["pid"], p["nonce"], p["streams"]) == (
        rank, host.encode(), f"10.1.2.3:{port}", seg, pid, nonce, streams)


@PROPS
@given(host=st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
                      st.from_regex(r"[a-z][a-z0-9.-]{0,60}", fullmatch=True)),
       port=st.integers(1, 65535))
def test_addresses_round_trip(host, port):
    got_host, got_port = F.address(f"{host}:{port}".encode())
    assert (got_host.decode(), got_port) == (host.strip("[]"), port)


@PROPS
@given(world=st.integers(1, 64), rank=st.integers(0, 63), ring=st.integers(64, 1 << 24).map(lambda r: r * 64))
def test_valid_segment_headers_round_trip(world, rank, ring):
    assume(rank < world)
    control = F.shm_layout(4096)["ring_offset_1"] - 128 - 4096
    size = control + world * (128 + ring)
    head = struct.pack("<QIIiIQ", SEGMENT_MAGIC, world, rank, 1234, 0, ring)
    assert F.segment_header(head, size, rank, world) == ring
    with pytest.raises(ringcc.PeerError):
        F.segment_header(head, size + 64, rank, world)


@PROPS
@given(head=st.integers(0, 2**64 - 1), fill=st.integers(0, 2**32), cap=st.integers(4096, 2**32))
def test_ring_counters(head, fill, cap):
    tail = (head + fill) % 2**64
    if fill <= cap:
        assert F.ring_fill(head, tail, cap) == fill
    else:
        with pytest.raises(ringcc.PeerError, match="inconsistent ring counters"):
            F.ring_fill(head, tail, cap)


@PROPS
@given(key=st.integers(0, 2**64 - 1), numel=st.integers(1, 1 << 28), wire=st.integers(0, 2),
       pull=st.booleans(), shm=st.booleans())
def test_matching_ps_replies_are_accepted(key, numel, wire, pull, shm):
    req = ps_header(5 if pull else 4, key=key, numel=numel, wire=wire)
    wire = 0 if pull else wire
    nbytes = _C._compressed_bytes(numel) if wire else numel * 4
    region = nbytes if shm else 0
    rep = ps_header(17, key=key, numel=numel, wire=wire, payload=nbytes, flags=1 if shm else 0)
    d = F.ps_reply(rep, req, region)
    assert (d["key"], d["numel"], d["payload_bytes"]) == (key, numel, nbytes)
    with pytest.raises(ringcc.PeerError):  # one byte too many
        F.ps_reply(ps_header(17, key=key, numel=numel, wire=wire, payload=nbytes + 1), req, region)


# --------------------------------------------------------------------------- unit bounds


def test_decoder_bounds_by_example():
    with pytest.raises(ringcc.PeerError, match=r"announces 1152921504606846976 bytes \(at most 2\^48\)"):
        F.frame_header(frame(DATA, 1, 1 << 60), 1)
    with pytest.raises(ringcc.PeerError, match="abort frame announces 4097 bytes of text"):
        F.frame_header(frame(ABORT, 1, 4097), 1)
    with pytest.raises(ringcc.PeerError, match="goodbye frame with a payload"):
        F.frame_header(frame(BYE, 1, 8), 1)
    with pytest.raises(ringcc.PeerError, match="unknown collective code 200"):
        F.frame_header(frame(DATA, 1, 0, op=op_header(kind=200)), 1)
    with pytest.raises(ringcc.PeerError, match="claims to come from rank 2"):
        F.frame_header(frame(DATA, 2, 0), 1)
    assert F.frame_header(frame(ABORT, 1, 0, kind=77), 1)["abort_kind"] == 0  # unknown kind: generic
    assert F.abort_frame(frame(ABORT, 1, 1 << 40) + b"x" * 64, 1) is None
    assert F.peer_text(b"a\xffb\x00c\xe2\x82\xac\n") == "a\\xffb\\x00c\u20ac\n"
    for bad in (b"h:0", b"h:65536", b"h:-1", b"h:+80", b"h: 80", b":80", b"h:", b"h", b"[]:80", b"h:1" + b"0" * 10,
                b"x" * 300 + b":80"):
        with pytest.raises(ValueError):
            F.address(bad)
    assert F.address(b"h:1") == (b"h", 1) and F.address(b"[::1]:65535") == (b"::1", 65535)


# --------------------------------------------------------------------------- rendezvous records


RECORD_CASES = [
    (record(streams=1000), "streams is not a number in 1..64"),
    (record(streams=0), "streams is not a number in 1..64"),
    (record(pid=0), "pid is not a process id"),
    (record(pid=-5), "pid is not a process id"),
    (record(pid=2**40), "pid is not a process id"),
    (record(tcp="127.0.0.1:0"), "is not a number in 1..65535"),
    (record(tcp="127.0.0.1:99999"), "is not a number in 1..65535"),
    (record(nonce="xyz"), "nonce is not 1..16 hex digits"),
    (record(nonce="1" * 17), "nonce is not 1..16 hex digits"),
    (record(shm="/etc/passwd"), "shm is not a ringcc shared-memory segment name"),
    (record(host="h" * 1025), "host identity of 1025 bytes"),
    (record() + b";" + b"x=" + b"y" * 17000, "bytes, at most 16384"),
    (record().replace(b"rank=1", b"rank=\xff1"), "rank is not a rank number"),
    (record().replace(b";pid=", b";nopid="), "field 'pid' is missing"),
    (record() + b";pid=3", "field 'pid' appears twice"),
    (record().replace(b"nonce=", b"nonce"), "an item without '='"),
    (record().replace(b"v=2", b"v=9"), "not from a compatible ringcc version"),
]


@pytest.mark.parametrize("bad, why", RECORD_CASES, ids=[why for _, why in RECORD_CASES])
def test_forged_rendezvous_record_is_refused_by_name(bad, why):
    """Rank 1's record in the store is not something ringcc wrote: rank 0's constructor
    raises PeerError naming rank 1 and the field (before: 'stoi' ValueErrors, or values
    used unchecked)."""
    store = MemoryStore()
    name = "rec" + secrets.token_hex(4)
    store.set(f"ringcc/{name}/1/info/1", bad)
    with pytest.raises(ringcc.PeerError) as ei:
        ringcc.Communicator(store, 0, 2, name=name, transport="tcp", listen_address="127.0.0.1", timeout=WAIT)
    msg = str(ei.value)
    assert why in msg and "rank 1" in msg, msg


# --------------------------------------------------------------------------- a fake rank over TCP


def _mesh_proof(secret, role, dialler, acceptor, nonce_d, nonce_a, challenge_d, challenge_a):
    msg = (b"ringcc-mesh-auth-v1" + role + struct.pack("<IIIIIQQ", 2, 1, dialler, acceptor, 0, nonce_d, nonce_a)
           + challenge_d + challenge_a)
    return hmac.new(secret, msg, "sha256").digest()


class FakeRank1:
    """Rank 1 of a 2-rank TCP job, played by a raw socket: a real rank 0 (a thread)
    runs `body(comm)`; this side does the handshake with the job's secret and then
    sends whatever the test wants."""

    def __init__(self, body: Callable) -> None:
        self.store = SharedStore()
        self.name = "fake" + secrets.token_hex(4)
        self.nonce = secrets.randbits(63) | 1
        self.store.set(f"ringcc/{self.name}/1/info/1", record(nonce=f"{self.nonce:016x}"))
        self.result: list = [None]
        self.error: List[Optional[BaseException]] = [None]
        self.comm = None
        self.thread = threading.Thread(target=self._rank0, args=(body,), daemon=True)
        self.thread.start()
        line = self.store.wait_for(f"ringcc/{self.name}/1/info/0").decode()
        fields = dict(f.split("=", 1) for f in line.split(";"))
        secret = self.store.wait_for(f"ringcc/{self.name}/1/secret")
        host, port = fields["tcp"].rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=WAIT)
        mine = os.urandom(32)
        self.sock.sendall(struct.pack("<IHHIIII32s", HELLO_MAGIC, 3, 0, 1, 0, 2, 1, mine))
        magic, acceptor, theirs, proof_a = struct.unpack("<II32s32s", recv_exact(self.sock, 72))
        nonce_a = int(fields["nonce"], 16)
        assert (magic, acceptor) == (CHALLENGE_MAGIC, 0)
        assert proof_a == _mesh_proof(secret, b"A", 1, 0, self.nonce, nonce_a, mine, theirs)
        self.sock.sendall(struct.pack("<I32s", PROOF_MAGIC,
                                      _mesh_proof(secret, b"D", 1, 0, self.nonce, nonce_a, mine, theirs)))
        assert struct.unpack("<I", recv_exact(self.sock, 4))[0] == HELLO_MAGIC ^ 0

    def _rank0(self, body) -> None:
        try:
            self.comm = ringcc.Communicator(self.store, 0, 2, name=self.name, transport="tcp",
                                            listen_address="127.0.0.1", timeout=WAIT)
            self.result[0] = body(self.comm)
        except BaseException as e:  # noqa: BLE001 - checked by the test
            self.error[0] = e

    def read_frame(self) -> bytes:
        h = recv_exact(self.sock, 64)
        n = struct.unpack_from("<Q", h, 16)[0]
        return h + (recv_exact(self.sock, (n + 7) & ~7) if n else b"")

    def echo(self, f: bytes, **changes) -> None:
        """Sends rank 0's frame back as rank 1's (same operation header)."""
        h = bytearray(f[:64])
        struct.pack_into("<I", h, 8, 1)
        if "payload" in changes:
            struct.pack_into("<Q", h, 16, changes["payload"])
        self.sock.sendall(bytes(h))

    def join(self) -> Optional[BaseException]:
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "rank 0 hung"
        return self.error[0]

    def close(self) -> None:
        self.sock.close()
        if self.comm is not None:
            self.comm.close()


def _expect_abort_frame(fake: FakeRank1, kind: int) -> str:
    """Rank 0 tells rank 1 it aborted: an abort frame of `kind` whose text is returned."""
    while True:
        f = fake.read_frame()
        ftype, fkind = f[6], f[7]
        if ftype == ABORT:
            assert fkind == kind, f[:64].hex()
            return f[64:64 + struct.unpack_from("<Q", f, 16)[0]].decode()
        assert ftype == DATA, f[:64].hex()


def test_oversized_frame_header_during_setup_raises_peer_error_naming_the_peer():
    """Rank 1 answers the setup barrier with a header announcing 2^60 bytes: rank 0's
    constructor raises PeerError naming rank 1 at once (before: a MismatchError about
    sizes), sizing nothing from that length."""
    fake = FakeRank1(lambda comm: None)
    try:
        barrier = fake.read_frame()
        fake.echo(barrier, payload=1 << 60)
        err = fake.join()
        assert isinstance(err, ringcc.PeerError), repr(err)
        assert "received a malformed frame from rank 1" in str(err) and "at most 2^48" in str(err), str(err)
    finally:
        fake.close()


def test_oversized_frame_header_mid_operation_fails_the_call_and_rank_0_exits_cleanly():
    def body(comm):
        with pytest.raises(ringcc.PeerError, match=r"malformed frame from rank 1 during barrier\(seq=1\).*2\^48"):
            comm.barrier()
        with pytest.raises(ringcc.PeerError, match="aborted earlier"):  # later calls fail at once
            comm.allreduce(np.ones(4, np.float32))
        comm.close()
        return "closed"

    fake = FakeRank1(body)
    try:
        fake.echo(fake.read_frame())  # setup barrier: a correct answer
        fake.echo(fake.read_frame(), payload=(1 << 48) + 8)  # the user's barrier: oversized
        assert fake.join() is None
        assert fake.result[0] == "closed"
        # Rank 0 told its peer why it gave up (a PeerError, kind 2), then closed.
        assert "malformed frame from rank 1" in _expect_abort_frame(fake, kind=2)
    finally:
        fake.close()


@pytest.mark.parametrize("payload, text", [(1 << 40, b""), (4097, b"x" * 4097)], ids=["2^40", "4097"])
def test_oversized_abort_text_is_a_protocol_error(payload, text):
    """An abort frame announcing more than 4 KiB of text: PeerError naming rank 1
    (before: a bare ValueError 'oversized abort text', raised as ringcc.Error)."""
    fake = FakeRank1(lambda comm: None)
    try:
        fake.read_frame()
        fake.sock.sendall(frame(ABORT, 1, payload, kind=1) + text)
        err = fake.join()
        assert isinstance(err, ringcc.PeerError) and "rank 1" in str(err) and "abort frame announces" in str(err), err
    finally:
        fake.close()


def test_non_utf8_abort_text_keeps_the_error_type():
    """Rank 1 aborts with a TimeoutError whose text is not UTF-8: rank 0 raises
    ringcc.TimeoutError with the bytes escaped (before: the type was lost converting the
    message at the Python boundary)."""
    text = b"rank 1: timed out \xff\xfe\x00 waiting \xe2\x82"
    fake = FakeRank1(lambda comm: None)
    try:
        fake.read_frame()
        fake.sock.sendall(frame(ABORT, 1, len(text), kind=1) + text + b"\0" * ((8 - len(text) % 8) % 8))
        err = fake.join()
        assert type(err) is ringcc.TimeoutError, repr(err)
        assert "rank 1: timed out \\xff\\xfe\\x00 waiting \\xe2\\x82" in str(err), str(err)
    finally:
        fake.close()


def test_garbage_enum_in_a_data_frame_is_a_protocol_error():
    fake = FakeRank1(lambda comm: None)
    try:
        fake.read_frame()
        fake.sock.sendall(frame(DATA, 1, 0, op=op_header(kind=12, dtype=99)))
        err = fake.join()
        assert isinstance(err, ringcc.PeerError) and "unknown dtype code 99" in str(err), repr(err)
    finally:
        fake.close()


# --------------------------------------------------------------------------- shared memory


def _control_bytes() -> int:
    return F.shm_layout(4096)["ring_offset_1"] - 128 - 4096


def _write_segment(name: str, head: bytes, size: int) -> None:
    fd_ = os.open("/dev/shm" + name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd_, size)
        os.pwrite(fd_, head, 0)
    finally:
        os.close(fd_)


@pytest.mark.parametrize("change, why", [
    (dict(ring=(1 << 63) + 4096), "out of range"),  # control + 2*(128+ring) wraps to a plausible size
    (dict(ring=4096 + 8), "out of range"),
    (dict(ring=1 << 31), "out of range"),
    (dict(pid=0), "owner pid 0"),
    (dict(pid=-1), "owner pid -1"),
    (dict(magic=1), "bad magic"),
    (dict(rank=0), "segment of rank 0"),
    (dict(world=3), "3-rank communicator"),
    (dict(size=-64), "need"),
])
def test_forged_segment_is_refused_before_use(change, why):
    name = f"/ringcc-fuzztest-{os.getpid()}-{secrets.token_hex(4)}-r1"
    ring = change.get("ring", 4096)
    size = (_control_bytes() + 2 * (128 + ring)) % 2**64 + change.get("size", 0)
    head = struct.pack("<QIIiIQ", change.get("magic", SEGMENT_MAGIC), change.get("world", 2), change.get("rank", 1),
                       change.get("pid", os.getpid()), 0, ring)
    _write_segment(name, head, size)
    try:
        with pytest.raises(ringcc.PeerError, match=why):
            F.open_segment(name, 1, 2)
    finally:
        os.unlink("/dev/shm" + name)


def test_forged_segment_in_a_record_fails_the_constructor_by_name():
    """A same-host record naming a segment whose ring size makes the layout check wrap
    around 2^64: rank 0 raises PeerError naming the segment (before: the overflowing
    size matched and only the later ring-size comparison, a ValueError, stopped it)."""
    name = f"/ringcc-fuzztest-{os.getpid()}-{secrets.token_hex(4)}-r1"
    ring = (1 << 63) + 4096
    _write_segment(name, struct.pack("<QIIiIQ", SEGMENT_MAGIC, 2, 1, os.getpid(), 0, ring),
                   (_control_bytes() + 2 * (128 + ring)) % 2**64)
    try:
        store = MemoryStore()
        cname = "seg" + secrets.token_hex(4)
        store.set(f"ringcc/{cname}/1/info/1", record(host="fuzz-host", shm=name))
        with pytest.raises(ringcc.PeerError, match=f"segment {name} does not belong to rank 1.*out of range"):
            ringcc.Communicator(store, 0, 2, name=cname, host_id="fuzz-host", listen_address="127.0.0.1",
                                timeout=WAIT)
    finally:
        os.unlink("/dev/shm" + name)


class ShmPair:
    """Two ranks (threads) over shared memory with both segments also mapped by the
    test, which can then rewrite what a hostile peer could write."""

    RING = 1 << 16

    def __init__(self, body0: Callable, body1: Callable) -> None:
        self.store = SharedStore()
        self.name = "shm" + secrets.token_hex(4)
        self.gate = threading.Event()
        self.created = [threading.Event(), threading.Event()]
        self.errors: List[Optional[BaseException]] = [None, None]
        self.maps: List[mmap.mmap] = []
        pair = self

        class Gated:
            def set(self, key, value):
                pair.store.set(key, value)

            def get(self, key):
                if "/info/" in key:
                    assert pair.gate.wait(WAIT), "gate never opened"
                return pair.store.get(key)

        def rank(r, body):
            comm = None
            try:
                comm = ringcc.Communicator(Gated(), r, 2, name=self.name, transport="shm", timeout=WAIT,
                                           shm_ring_bytes=self.RING)
                self.created[r].set()
                body(comm)
            except BaseException as e:  # noqa: BLE001 - checked by the test
                self.errors[r] = e
            finally:
                self.created[r].set()
                if comm is not None:
                    comm.close()

        self.threads = [threading.Thread(target=rank, args=(r, b), daemon=True) for r, b in enumerate((body0, body1))]
        for t in self.threads:
            t.start()
        for r in range(2):  # map both segments before setup unlinks their names
            line = self.store.wait_for(f"ringcc/{self.name}/1/info/{r}").decode()
            seg = dict(f.split("=", 1) for f in line.split(";"))["shm"]
            fd_ = os.open("/dev/shm" + seg, os.O_RDWR)
            self.maps.append(mmap.mmap(fd_, os.fstat(fd_).st_size))
            os.close(fd_)
        self.gate.set()
        for e in self.created:
            assert e.wait(WAIT)
        self.layout = F.shm_layout(self.RING)

    def join(self) -> None:
        for t in self.threads:
            t.join(WAIT)
        assert not any(t.is_alive() for t in self.threads), "a rank hung"
        for m in self.maps:
            m.close()


def test_corrupt_ring_counter_from_the_peer_raises_peer_error_not_a_wild_copy():
    """Rank 1's produced-bytes counter in rank 0's inbox is set past the capacity while
    rank 0 waits to receive from it: rank 0 raises PeerError naming rank 1 (before: the
    counters were trusted, and a receive larger than the ring copied from beyond it),
    and rank 1's next call fails too."""
    go = threading.Event()
    seen: list = []

    def rank0(comm):
        go.wait(WAIT)
        with pytest.raises(ringcc.PeerError, match="the shared-memory ring from rank 1 is corrupt") as ei:
            comm.recv(np.empty(1 << 15, np.uint8), peer=1)
        seen.append(str(ei.value))

    def rank1(comm):
        assert done.wait(WAIT)
        with pytest.raises(ringcc.PeerError):  # rank 0 aborted (or the ring it writes to is bad)
            comm.barrier()

    done = threading.Event()
    pair = ShmPair(rank0, rank1)
    ring = pair.layout["ring_offset_1"]
    head = struct.unpack_from("<Q", pair.maps[0], ring + pair.layout["head_offset"])[0]
    struct.pack_into("<Q", pair.maps[0], ring + pair.layout["tail_offset"], head + ShmPair.RING + 4096)
    go.set()
    pair.threads[0].join(WAIT)
    done.set()
    pair.join()
    assert pair.errors == [None, None], pair.errors
    assert seen and "rank 1 wrote outside its own counter" in seen[0]


def test_corrupt_consumed_counter_makes_the_sender_fail_not_overwrite():
    """Rank 0's consumed-bytes counter (in its own segment, which rank 1 maps writable)
    is set ahead of the produced count: rank 1's send raises PeerError naming rank 0
    (before: it computed more free space than the ring has and wrote on)."""
    done, go = threading.Event(), threading.Event()

    def rank0(comm):
        assert done.wait(WAIT)

    def rank1(comm):
        assert go.wait(WAIT)
        with pytest.raises(ringcc.PeerError, match="the shared-memory ring to rank 0 is corrupt"):
            comm.send(np.ones(1 << 14, np.uint8), peer=0)

    pair = ShmPair(rank0, rank1)
    ring = pair.layout["ring_offset_1"]
    tail = struct.unpack_from("<Q", pair.maps[0], ring + pair.layout["tail_offset"])[0]
    struct.pack_into("<Q", pair.maps[0], ring + pair.layout["head_offset"], tail + 1)
    go.set()
    pair.threads[1].join(WAIT)
    done.set()
    pair.join()
    assert pair.errors == [None, None], pair.errors


def test_non_utf8_abort_reason_in_shared_memory_keeps_the_error_type():
    """Rank 1's control block says it aborted with a TimeoutError and a reason that is
    not UTF-8: rank 0 raises ringcc.TimeoutError with the bytes escaped."""
    done = threading.Event()
    seen: list = []

    def rank0(comm):
        with pytest.raises(ringcc.TimeoutError) as ei:
            comm.recv(np.empty(16, np.uint8), peer=1)
        seen.append(str(ei.value))

    def rank1(comm):
        assert done.wait(WAIT)

    pair = ShmPair(rank0, rank1)
    L, m = pair.layout, pair.maps[1]
    reason = b"rank 1 timed out \xff\xfe\xc3("
    m[L["reason_offset"]:L["reason_offset"] + len(reason) + 1] = reason + b"\0"
    struct.pack_into("<I", m, L["abort_kind_offset"], 1)
    struct.pack_into("<I", m, L["state_offset"], L["state_aborted"])
    pair.threads[0].join(WAIT)
    done.set()
    pair.join()
    assert pair.errors[0] is None, pair.errors
    assert seen and "rank 1 timed out \\xff\\xfe\\xc3(" in seen[0], seen


# --------------------------------------------------------------------------- parameter server


def _ps_round_works(store):
    clients = make_clients(store, 1, 1)
    try:
        clients[0].register("w", 8)
        g = np.arange(8, dtype=np.float32)
        clients[0].push_pull("w", g)
        np.testing.assert_array_equal(g, np.arange(8, dtype=np.float32))
        clients[0].shutdown()
    finally:
        for c in clients:
            c.close()


# A parameter server in a process of its own, so that a crash is this test's failure.
PS_SERVER = """
import torch.distributed as dist
from ringcc import ps
store = dist.HashStore()
server = ps.Server(store, 0, 1, 1, listen_host="127.0.0.1").start()
print(server.address, store.get("ps/secret").decode(), flush=True)
server.wait()
server.stop()
"""


@pytest.mark.parametrize("mtype, payload", [(1, 32), (9, 32), (2, 5)], ids=["HELLO", "AUTH", "REGISTER"])
def test_ps_unauthenticated_message_with_shm_flag_is_refused_and_the_server_keeps_serving(mtype, payload):
    """HELLO (or AUTH, REGISTER) claiming its payload is in shared memory, before any
    proof: ERROR kAuth and a closed connection, logged (before: the server copied the
    challenge out of an empty body and died of a segmentation fault). A real worker is
    then served and the server exits normally."""
    import torch.distributed as dist

    proc = subprocess.Popen([sys.executable, "-c", PS_SERVER], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        addr, token = proc.stdout.readline().split()
        host, port = addr.rsplit(":", 1)
        try:
            with socket.create_connection((host, int(port)), timeout=WAIT) as s:
                s.sendall(ps_header(mtype, numel=1, payload=payload, flags=1))
                rtype, code, body = raw_reply(s)
                assert s.recv(1) == b""  # closed
        except (ConnectionError, OSError) as e:
            proc.wait(WAIT)
            raise AssertionError(f"the server died (exit {proc.returncode}): {proc.stderr.read()[-2000:]}") from e
        assert (rtype, code) == (18, 4), (rtype, code, body)
        assert b"only INIT and PUSH_PULL payloads may travel in shared memory" in body
        store = dist.HashStore()
        store.set("ps/server/0", addr)
        client = ps.Client(store, 0, 1, 1, token=token, timeout=WAIT)
        g = np.arange(8, dtype=np.float32)
        client.register("w", 8)
        np.testing.assert_array_equal(client.push_pull("w", g.copy()), g)
        client.shutdown()
        client.close()
        assert proc.wait(WAIT) == 0, proc.stderr.read()[-2000:]
        assert "rejected a connection from 127.0.0.1:" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_ps_oversized_lengths_before_authentication_close_the_connection():
    store = MemoryStore()
    servers = start_servers(store, 1, 1)
    try:
        host, port = servers[0].address.rsplit(":", 1)
        for hdr in (ps_header(1, payload=1 << 60), ps_header(2, payload=1 << 40, numel=1 << 60),
                    ps_header(3, payload=2**64 - 1)):
            with socket.create_connection((host, int(port)), timeout=WAIT) as s:
                s.sendall(hdr)
                rtype, code, _ = raw_reply(s)
                assert (rtype, code) == (18, 4)
                assert s.recv(1) == b""
        _ps_round_works(store)
    finally:
        close_all(servers, [])


class FakePsServer:
    """Answers a client's HELLO with the given reply bytes."""

    def __init__(self, reply: bytes) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.reply = reply
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            recv_exact(conn, 64 + 32)  # HELLO and its challenge
            conn.sendall(self.reply)
            conn.recv(1)  # until the client hangs up

    def close(self) -> None:
        self.sock.close()
        self.thread.join(WAIT)


@pytest.mark.parametrize("reply, exc, match", [
    (ps_header(18, code=4, payload=1 << 40), ringcc.PeerError, r"error text of 1099511627776 bytes \(at most 4096\)"),
    (ps_header(18, code=4, payload=8, flags=1), ringcc.PeerError, "ERROR reply claims a shared-memory payload"),
    (ps_header(19, payload=1 << 50), ringcc.PeerError, "CHALLENGE of 1125899906842624 bytes"),
    (ps_header(17, payload=1 << 30, numel=1 << 28), ringcc.PeerError, "unexpected DATA reply"),
    (ps_header(18, code=6, payload=13) + b"late \xff\xfe\x00 done", ringcc.TimeoutError, r"late \\xff\\xfe\\x00 done"),
    (ps_header(18, code=1, payload=4) + b"\xc3(ab", ValueError, r"\\xc3\(ab"),
], ids=["error-text-2^40", "error-in-shm", "challenge-2^50", "data-to-hello", "non-utf8-timeout", "non-utf8-value"])
def test_ps_client_bounds_and_sanitises_server_replies(reply, exc, match):
    fake = FakePsServer(reply)
    try:
        with pytest.raises(exc, match=match) as ei:
            _C.PsClient(0, 1, "s" * 64, [fake.address], WAIT, "tcp")
        assert f"parameter server 0 at {fake.address}" in str(ei.value)
    finally:
        fake.close()
