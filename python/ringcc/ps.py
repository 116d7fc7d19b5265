"""ringcc.ps: parameter servers for data-parallel training.

    server = ringcc.ps.Server(store, index=0, num_servers=1, num_workers=2).start()
    client = ringcc.ps.Client(store, rank, num_workers=2, num_servers=1)
    client.register("fc.weight", w.numel())
    client.push_pull("fc.weight", grad)      # in place: sync mode -> the average over workers

A named tensor is cut into shards of `shard_elements` float32 values (1M = 4 MB by
default); shard i of "name" is key "name#i", held by server
key_id("name#i") % num_servers (a blake2b digest), so every worker places it the same way without talking to the others.

Rendezvous goes through the job's store (any torch Store, or an object with set/get):
server i publishes its address under "ps/server/{i}", and clients wait for those keys,
so servers and workers may start in any order. Every connection proves, both ways, that
it knows the job secret under "ps/secret" (an HMAC over fresh challenges; the secret never
crosses the socket); whoever needs it first creates it (see _store.job_secret).

A worker on the same host as a server (equal host ids, as the collectives decide it;
RINGCC_HOST_ID overrides) moves payloads through a per-connection shared-memory object
and only the 64-byte headers over TCP; transport="tcp" (or RINGCC_PS_TRANSPORT=tcp) on
either side keeps everything on TCP.
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import json
import os
import sys
import time
import weakref
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from . import _files
from ._buffers import as_buffer
from ._native import _C
from ._store import StoreClient, job_secret
from .comm import _env_float, _listen_address, _seconds

SHARD_ELEMENTS = 1 << 20  # float32 values per key: 4 MB
DEFAULT_PREFIX = "ps/"

StaleError = _C.StaleError
_MODES = {"sync": _C.PsMode.sync, "async": _C.PsMode.async_}
_WIRES = {None: _C.Compression.none, "none": _C.Compression.none, "fp16": _C.Compression.fp16,
          "bf16": _C.Compression.bf16}

_live_clients: "weakref.WeakSet[Client]" = weakref.WeakSet()


def _transport(transport: Optional[str]) -> str:
    t = transport or os.environ.get("RINGCC_PS_TRANSPORT", "auto")
    if t not in ("auto", "tcp"):
        raise ValueError(f"ps: transport must be 'auto' or 'tcp', got {t!r}")
    return t


@atexit.register
def _close_all() -> None:
    for c in list(_live_clients):
        c.close()


def _job_token(store: Any, prefix: str, timeout: float) -> str:
    """The job secret of the servers under `prefix` (key "{prefix}secret"), created by
    the first party (server or worker) that needs it; see _store.job_secret."""
    return job_secret(store, prefix + "secret", timeout)


def shard_name(name: str, shard: int) -> str:
    return f"{name}#{shard}"


def server_of(name: str, shard: int, num_servers: int) -> int:
    """Stable placement: the same on every worker, run and Python process (not hash()).
    The key id (blake2b) modulo the server count: crc32's low bits cluster consecutive
    shard names ("w#0".."w#3" all on one of 2 servers), a cryptographic digest does not."""
    return key_id(name, shard) % num_servers


def key_id(name: str, shard: int) -> int:
    """64-bit key id of a shard (collisions between names are vanishingly unlikely)."""
    return _id_of(shard_name(name, shard).encode())


def _id_of(full: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(full, digest_size=8).digest(), "little")


# ---------------------------------------------------------------------- checkpoints
CHECKPOINT_FORMAT = "ringcc-ps-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A parameter-server checkpoint that cannot be restored here (unreadable, another
    format version, or written for a different shard layout or mode)."""


