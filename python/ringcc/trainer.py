"""``ringcc.Trainer``: a data-parallel training loop over a DDP wrapper.

    dist.init_process_group("ringcc")          # every rank, e.g. under torchrun
    trainer = ringcc.Trainer(model, torch.optim.AdamW(model.parameters()), dataset,
                             loss_fn=nn.functional.mse_loss, batch_size=64, epochs=3,
                             checkpoint_dir="ckpt", checkpoint_every=100)
    history = trainer.fit()                    # one metrics dict per epoch

What one step is
    One optimizer step over ``grad_accum_steps`` micro-batches of ``batch_size`` samples
    per rank. The micro-batches before the last run under the wrapper's ``no_sync()``,
    so gradients are exchanged once per step; each micro-batch's loss is divided by the
    number of micro-batches in the step, so the update is that of the mean loss. A batch
    is a sequence ``(*inputs, target)``: the model is called as ``model(*inputs)`` and
    the loss as ``loss_fn(output, target)``.

Data
    A ``DistributedSampler`` (``set_epoch`` every epoch, seeded with ``seed``) gives each
    rank its share; the indices are cut into batches here and the samples fetched in
    this process (no DataLoader: its iterator draws from the global RNG, which would
    shift dropout masks after a resume). The last batch of an epoch may be smaller.

Checkpoints and resume
    Every ``checkpoint_every`` steps, when ``max_steps`` stops a run and at the end,
    rank 0 writes ``checkpoint_dir/step-NNNNNNNN.pt`` atomically (a temporary file in
    the same directory, fsync, ``os.replace``, fsync of the directory): a reader sees the
    old file or the new one, never a partial one. It holds the model (replicated, so
    rank 0's copy), optimizer and scheduler states, the position (global step, epoch,
    batches of the epoch already consumed), and per rank — gathered to rank 0 — the RNG
    states of torch, NumPy and ``random`` and the wrapper's communication state
    (``comm_state_dict()``, e.g. error-feedback residuals, when the wrapper has one).
    With ``resume=True`` a run starts from the newest checkpoint in the directory (with
    ``resume=False`` a directory that holds checkpoints is refused) and
    skips the consumed batches of the epoch, so an interrupted run that is resumed
    ends with exactly the parameters and optimizer state of an uninterrupted one (same
    world size, batch settings and thread counts, and a wrapper whose bucket layout
    does not depend on the step it was created at). ``ringcc.DistributedDataParallel``
    saves its bucket plan in ``comm_state_dict()``; :func:`torch_ddp` plans its buckets
    once. A fresh run seeds torch, NumPy and ``random`` with
    ``seed + rank`` (dropout differs between ranks, reproducibly).

Metrics (one dict per epoch, from ``fit()``; a run cut short by ``max_steps`` and a
resumed run report the part of the epoch they ran, with ``"partial": True``)
    ``samples_per_sec``  samples over all ranks / ``time_s``.
    ``time_s``           wall time of the epoch's steps, the slowest rank; checkpoint
                         writing is excluded and reported as ``checkpoint_s``.
    ``comm_s``           time the training loop waited for gradient synchronisation:
                         per synchronising backward, from the moment the last local
                         gradient was accumulated (a post-accumulate-grad hook on every
                         parameter) to the return of ``backward()`` — the exposed,
                         non-overlapped communication, including waiting for a slower
                         peer and unpacking the results (mean over ranks).
    ``comm_overlapped_s`` communication that ran while backward still computed: the
                         union of the bucket exchanges' lifetimes minus ``comm_s``, when
                         the wrapper reports them through a ``comm_stats()`` method
                         returning cumulative ``{"comm_s": seconds}`` (ringcc's DDP, and
                         torch's DDP as built by ``torch_ddp``); otherwise None.
    ``data_s``           fetching and collating batches. ``compute_s`` = ``time_s`` -
                         ``comm_s`` - ``data_s`` (forward, backward, optimizer, ...).
    ``comm_compute_ratio`` = ``comm_s / compute_s``.
    ``scaling_efficiency`` = ``samples_per_sec / (world_size * baseline_samples_per_sec)``
                         when a 1-rank baseline is given, else None.
    ``loss``             mean training loss over the epoch's micro-batches and ranks.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import re
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, TensorDataset, default_collate

from . import _files

CHECKPOINT_RE = re.compile(r"^step-(\d{8,})\.pt$")
FORMAT = 1  # checkpoint layout version
COMPRESSIONS = (None, "fp16", "bf16")


# --------------------------------------------------------------------------- wrappers
def default_wrapper() -> Callable[..., torch.nn.Module]:
    """ringcc's DDP wrapper (``ringcc.DistributedDataParallel``)."""
    from .ddp import DistributedDataParallel

    return DistributedDataParallel