def read_checkpoint(path: str) -> Tuple[Dict[str, Any], list]:
    """(metadata, [(id, name bytes, numel, version, values, momentum or None)]) of a
    checkpoint file, checked for internal consistency. NumPy's npz with pickling off:
    JSON metadata and float32 arrays only."""
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"ps checkpoint {path!r} is not readable: {exc}") from exc
    with z:
        try:
            meta = json.loads(bytes(z["meta"]).decode())
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"ps checkpoint {path!r} has no valid metadata: {exc}") from exc
        if meta.get("format") != CHECKPOINT_FORMAT or meta.get("version") != CHECKPOINT_VERSION:
            raise CheckpointError(f"ps checkpoint {path!r}: format {meta.get('format')!r} version "
                                  f"{meta.get('version')!r}; this ringcc reads {CHECKPOINT_FORMAT!r} version "
                                  f"{CHECKPOINT_VERSION}")
        entries = []
        for j, k in enumerate(meta["keys"]):
            name = k["name"].encode("utf-8", "surrogateescape")
            numel, version = int(k["numel"]), int(k["version"])
            arrays = [z[f"values_{j}"], z[f"momentum_{j}"] if k["momentum"] else None]
            for a in arrays:
                if a is not None and (a.dtype != np.float32 or a.shape != (numel,)):
                    raise CheckpointError(f"ps checkpoint {path!r}: key {k['name']!r} has an array of "
                                          f"{a.dtype} {a.shape}, expected float32 ({numel},)")
            if k["dtype"] != "float32" or version < 0:
                raise CheckpointError(f"ps checkpoint {path!r}: key {k['name']!r}: bad dtype or version")
            entries.append((int(k["id"]), name, numel, version, arrays[0], arrays[1]))
    return meta, entries