def torch_ddp(module: torch.nn.Module, *, compression: Optional[str] = None, error_feedback: bool = False,
              process_group=None, fixed_buckets: bool = True) -> torch.nn.Module:
    """``torch.nn.parallel.DistributedDataParallel`` with a timing comm hook (for
    ``comm_overlapped_s``). ``compression`` ("fp16"/"bf16") uses ``ringcc.hooks``:
    ringcc's block-scaled compressed allreduce on a ringcc group, a cast to 16 bits
    elsewhere; ``error_feedback=True`` keeps a residual per bucket
    (``ringcc.hooks.ErrorFeedbackState``), which ``comm_state_dict()`` /
    ``load_comm_state_dict()`` save and restore.

    ``fixed_buckets``: torch's DDP normally puts every gradient in one bucket for its
    first step and re-plans the buckets after it. A resumed run's first step would then
    exchange another layout than the uninterrupted run's same step, and the layout
    decides which rank sums which elements in which order (and, with block-scaled
    compression, which values share a scale; with error feedback, which residual is
    whose): the last bits differ. With ``find_unused_parameters=True`` torch plans the
    buckets once, by size, and never re-plans them, at the cost of one walk over the
    autograd graph and one small allreduce per step (and a warning from torch on the
    first step that no parameter was unused)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    from . import hooks
    from .ddp import _BusyClock

    class TorchDDP(DistributedDataParallel):
        """torch's DDP plus the exchange clock and the error-feedback state of this factory."""

        def comm_stats(self) -> dict:
            return {"comm_s": busy.seconds()}

        def comm_state_dict(self) -> dict:
            ef = self._ringcc_error_feedback
            return {"residuals": {i: r.clone() for i, r in ef.residuals.items()}} if ef is not None else {}

        def load_comm_state_dict(self, d: dict) -> None:
            ef = self._ringcc_error_feedback
            if ef is not None:
                ef.residuals = {int(i): r.clone() for i, r in d.get("residuals", {}).items()}

    if error_feedback and compression is None:
        raise ValueError("error_feedback=True needs compression='fp16' or 'bf16'")
    ef = hooks.ErrorFeedbackState(process_group) if error_feedback else None
    state = ef if ef is not None else process_group
    base = {None: default_hooks.allreduce_hook, "fp16": hooks.fp16_compress_hook,
            "bf16": hooks.bf16_compress_hook}[compression]
    ddp = TorchDDP(module, process_group=process_group, find_unused_parameters=fixed_buckets)
    busy = _BusyClock()  # the union of the bucket exchanges' lifetimes, as ringcc's DDP keeps

    def timed_hook(state, bucket):
        busy.start()

        def done(fut):
            busy.stop()
            return fut.value()  # the bucket's averaged gradients, as the base hook made them

        return base(state, bucket).then(done)

    ddp.register_comm_hook(state, timed_hook)
    ddp._ringcc_error_feedback = ef
    return ddp