class Server:
    """Parameter server `index` of `num_servers`, serving `num_workers` workers.

    mode="sync": every push of a round waits until all workers pushed that key; each
    gets the fp32 average (the result of an allreduce avg), encoded in its own push's
    wire format. mode="async": the server holds the parameters (set by Client.init, zero
    until then) and applies SGD (lr, momentum, weight_decay, torch.optim.SGD's update)
    to each push as it arrives, replying with the fresh parameters; a push computed from
    a version more than `staleness` updates old is refused with ringcc.ps.StaleError.
    `timeout`: how long a started sync round waits for the missing workers before every
    waiter gets a TimeoutError naming them. Every connection must prove it knows the
    job secret (see Client) within `handshake_timeout` seconds (default
    RINGCC_HANDSHAKE_TIMEOUT or 10); others get an ERROR, are logged on stderr and
    closed while the server goes on. `listen_host`: the numeric IP to listen on (default
    as the Communicator: RINGCC_LISTEN_HOST, RINGCC_SOCKET_IFNAME, ...). `transport`:
    "auto" (default, or RINGCC_PS_TRANSPORT) lets workers on this host (`host_id`, default RINGCC_HOST_ID or
    detected) send payloads through shared memory; "tcp" refuses that.

    save(path) checkpoints every key (values, versions, async momentum) atomically;
    `restore=path` starts from such a file instead of an empty table. It is refused
    (CheckpointError) unless it was written by server `index` of `num_servers` in the
    same mode, and, when `keys` ({name: numel} as the workers register them, with
    their `shard_elements`) is given, unless it holds exactly this server's shards of
    them. A restored server refuses REGISTER of keys not in the checkpoint."""

    def __init__(self, store: Any, index: int, num_servers: int, num_workers: int, mode: str = "sync", *,
                 lr: float = 0.01, momentum: float = 0.0, weight_decay: float = 0.0, staleness: int = 0,
                 listen_host: Optional[str] = None, timeout: float = 300.0, prefix: str = DEFAULT_PREFIX,
                 restore: Optional[str] = None, keys: Optional[Mapping[str, int]] = None,
                 shard_elements: int = SHARD_ELEMENTS, transport: Optional[str] = None,
                 host_id: Optional[str] = None, handshake_timeout: Optional[float] = None):
        if not isinstance(num_servers, int) or num_servers < 1:
            raise ValueError(f"num_servers must be a positive int, got {num_servers!r}")
        if not isinstance(index, int) or not 0 <= index < num_servers:
            raise ValueError(f"index must be in [0, {num_servers}), got {index!r}")
        if not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers must be a positive int, got {num_workers!r}")
        if mode not in _MODES:
            raise ValueError(f"mode must be 'sync' or 'async', got {mode!r}")
        if not isinstance(staleness, int) or staleness < 0:
            raise ValueError(f"staleness must be a non-negative int, got {staleness!r}")
        self.store = store
        self.index = index
        self.num_servers = num_servers
        self.num_workers = num_workers
        self.mode = mode
        self.timeout = _seconds(timeout, "timeout")
        self._prefix = prefix
        self._listen_host = listen_host
        self._opts = dict(lr=float(lr), momentum=float(momentum), weight_decay=float(weight_decay),
                          staleness=staleness)
        self._link = dict(transport=_transport(transport), host_id=host_id or os.environ.get("RINGCC_HOST_ID", ""),
                          handshake_timeout=_seconds(handshake_timeout if handshake_timeout is not None else
                                                     _env_float("RINGCC_HANDSHAKE_TIMEOUT", 10.0),
                                                     "handshake_timeout"))
        self._native = None
        self._restored = None
        if restore is not None:
            self._restored = self._check_checkpoint(restore, keys, shard_elements)
        elif keys is not None:
            raise ValueError("keys= only checks a checkpoint; pass restore= as well")

    def _check_checkpoint(self, path: str, keys: Optional[Mapping[str, int]], shard_elements: int) -> list:
        meta, entries = read_checkpoint(path)
        where = f"ps checkpoint {path!r}"
        if (meta["index"], meta["num_servers"]) != (self.index, self.num_servers):
            raise CheckpointError(f"{where} was written by server {meta['index']} of {meta['num_servers']}; "
                                  f"this is server {self.index} of {self.num_servers} (shard layout differs)")
        if meta["mode"] != self.mode:
            raise CheckpointError(f"{where} holds {meta['mode']} state; this server runs in {self.mode} mode")
        for kid, name, _, _, _, _ in entries:
            if _id_of(name) != kid or kid % self.num_servers != self.index:
                raise CheckpointError(f"{where}: key {name!r} (id {kid}) does not belong on server {self.index} "
                                      f"of {self.num_servers}")
        if keys is not None:
            want = {}
            for tensor, numel in keys.items():
                for i, off in enumerate(range(0, numel, shard_elements)):
                    if server_of(tensor, i, self.num_servers) == self.index:
                        want[shard_name(tensor, i)] = min(shard_elements, numel - off)
            have = {name.decode("utf-8", "surrogateescape"): numel for _, name, numel, _, _, _ in entries}
            if want != have:
                missing = sorted(set(want) - set(have))
                extra = sorted(set(have) - set(want))
                resized = sorted(n for n in set(want) & set(have) if want[n] != have[n])
                raise CheckpointError(f"{where} does not hold this server's shards of the given keys: missing "
                                      f"{missing[:5]}, unexpected {extra[:5]}, different numel {resized[:5]}")
        return entries

    def save(self, path: str) -> str:
        """Checkpoint every key at one instant between requests (the server loop takes the
        copy), written atomically to `path`: it is always the old file or the whole new
        one. An open sync round is not saved; its workers retry it. Returns path."""
        if self._native is None:
            raise RuntimeError("the server is not started")
        entries = self._native.snapshot()
        meta = dict(format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION, index=self.index,
                    num_servers=self.num_servers, num_workers=self.num_workers, mode=self.mode,
                    optimizer=self._opts, saved_at=time.time(), keys=[])
        arrays = {}
        for j, (kid, name, numel, version, values, mom) in enumerate(entries):
            meta["keys"].append(dict(id=kid, name=name.decode("utf-8", "surrogateescape"), numel=numel,
                                     dtype="float32", version=version, momentum=mom is not None))
            arrays[f"values_{j}"] = values
            if mom is not None:
                arrays[f"momentum_{j}"] = mom
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        _files.atomic_write(path, lambda f: np.savez(f, **arrays))
        return os.fspath(path)

    def start(self) -> "Server":
        if self._native is not None:
            raise RuntimeError("Server.start() called twice")
        host = self._listen_host if self._listen_host is not None else _listen_address(self.store, None)
        secret = _job_token(self.store, self._prefix, self.timeout)
        native = _C.PsServer(host, self.num_workers, _MODES[self.mode], secret, self.timeout, **self._opts,
                             **self._link)
        if self._restored is not None:
            native.restore(self._restored)
            self._restored = None  # the native server has its own copy
        native.start()
        self._native = native
        # Published last: a client that reads the address finds a server listening.
        self.store.set(f"{self._prefix}server/{self.index}", native.address.encode())
        return self

    @property
    def address(self) -> str:
        if self._native is None:
            raise RuntimeError("the server is not started")
        return self._native.address

    @property
    def running(self) -> bool:
        return self._native is not None and self._native.running

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until every worker sent SHUTDOWN (or stop()); False if `timeout` passed."""
        if self._native is None:
            return True
        done = self._native.wait(-1.0 if timeout is None else _seconds(timeout, "timeout"))
        if done and self._native.error:
            raise _C.Error(f"parameter server {self.index} failed: {self._native.error}")
        return done

    def stop(self) -> None:
        if self._native is not None:
            self._native.stop()

    def __enter__(self) -> "Server":
        return self.start() if self._native is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


class PsWork:
    """Handle of an asynchronous push_pull (one native request per shard)."""

    def __init__(self, handles: list, result: Any, keepalive: tuple):
        self._handles = handles
        self._result = result
        self._keepalive = keepalive  # the tensor the requests read and write

    def wait(self, timeout: Optional[float] = None):
        """Block until every shard is done; return the tensor. Raises the first shard's
        error (after the others finished, so none still writes into the tensor)."""
        deadline = None if timeout is None else time.monotonic() + _seconds(timeout, "timeout")
        first: Optional[BaseException] = None
        for h in self._handles:
            left = -1.0 if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                done = h.wait(left)
            except Exception as exc:  # noqa: BLE001 - the first is re-raised below
                first = first or exc
                continue
            if not done:
                raise _C.TimeoutError(f"wait() gave up after {timeout} s; the push_pull is still running")
        if first is not None:
            raise first
        self._keepalive = ()
        return self._result

    def is_completed(self) -> bool:
        return all(h.done() for h in self._handles)


class Client:
    """One worker's connections to every parameter server.

    Waits in the store for each server's address (start order does not matter), then
    connects, and client and server prove to each other that they know the job secret.
    `shard_elements` must be the same on every worker. `token` overrides the store's job
    secret (for tools and tests).

    A server on the same host (equal `host_id`, default RINGCC_HOST_ID or detected) gets
    a shared-memory object of 2 x `shm_bytes` (default 4 MiB + 4 KiB: one default shard)
    for this connection's payloads; larger payloads, other hosts, transport="tcp" (or
    RINGCC_PS_TRANSPORT=tcp) and any failure to set it up use TCP. transport_to(i)
    says which one server i's connection uses."""

    def __init__(self, store: Any, rank: int, num_workers: int, num_servers: int, *, timeout: float = 300.0,
                 shard_elements: int = SHARD_ELEMENTS, prefix: str = DEFAULT_PREFIX, token: Optional[str] = None,
                 transport: Optional[str] = None, host_id: Optional[str] = None, shm_bytes: Optional[int] = None):
        if not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers must be a positive int, got {num_workers!r}")
        if not isinstance(rank, int) or not 0 <= rank < num_workers:
            raise ValueError(f"rank must be in [0, {num_workers}), got {rank!r}")
        if not isinstance(num_servers, int) or num_servers < 1:
            raise ValueError(f"num_servers must be a positive int, got {num_servers!r}")
        if not isinstance(shard_elements, int) or shard_elements < 1:
            raise ValueError(f"shard_elements must be a positive int, got {shard_elements!r}")
        self.rank = rank
        self.num_workers = num_workers
        self.num_servers = num_servers
        self.shard_elements = shard_elements
        self.timeout = _seconds(timeout, "timeout")
        transport = _transport(transport)
        if shm_bytes is not None and (not isinstance(shm_bytes, int) or shm_bytes < 4096):
            raise ValueError(f"ps: shm_bytes must be an int >= 4096, got {shm_bytes!r}")
        if token is None:
            token = _job_token(store, prefix, self.timeout)
        lookup = StoreClient(store, prefix, self.timeout)
        addresses = [lookup.get(f"server/{i}") for i in range(num_servers)]
        self._native = _C.PsClient(rank, num_workers, token, addresses, self.timeout, transport,
                                   host_id or os.environ.get("RINGCC_HOST_ID", ""), shm_bytes or 0)
        self._keys: dict = {}  # name -> (numel, [(server, key, offset, count)])
        _live_clients.add(self)

    # ------------------------------------------------------------------ placement
    def shards(self, name: str, numel: int) -> List[Tuple[int, int, int, int]]:
        """[(server, key id, offset, count)] of a tensor of `numel` values named `name`."""
        out = []
        for i, off in enumerate(range(0, numel, self.shard_elements)):
            out.append((server_of(name, i, self.num_servers), key_id(name, i), off,
                        min(self.shard_elements, numel - off)))
        return out

    def _layout(self, name: str, buf) -> list:
        if name not in self._keys:
            raise ValueError(f"ps: {name!r} is not registered (call register({name!r}, numel) first)")
        numel, shards = self._keys[name]
        if buf.dtype_name != "float32":
            raise TypeError(f"ps: {name!r} holds float32 values; got a {buf.dtype_name} tensor")
        if buf.count != numel:
            raise ValueError(f"ps: {name!r} was registered with {numel} elements; got a tensor of {buf.count}")
        return shards

    @staticmethod
    def _wait_all(handles: list) -> None:
        PsWork(handles, None, ()).wait()

    def transport_to(self, server: int) -> str:
        """"shm" if payloads to server `server` (index) go through shared memory, else "tcp"."""
        return self._native.stats(server)["transport"]

    def transport_stats(self, server: int) -> dict:
        """{"transport", "shm_payloads", "tcp_payloads"}: payload-carrying requests and
        replies on server `server`'s connection so far, by the path they took."""
        return self._native.stats(server)

    # ------------------------------------------------------------------ API
    def register(self, name: str, numel: int) -> None:
        """Declare a float32 tensor of `numel` values (idempotent; every worker calls it
        with the same numel, and a server refuses a key re-registered with another)."""
        if not isinstance(numel, int) or numel < 1:
            raise ValueError(f"ps: numel must be a positive int, got {numel!r}")
        shards = self.shards(name, numel)
        handles = [self._native.register_key(s, k, shard_name(name, i), n)
                   for i, (s, k, _, n) in enumerate(shards)]
        self._wait_all(handles)
        self._keys[name] = (numel, shards)

    def init(self, name: str, values) -> None:
        """Set the server-held values (async mode: the parameters); usually worker 0."""
        buf = as_buffer(values, "values")
        handles = [self._native.init(s, k, buf.ptr + 4 * off, n) for s, k, off, n in self._layout(name, buf)]
        PsWork(handles, None, (buf,)).wait()

    def push_pull(self, name: str, tensor, compression: Optional[str] = None, async_op: bool = False):
        """Push `tensor` (a gradient) and replace it, in place, with the server's answer:
        sync mode, the average over all workers; async mode, the updated parameters.
        compression: None, "fp16" or "bf16" (block-scaled 16-bit wire, fp32 on the server).
        Returns the tensor, or a PsWork with wait() when async_op."""
        if compression not in _WIRES:
            raise ValueError(f"ps: compression must be None, 'fp16' or 'bf16', got {compression!r}")
        buf = as_buffer(tensor, "tensor", writable=True)
        wire = _WIRES[compression]
        handles = [self._native.push_pull(s, k, buf.ptr + 4 * off, buf.ptr + 4 * off, n, wire)
                   for s, k, off, n in self._layout(name, buf)]
        work = PsWork(handles, tensor, (buf,))
        return work if async_op else work.wait()

    def pull(self, name: str, out):
        """Write the server's current values of `name` into `out` (float32); returns out."""
        buf = as_buffer(out, "out", writable=True)
        handles = [self._native.pull(s, k, buf.ptr + 4 * off, n) for s, k, off, n in self._layout(name, buf)]
        return PsWork(handles, out, (buf,)).wait()

    def shutdown(self) -> None:
        """Tell every server this worker is done; a server exits once all workers have."""
        self._wait_all([self._native.shutdown(s) for s in range(self.num_servers)])

    def close(self) -> None:
        if self._native is not None:
            self._native.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------- ringcc ps-server