# ------------------------------------------------------------------------ checkpoints
def atomic_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` such that `path` is at every moment absent, the old
    file or the complete new one (see ``ringcc._files.atomic_write``)."""
    _files.atomic_write(path, lambda f: torch.save(obj, f))


def checkpoint_path(directory: str, step: int) -> str:
    return os.path.join(directory, f"step-{step:08d}.pt")


def list_checkpoints(directory: str) -> List[str]:
    """Complete checkpoints in `directory`, oldest first (temporary files are skipped)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = sorted((int(m.group(1)), n) for n in names if (m := CHECKPOINT_RE.match(n)))
    return [os.path.join(directory, n) for _, n in found]


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        # As plain lists, so that torch.load(weights_only=True) accepts the file.
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    kind, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = s["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (1 << 32))
    random.seed(seed)


# ----------------------------------------------------------------------- progress bar
class _Bar:
    """tqdm when installed, else ringcc's text bar; draws on rank 0 only."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool):
        self.tqdm = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                pass
            else:
                self.tqdm = tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)
        if self.tqdm is None:
            from ._progress import TextProgress

            self.text = TextProgress(total, enabled, desc=f"{desc} ")
            self.text.done = initial

    def update(self, loss: float) -> None:
        if self.tqdm is not None:
            self.tqdm.set_postfix_str(f"loss {loss:.4f}", refresh=False)
            self.tqdm.update(1)
        else:
            self.text.update(1, f"loss {loss:.4f}")

    def close(self) -> None:
        (self.tqdm or self.text).close()


# ---------------------------------------------------------------------------- trainer
class Trainer:
    """Train `model` data-parallel on every rank of the process group (see the module
    docstring for steps, data, checkpoints and metrics).

    The default process group (or `process_group`) must be initialised. `model` is the
    plain module (the same architecture on every rank; the wrapper broadcasts rank 0's
    parameters), `optimizer` built on its parameters.

    ``wrapper``: a factory ``wrapper(module, **options) -> wrapped`` with ``no_sync()``
    and ``.module``; options holds only what is set: ``compression`` (not None),
    ``error_feedback`` (True), ``process_group`` (not None). Default:
    ``ringcc.DistributedDataParallel``; :func:`torch_ddp` for torch's DDP.
    ``max_steps`` stops the run after that many optimizer steps in total (counting the
    steps of the runs it resumed). ``log`` receives the lines rank 0 reports.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, train_dataset, *,
                 loss_fn: Callable, batch_size: int, epochs: int, scheduler=None, grad_accum_steps: int = 1,
                 mixed_precision: Optional[str] = None, compression: Optional[str] = None,
                 error_feedback: bool = False, checkpoint_dir: Optional[str] = None,
                 checkpoint_every: Optional[int] = None, keep_checkpoints: int = 2, resume: bool = True,
                 progress: bool = True, baseline_samples_per_sec: Optional[float] = None, seed: int = 0,
                 shuffle: bool = True, max_steps: Optional[int] = None, log: Optional[Callable[[str], Any]] = None,
                 wrapper: Optional[Callable[..., torch.nn.Module]] = None, process_group=None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ringcc.Trainer needs an initialised process group: call "
                               "torch.distributed.init_process_group('ringcc') on every rank first")
        if batch_size < 1 or epochs < 0 or grad_accum_steps < 1:
            raise ValueError("batch_size and grad_accum_steps must be >= 1 and epochs >= 0")
        if mixed_precision not in (None, "bf16"):
            raise ValueError(f"mixed_precision must be None or 'bf16', not {mixed_precision!r}")
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be None, 'fp16' or 'bf16', not {compression!r}")
        if checkpoint_every is not None and checkpoint_every < 1:
            raise ValueError("checkpoint_every must be >= 1 (or None: only at the end)")
        if max_steps is not None and max_steps < 0:
            raise ValueError("max_steps must be >= 0")
        self.module = model
        self.optimizer = optimizer
        self.dataset = train_dataset
        self.loss_fn = loss_fn
        self.batch_size, self.epochs, self.grad_accum_steps = batch_size, epochs, grad_accum_steps
        self.scheduler = scheduler
        self.mixed_precision, self.compression, self.error_feedback = mixed_precision, compression, error_feedback
        self.checkpoint_dir, self.checkpoint_every = checkpoint_dir, checkpoint_every
        self.keep_checkpoints, self.resume = max(1, keep_checkpoints), resume
        self.progress, self.baseline = progress, baseline_samples_per_sec
        self.seed, self.shuffle, self.max_steps = seed, shuffle, max_steps
        self.process_group = process_group
        self.wrapper_factory = wrapper or default_wrapper()
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        self._log = log or (lambda line: print(line, flush=True))
        self.sampler = DistributedSampler(train_dataset, num_replicas=self.world_size, rank=self.rank,
                                          shuffle=shuffle, seed=seed)
        self.model: Optional[torch.nn.Module] = None  # the wrapper, built by fit()
        self.global_step = 0
        self.epoch = 0
        self.batch_in_epoch = 0  # batches of `epoch` already consumed (a multiple of steps)
        self.resumed_from: Optional[str] = None

    # ------------------------------------------------------------------ helpers
    def log(self, line: str) -> None:
        if self.rank == 0:
            self._log(line)

    def _group_rank0(self) -> int:
        pg = self.process_group
        return 0 if pg is None else dist.get_global_rank(pg, 0)

    def _wrap(self) -> torch.nn.Module:
        options: Dict[str, Any] = {}
        if self.compression is not None:
            options["compression"] = self.compression
        if self.error_feedback:
            options["error_feedback"] = True
        if self.process_group is not None:
            options["process_group"] = self.process_group
        return self.wrapper_factory(self.module, **options)

    def _epoch_batches(self, epoch: int) -> List[List[int]]:
        self.sampler.set_epoch(epoch)
        idx = list(self.sampler)
        return [idx[i:i + self.batch_size] for i in range(0, len(idx), self.batch_size)]

    def _fetch(self, indices: Sequence[int]):
        if isinstance(self.dataset, TensorDataset):  # one gather per tensor instead of a stack of rows
            at = torch.as_tensor(indices)
            return tuple(t[at] for t in self.dataset.tensors)
        return default_collate([self.dataset[i] for i in indices])

    # -------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Optional[str]:
        """Write a checkpoint of the current position (collective: every rank calls it).
        Returns the path on rank 0, None elsewhere or without a checkpoint_dir."""
        if self.checkpoint_dir is None:
            return None
        comm_state = getattr(self.model, "comm_state_dict", None)
        mine = {"rng": _rng_state(), "comm": comm_state() if callable(comm_state) else None}
        ranks = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(mine, ranks, dst=self._group_rank0(), group=self.process_group)
        if self.rank != 0:
            self._last_saved = self.global_step
            return None
        state = {
            "format": FORMAT,
            "global_step": self.global_step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "world_size": self.world_size,
            "config": {"batch_size": self.batch_size, "grad_accum_steps": self.grad_accum_steps,
                       "seed": self.seed, "shuffle": self.shuffle},
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "ranks": ranks,
        }
        os.makedirs(self.checkpoint_dir, exist_ok=True)
        path = checkpoint_path(self.checkpoint_dir, self.global_step)
        atomic_save(state, path)
        self._last_saved = self.global_step
        for old in list_checkpoints(self.checkpoint_dir)[:-self.keep_checkpoints]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(old)
        return path

    def _latest_checkpoint(self) -> Optional[str]:
        """Rank 0's choice, so that every rank loads the same file."""
        found = [None]
        if self.rank == 0 and self.checkpoint_dir is not None:
            paths = list_checkpoints(self.checkpoint_dir)
            found[0] = paths[-1] if paths else None
        dist.broadcast_object_list(found, src=self._group_rank0(), group=self.process_group)
        return found[0]

    def _load_checkpoint(self, path: str) -> Optional[dict]:
        """Restore everything but the per-rank parts (returned, applied after wrapping)."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("format") != FORMAT:
            raise RuntimeError(f"{path}: checkpoint format {state.get('format')!r}, this ringcc reads {FORMAT}")
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            if state["scheduler"] is None:
                raise RuntimeError(f"{path} has no scheduler state but this Trainer has a scheduler")
            self.scheduler.load_state_dict(state["scheduler"])
        self.global_step, self.epoch, self.batch_in_epoch = \
            state["global_step"], state["epoch"], state["batch_in_epoch"]
        self.resumed_from = path
        self._last_saved = self.global_step
        mine = {"batch_size": self.batch_size, "grad_accum_steps": self.grad_accum_steps, "seed": self.seed,
                "shuffle": self.shuffle}
        changed = {k: (v, mine[k]) for k, v in state["config"].items() if mine.get(k) != v}
        if changed or state["world_size"] != self.world_size:
            self.log(f"warning: resuming {path} with other settings ({changed or ''} world size "
                     f"{state['world_size']} -> {self.world_size}): training continues, but not as the "
                     "uninterrupted run would have")
        if state["world_size"] != self.world_size:
            return None  # per-rank RNG and residuals belong to other ranks
        return state["ranks"][self.rank]

    # ---------------------------------------------------------------------- fit
    def fit(self) -> List[Dict[str, Any]]:
        """Train until `epochs` (or `max_steps`) are done; returns per-epoch metrics."""
        mine = None
        if self.checkpoint_dir is not None:
            path = self._latest_checkpoint()
            if path is not None and not self.resume:
                # Its steps would interleave with ours and a later resume could pick either run.
                raise RuntimeError(f"{self.checkpoint_dir} already holds checkpoints (newest: {path}); resume "
                                   "from them (resume=True) or use another directory")
            if path is not None:
                mine = self._load_checkpoint(path)
                self.log(f"resumed from {path}: step {self.global_step}, epoch {self.epoch}, "
                         f"batch {self.batch_in_epoch}")
        self.model = self._wrap()
        if self.error_feedback and self.checkpoint_dir is not None and \
                not callable(getattr(self.model, "comm_state_dict", None)):
            self.log("warning: this wrapper has no comm_state_dict(): checkpoints will not hold the error-feedback "
                     "residuals, and a resumed run restarts them at zero")
        if mine is not None:
            load = getattr(self.model, "load_comm_state_dict", None)
            if mine.get("comm") is not None:
                if not callable(load):
                    raise RuntimeError("the checkpoint holds communication state (error-feedback residuals) "
                                       "but this wrapper has no load_comm_state_dict()")
                load(mine["comm"])
            _set_rng_state(mine["rng"])
        elif self.resumed_from is None:
            _seed_all(self.seed + self.rank)

        params = [p for p in self.module.parameters() if p.requires_grad]
        self._last_grad_t = 0.0

        def grad_ready(_p):
            self._last_grad_t = time.perf_counter()

        hooks = [p.register_post_accumulate_grad_hook(grad_ready) for p in params]
        history: List[Dict[str, Any]] = []
        try:
            while self.epoch < self.epochs and not self._stop():
                history.append(self._run_epoch())
            if self.checkpoint_dir is not None and self._last_saved != self.global_step:
                self.save_checkpoint()
        finally:
            for h in hooks:
                h.remove()
        return history

    _last_saved = -1  # global step of the newest checkpoint written or loaded

    def _stop(self) -> bool:
        return self.max_steps is not None and self.global_step >= self.max_steps

    def _run_epoch(self) -> Dict[str, Any]:
        epoch = self.epoch
        batches = self._epoch_batches(epoch)
        accum = self.grad_accum_steps
        steps_total = math.ceil(len(batches) / accum)
        first = self.batch_in_epoch
        bar = _Bar(steps_total, first // accum, f"epoch {epoch}", self.progress and self.rank == 0)
        stats_fn = getattr(self.model, "comm_stats", None)
        busy0 = stats_fn().get("comm_s") if callable(stats_fn) else None
        samples = 0
        loss_sum, loss_n = 0.0, 0
        comm_s = data_s = ckpt_s = 0.0
        autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if self.mixed_precision == "bf16" \
            else contextlib.nullcontext
        t_start = time.perf_counter()
        pos = first
        while pos < len(batches) and not self._stop():
            group = batches[pos:pos + accum]
            for i, indices in enumerate(group):
                t0 = time.perf_counter()
                batch = self._fetch(indices)
                data_s += time.perf_counter() - t0
                sync = i == len(group) - 1
                with contextlib.nullcontext() if sync else self.model.no_sync():
                    with autocast():
                        out = self.model(*batch[:-1])
                        loss = self.loss_fn(out, batch[-1])
                    t_bw = time.perf_counter()
                    self._last_grad_t = t_bw
                    (loss / len(group)).backward()
                    if sync:
                        comm_s += time.perf_counter() - max(self._last_grad_t, t_bw)
                loss_sum += float(loss.detach())
                loss_n += 1
                samples += len(indices)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.scheduler is not None:
                self.scheduler.step()
            pos += len(group)
            self.global_step += 1
            self.batch_in_epoch = pos
            if pos >= len(batches):  # a finished epoch is saved as the start of the next
                self.epoch, self.batch_in_epoch = epoch + 1, 0
            bar.update(loss_sum / max(1, loss_n))
            if self.checkpoint_every is not None and self.global_step % self.checkpoint_every == 0:
                t0 = time.perf_counter()
                self.save_checkpoint()
                ckpt_s += time.perf_counter() - t0
        elapsed = time.perf_counter() - t_start - ckpt_s
        bar.close()

        busy = stats_fn().get("comm_s", busy0) - busy0 if busy0 is not None else None
        # One SUM over ranks for counts and per-rank times (averaged below), one MAX for
        # the wall time: the epoch lasts as long as its slowest rank.
        sums = torch.tensor([samples, loss_sum, loss_n, comm_s, data_s, ckpt_s, busy or 0.0], dtype=torch.float64)
        dist.all_reduce(sums, group=self.process_group)
        wall = torch.tensor([elapsed], dtype=torch.float64)
        dist.all_reduce(wall, op=dist.ReduceOp.MAX, group=self.process_group)
        n = self.world_size
        g_samples, g_loss, g_loss_n = sums[0].item(), sums[1].item(), sums[2].item()
        comm, data, ckpt, busy_mean = (sums[3] / n).item(), (sums[4] / n).item(), (sums[5] / n).item(), \
            (sums[6] / n).item()
        time_s = wall.item()
        compute = max(time_s - comm - data, 1e-12)
        sps = g_samples / time_s if time_s > 0 else 0.0
        m = {
            "epoch": epoch,
            "partial": first > 0 or pos < len(batches),
            "steps": math.ceil((pos - first) / accum),
            "global_step": self.global_step,
            "samples": int(g_samples),
            "loss": g_loss / g_loss_n if g_loss_n else float("nan"),
            "time_s": time_s,
            "samples_per_sec": sps,
            "comm_s": comm,
            "comm_overlapped_s": max(0.0, busy_mean - comm) if busy is not None else None,
            "compute_s": compute,
            "data_s": data,
            "comm_compute_ratio": comm / compute,
            "checkpoint_s": ckpt,
            "world_size": n,
            "scaling_efficiency": sps / (n * self.baseline) if self.baseline else None,
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        eff = f", scaling efficiency {m['scaling_efficiency']:.2f}" if m["scaling_efficiency"] is not None else ""
        over = f", overlapped {m['comm_overlapped_s']:.3f}s" if m["comm_overlapped_s"] is not None else ""
        self.log(f"epoch {epoch}{' (partial)' if m['partial'] else ''}: loss {m['loss']:.4f}, "
                 f"{sps:.1f} samples/s, comm {comm:.3f}s{over} / compute {compute:.3f}s "
                 f"(ratio {m['comm_compute_ratio']:.3f}){eff}")
        return m


__all__ = ["Trainer", "atomic_save", "list_checkpoints", "torch_ddp", "default_wrapper"]