def _parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="ringcc ps-server",
                                description="Run one ringcc parameter server until every worker sends SHUTDOWN.")
    p.add_argument("--index", type=int, default=int(env("RINGCC_PS_INDEX", "0")), help="this server's index")
    p.add_argument("--num-servers", type=int, default=int(env("RINGCC_PS_NUM_SERVERS", "1")))
    p.add_argument("--num-workers", type=int, default=int(env("RINGCC_PS_NUM_WORKERS", env("WORLD_SIZE", "1"))))
    p.add_argument("--mode", choices=sorted(_MODES), default=env("RINGCC_PS_MODE", "sync"))
    p.add_argument("--lr", type=float, default=0.01, help="async: SGD learning rate")
    p.add_argument("--momentum", type=float, default=0.0, help="async: SGD momentum")
    p.add_argument("--weight-decay", type=float, default=0.0, help="async: SGD weight decay")
    p.add_argument("--staleness", type=int, default=0, help="async: largest version lag a push may have")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a sync round waits for missing workers")
    p.add_argument("--store", default=None,
                   help="host:port of the job's TCPStore (default: MASTER_ADDR:MASTER_PORT, as torchrun sets)")
    p.add_argument("--listen-host", default=None, help="numeric IP to listen on (default: as the Communicator)")
    p.add_argument("--restore", default=None, help="start from this checkpoint (written by the same server index)")
    p.add_argument("--checkpoint", default=None, help="save a checkpoint here when the server ends")
    return p


def run_server_from_env(argv=None) -> int:
    """`ringcc ps-server`: join the job's store, serve, return 0 once every worker said SHUTDOWN."""
    args = _parser().parse_args(argv)
    if args.store:
        host, _, port = args.store.rpartition(":")
    else:
        host, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    if not host or not port:
        print("ringcc ps-server: no store (pass --store host:port or set MASTER_ADDR and MASTER_PORT)",
              file=sys.stderr)
        return 2
    import datetime

    import torch.distributed as dist

    store = dist.TCPStore(host.strip("[]"), int(port), is_master=False,
                          timeout=datetime.timedelta(seconds=max(args.timeout, 60.0)))
    server = Server(store, args.index, args.num_servers, args.num_workers, args.mode, lr=args.lr,
                    momentum=args.momentum, weight_decay=args.weight_decay, staleness=args.staleness,
                    listen_host=args.listen_host, timeout=args.timeout, restore=args.restore).start()
    print(f"ringcc ps-server {args.index}/{args.num_servers} ({args.mode}, {args.num_workers} workers) "
          f"listening on {server.address}", flush=True)
    try:
        server.wait()
    finally:
        server.stop()
        if args.checkpoint:
            server.save(args.checkpoint)  # the loop has ended: this is the final state
    print(f"ringcc ps-server {args.index}: every worker sent SHUTDOWN; exiting", flush=True)
    return 0


__all__ = ["Server", "Client", "PsWork", "StaleError", "CheckpointError", "SHARD_ELEMENTS", "server_of", "key_id",
           "shard_name", "read_checkpoint", "run_server_from_env"]
