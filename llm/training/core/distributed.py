"""Process groups and the few collectives every rank must agree through.

Any decision that changes control flow (stop, save, fail) goes through
:func:`any_rank` or :func:`agree_on_errors`, so no rank takes a branch the
others do not and then waits forever in a collective.

What the hosts tell each other (flags, metric sums, names, errors) travels as
CPU tensors over gloo: over the default group when it carries CPU tensors,
else (nccl) over a gloo group of the same ranks, made when first needed. A
value sent through nccl is read back from the GPU, and the host would first
wait for all the work it has queued there: the stop agreed after every step
would drain the GPU's queue each step, and the GPU would idle while the host
prepares the next one.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import gc
import itertools
import os
import re
import socket
import threading
import time
import weakref
import zlib
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from llm.errors import UsageError, one_line
from llm.training.core.config import Config


def env_ranks() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as set by torchrun; (0, 1, 0) when run plainly. UsageError for values
    that are not whole numbers or do not fit together (RANK set by hand without WORLD_SIZE)."""
    rank, world_size, local_rank = (_whole_number(name, default) for name, default in (
        ("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")))
    restarts = _restart_count()
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0 or restarts < 0:
        raise UsageError(f"environment variables RANK={rank}, WORLD_SIZE={world_size}, LOCAL_RANK={local_rank}, "
                         f"TORCHELASTIC_RESTART_COUNT={restarts} do not fit together: RANK runs from 0 to "
                         f"WORLD_SIZE - 1, the others from 0 (torchrun sets them)")
    return rank, world_size, local_rank


def _restart_count() -> int:
    """How often torchrun restarted this node's workers (TORCHELASTIC_RESTART_COUNT); 0 without torchrun."""
    return _whole_number("TORCHELASTIC_RESTART_COUNT", "0")


def _whole_number(name: str, default: str) -> int:
    text = os.environ.get(name, default)
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"environment variable {name}: got {text!r}, expected a whole number "
                         f"(torchrun sets it)") from None


LAUNCH_FILE = ".launch"
"""In a run directory: the torchrun launch that writes it, so that the workers torchrun restarts find it again."""


def torchrun_agent() -> int | None:
    """The pid of the torchrun agent that started this process: its parent when this module was first imported
    (an agent that has died since leaves another); None when torchrun did not start it (its variables
    TORCHELASTIC_RUN_ID, RANK and LOCAL_RANK are not all set)."""
    if any(os.environ.get(name) is None for name in ("TORCHELASTIC_RUN_ID", "RANK", "LOCAL_RANK")):
        return None
    return _PARENT_AT_START


_PARENT_AT_START = os.getppid()


def restarted() -> bool:
    """Whether torchrun restarted the workers after a failure (``--max-restarts``); the same on every rank."""
    return attempt() > 0


def attempt() -> int:
    """Which start of this launch this is: 0 the first, more after torchrun restarted the workers.

    torchrun counts restarts per node, and a node whose workers it restarts because
    another node's failed keeps its count: every rank's own count would not agree.
    Once the process group exists, the ranks' counts are added up (``_attempt``), a
    number every rank shares and every restart raises.
    """
    return _restart_count() if _attempt is None else _attempt


def launch_id() -> str | None:
    """What names this torchrun launch through its restarts; None when torchrun did not start this process.

    torchrun's run id (a fresh uuid under --standalone, else --rdzv-id, else "none"),
    with the agent that starts and restarts this node's workers: the parent process,
    by host, pid and start time, so that two launches given the same --rdzv-id differ.
    """
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id is None:
        return None
    agent = os.getppid()
    return f"{run_id} agent {agent} on {socket.gethostname()} started {_start_time(agent)}"


def _start_time(pid: int) -> str:
    """When process ``pid`` started, in clock ticks since boot (Linux); '?' where that cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]  # field 22; the name in parentheses may hold spaces
    except (OSError, IndexError):
        return "?"


def launched_by(run_dir: Path) -> set[str]:
    """The launches recorded in ``run_dir``: one per node, since rank 0 may start on another node after a restart."""
    try:
        return set((run_dir / LAUNCH_FILE).read_text().split("\n")) - {""}
    except (OSError, UnicodeDecodeError):
        return set()


def pick_device(config: Config, local_rank: int) -> torch.device:
    """The device this process trains on; refused in one line where the config asks for what it cannot have
    (cuda without a GPU; the nccl backend, on one process too, where the same command under torchrun fails)."""
    device = _device(config, local_rank)
    if config.distributed.backend == "nccl" and (device.type != "cuda" or not dist.is_nccl_available()):
        raise UsageError("distributed.backend nccl needs CUDA devices and a torch built with NCCL: "
                         "use --distributed-backend gloo (or auto) on the CPU")
    return device


def _device(config: Config, local_rank: int) -> torch.device:
    # set either way, as the matmul precision below: the config, not an earlier run in this process, says
    torch.use_deterministic_algorithms(config.training.deterministic)
    if config.training.deterministic:  # cuBLAS reads it when it starts, at the first matmul on a GPU
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    wanted = config.training.device
    if wanted == "cuda" and not torch.cuda.is_available():
        raise UsageError("training.device is 'cuda' but no CUDA device is available: use --training-device cpu")
    if wanted == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    # set either way: the config, not an earlier run in this process, says how float32 matmuls are done; through
    # the call that sets every backend's flag, so that torch never sees its legacy and new settings disagree
    torch.set_float32_matmul_precision("high" if config.training.tf32 else "highest")
    return torch.device("cuda", local_rank)


def op_with_no_deterministic_form(e: BaseException) -> str:
    """The op torch refused under training.deterministic ("put_ does not have a deterministic implementation,
    but you set ..."), or ''."""
    text = str(e) if isinstance(e, RuntimeError) else ""
    before, found, _ = text.partition(" does not have a deterministic implementation")
    # what torch names (an op, or "median CUDA with indices output"), after any text torch.compile wraps it in
    return re.split(r"[\"'\n]|: ", before)[-1].strip() if found else ""


def init_process_group(config: Config, rank: int, world_size: int, local_rank: int) -> None:
    """Join the default group (nccl with CUDA, gloo otherwise) when there is more than one process; with nccl,
    a gloo group of the same ranks as well, for what the hosts tell each other."""
    if world_size == 1 or dist.is_initialized():
        return
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:  # WORLD_SIZE left in the environment by hand, or by another launcher
        unset = f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not"
        if os.environ.get("WORLD_SIZE") == str(world_size):  # not the engine's own argument
            raise UsageError(f"WORLD_SIZE={world_size} is set but {unset}: start the processes with torchrun, which "
                             f"sets them all, or unset WORLD_SIZE")
        raise UsageError(f"the engine was given world_size={world_size} but {unset}: start the processes with "
                         f"torchrun, which sets them all, or give world_size=1")
    backend = config.distributed.backend
    device = pick_device(config, local_rank)  # refuses nccl without CUDA
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=config.distributed.timeout_s)
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    except dist.DistNetworkError as e:  # rank 0 serves the store on MASTER_PORT, set by hand (an srun script)
        where = f"MASTER_ADDR={os.environ['MASTER_ADDR']} MASTER_PORT={os.environ['MASTER_PORT']}"
        if "EADDRINUSE" in str(e):
            raise UsageError(f"rank {rank} cannot serve the process group's store at {where}: another process "
                             f"listens on that port; choose a free MASTER_PORT, or start the processes with "
                             f"torchrun, which finds one") from None
        raise UsageError(f"rank {rank} cannot join the process group at {where}: {one_line(e)}") from None
    global _store, _attempt, _words, _host_timeout, _arrivals
    _host_timeout, _arrivals = timeout, itertools.count()
    # this start's count, and a number rank 0 draws: torchrun's store outlives its restarts, and an elastic job's
    # count of them can repeat, so the word ranks leave each other there is keyed by both
    drawn = float(int.from_bytes(os.urandom(4), "little")) if rank == 0 else 0.0
    summed = all_reduce_on_hosts(torch.tensor([float(_restart_count()), drawn], dtype=torch.float64))
    _attempt, _words = int(summed[0]), f"llm/{int(summed[0])}.{int(summed[1])}"
    # kept apart from the group: after a collective fails, ranks still leave word here for each other
    _store = dist.distributed_c10d._get_default_store()


def join_process_group(config: Config, rank: int, world_size: int, local_rank: int) -> None:
    """Join the default group as init_process_group does, unless there is one process or the group exists (the
    command line makes it; so does a script that made its own), and leave it when the process exits: a
    TrainingEngine built in code and started by torchrun trains with no more than that, and trains again in the
    same process (joining anew would reuse the rendezvous' keys of the first time and hang)."""
    if world_size == 1 or dist.is_initialized():
        return
    init_process_group(config, rank, world_size, local_rank)
    atexit.register(destroy_process_group)


_store: dist.Store | None = None
_attempt: int | None = None
_words = "llm/0"
"""The prefix of the keys this start's ranks leave each other in the rendezvous store."""
_host_timeout: datetime.timedelta | None = None  # the configured one; a process group made by the caller: torch's
_hosts_of: tuple[weakref.ref, weakref.ref | None] | None = None
"""(the default group, the group host values go over), weakly: held here, a group torch has destroyed would be
freed at the interpreter's exit, where gloo's aborts the process."""
_background_of: tuple[weakref.ref, weakref.ref] | None = None
"""(the default group, the group of checkpoints saved in the background), weakly as ``_hosts_of``."""
_STORE_WAIT = datetime.timedelta(seconds=5)
_arrivals = itertools.count()
"""How many store barriers this process has made in its process group: the same on every rank, as they all make
them at the same points (reset with the group)."""


def _key(kind: str, rank: int | None = None) -> str:
    """A key of this start's in the store, of ``rank``'s or the run's: a worker restarted by torchrun must not
    read what the ranks of an earlier start left."""
    return f"{_words}/{kind}" if rank is None else f"{_words}/{kind}/{rank}"


def record_failure(rank: int, error: BaseException, run_ended: bool = True) -> None:
    """Leave word in the rendezvous store that this rank failed and why, for the ranks it leaves waiting;
    ``run_ended``: and that the run is over for every rank (see run_ended), unless every rank stops alike
    (a signal's stop)."""
    if _store is None:
        return
    try:
        _store.set_timeout(_STORE_WAIT)
        why = f"{type(error).__name__}: {one_line(error, 200)}"
        _store.set(_key("failed", rank), why)
        if run_ended:
            _store.set(_key("ended"), f"rank {rank} failed with {why}")
    except Exception:  # noqa: BLE001 - the store may be gone with the rank that hosted it; nothing to add then
        pass


def run_ended() -> str:
    """Why the run is over, when another rank has said so in the store; '' while it is not, or without a store.
    Cheap enough to ask every few seconds: one lookup, of one key."""
    if _store is None:
        return ""
    try:
        key = _key("ended")
        return _store.get(key).decode() if _store.check([key]) else ""
    except Exception:  # noqa: BLE001 - the store went with the rank that hosted it
        return ""


def lost_ranks(rank: int, world_size: int, settle_s: float = 2.0) -> str:
    """After a collective failed on this rank: which other ranks failed (and why) or never answered.

    Each rank that lost contact says so in the store. Ranks that reported a
    failure are named at once: a failing rank writes its report before its
    connections close, and torchrun may end the others moments later. Otherwise
    this rank waits ``settle_s`` for the others to say they lost contact too, and
    names those that said nothing (hung, or killed without a word). '' if the
    store cannot be reached.
    """
    if _store is None:
        return ""
    others = [r for r in range(world_size) if r != rank]

    def failed() -> str:
        return "; ".join(f"rank {r} failed with {_store.get(_key('failed', r)).decode()}"
                         for r in others if _store.check([_key("failed", r)]))

    try:
        _store.set_timeout(_STORE_WAIT)
        _store.set(_key("lost", rank), "")
        _store.set(_key("ended"), f"rank {rank} lost contact with the others")
        if reported := failed():
            return reported
        time.sleep(settle_s)
        if reported := failed():
            return reported
        silent = [str(r) for r in others if not _store.check([_key("lost", r)])]
        return f"rank {', '.join(silent)} did not answer (hung, or killed)" if silent else ""
    except Exception:  # noqa: BLE001
        return ""


class _StoreBarrier:
    """A barrier kept in the rendezvous store, after work that only some ranks do, before the collective that
    follows: tokenizing a large corpus on one rank per node can take longer than distributed.timeout_s, which
    bounds a collective's wait and would end the run.

    The ranks doing the work add to a heartbeat count from a thread, at once and
    then every BEAT_S (at most a quarter of timeout_s), while their process keeps
    using the CPU; the others wait for every rank to arrive as long as that count
    moves. A rank that fails says so in the store (record_failure), which ends
    the wait at once; one killed, or hung (no CPU used: a deadlock, a stalled
    file system), stops beating, and about timeout_s later the wait ends, so that
    the collective after it names that rank. A waiting rank reads two keys, less
    and less often the longer it waits (up to once a second). Without the
    engine's own process group (a caller's: no store kept), it does nothing: the
    collective's timeout bounds the wait.
    """

    BEAT_S = 1.0

    def __init__(self) -> None:
        n = next(_arrivals)
        self.arrived, self.beats = _key(f"arrived/{n}"), _key(f"beats/{n}")
        self.period = min(self.BEAT_S, _host_timeout.total_seconds() / 4) if _host_timeout else self.BEAT_S

    @contextlib.contextmanager
    def beating(self) -> Iterator[None]:
        """While the body runs, add one to the heartbeat count at once and then each period in which this process
        used the CPU (a hundredth of the period at least: more than the beat itself costs)."""
        done = threading.Event()

        def beat() -> None:
            used = -1.0
            while True:
                now = time.process_time()
                try:
                    if now - used >= self.period / 100:
                        _store.add(self.beats, 1)
                except Exception:  # noqa: BLE001 - the store went with the agent hosting it: nothing to wait on
                    return
                used = now
                if done.wait(self.period):
                    return

        thread = threading.Thread(target=beat, name="llm-heartbeat", daemon=True)
        if self._kept():
            thread.start()
        try:
            yield
        finally:
            done.set()
            if thread.is_alive():
                thread.join(timeout=2)  # a daemon: a store call stuck in it keeps no one from going on

    def wait(self) -> None:
        if not self._kept():
            return
        world_size = dist.get_world_size()
        patience = max(_host_timeout.total_seconds(), 3 * self.period + 1)  # beats land a period apart, polls 1 s
        try:
            arrived, beats, moved, pause = _store.add(self.arrived, 1), -1, time.monotonic(), 0.001
            while arrived < world_size and not run_ended():
                time.sleep(pause)
                pause = min(1.0, 2 * pause)
                arrived, now = _store.add(self.arrived, 0), _store.add(self.beats, 0)
                if now != beats:
                    beats, moved = now, time.monotonic()
                elif time.monotonic() - moved > patience:
                    return  # no working rank alive: the collective names the ones missing
        except Exception:  # noqa: BLE001 - the store went with the torchrun agent hosting it: the collective waits
            pass

    @staticmethod
    def _kept() -> bool:
        """Whether the engine made the process group, and keeps its store and timeout."""
        return _store is not None and _host_timeout is not None


def destroy_process_group() -> None:
    global _hosts_of, _background_of, _host_timeout, _store
    try:
        if dist.is_initialized():
            # objects still holding gloo work (a DDP reducer in a reference cycle) must go while the
            # interpreter is alive: freed during its shutdown they abort the process (SIGABRT)
            gc.collect()
            dist.destroy_process_group()  # every group, the host values' too
    finally:
        _hosts_of = _background_of = _host_timeout = _store = None


def active() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _hosts() -> dist.ProcessGroup | None:
    """The group host values go over: None (the default group) when it carries CPU tensors, else a gloo group
    of the same ranks. That one is made at the first collective of host values, which every rank makes at
    the same point, and made again for a new default group (one the caller made after destroying the last)."""
    global _hosts_of
    world = dist.group.WORLD
    if _hosts_of is None or _hosts_of[0]() is not world:
        cpu = any(part.startswith("cpu:") for part in dist.get_backend_config().split(","))
        group = None if cpu else new_host_group("beside nccl for small values such as whether to stop")
        _hosts_of = (weakref.ref(world), None if group is None else weakref.ref(group))
    return None if _hosts_of[1] is None else _hosts_of[1]()


def background_group() -> dist.ProcessGroup:
    """A gloo group of all ranks for the collectives of a checkpoint saved on a thread of its own: made on a group
    of the loop's, they would interleave with the loop's in a different order on each rank. Made at the first
    call, which every rank makes at the same point, and again for a new default group."""
    global _background_of
    world = dist.group.WORLD
    group = None if _background_of is None or _background_of[0]() is not world else _background_of[1]()
    if group is None:
        group = new_host_group("for checkpoints saved in the background")
        _background_of = (weakref.ref(world), weakref.ref(group))
    return group


def new_host_group(use: str) -> dist.ProcessGroup:
    """A gloo group of all ranks, for CPU tensors; ``use`` says what for, in the error if the ranks cannot connect.
    Collective: every rank makes it at the same point."""
    try:
        return dist.new_group(backend="gloo", timeout=_host_timeout)
    except dist.DistError:
        raise  # a rank that never came, or the store gone: a lost rank, said as such
    except RuntimeError as e:  # gloo's own: it could not make its connections
        raise UsageError(f"the processes could not connect over gloo, which they use {use}: {one_line(e)}; name "
                         f"the network interface to use with GLOO_SOCKET_IFNAME=<interface> on every node") from None


def all_reduce_on_hosts(t: torch.Tensor, op: Any = dist.ReduceOp.SUM,
                        group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """``t``, a CPU tensor, reduced over all ranks in place between the hosts: nothing waits for a GPU. Over
    ``group`` if given (a gloo group of all ranks, new_host_group)."""
    dist.all_reduce(t, op=op, group=_hosts() if group is None else group)
    return t


def any_rank(flags: list[bool]) -> list[bool]:
    """Element-wise OR of boolean flags over all ranks, in one small all-reduce between the hosts."""
    if not active():
        return flags
    t = all_reduce_on_hosts(torch.tensor([float(f) for f in flags]), dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def every_rank(flag: torch.Tensor) -> torch.Tensor:
    """A boolean tensor's AND over all ranks, on its own device in the default group: on a GPU the host does
    not wait for it."""
    if not active():
        return flag
    t = flag.float()
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t.bool()


def weighted_mean_over_ranks(totals: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Each metric's mean over all ranks' items, from each rank's (weighted sum, total weight).

    Sums and weights are added up over ranks before dividing, so every sample or
    token counts once whichever rank had it, however unevenly ranks were filled.
    Every rank must pass the same keys: else one line naming each rank's, not a
    sum of one rank's metric with another's.
    """
    keys = sorted(totals)
    if active():
        _check_same_names(keys)
        if keys:
            summed = all_reduce_on_hosts(torch.tensor([totals[k][0] for k in keys] + [totals[k][1] for k in keys],
                                                      dtype=torch.float64)).tolist()
            summed_up = {k: (summed[i], summed[len(keys) + i]) for i, k in enumerate(keys)}
            totals = {k: summed_up[k] for k in totals}
    # in the task's order, as one process gives them (val_loss first): the same lines and records on any count
    return {k: total / weight if weight else float("nan") for k, (total, weight) in totals.items()}


def _check_same_names(keys: list[str]) -> None:
    """Raise the same UsageError on every rank unless all pass the same ``keys``: a fixed-size signature of
    each rank's names is gathered (one small collective), and the names themselves only when they differ."""
    signature = torch.tensor([len(keys), zlib.crc32("\0".join(keys).encode())], dtype=torch.float64)
    gathered = [torch.empty_like(signature) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, signature, group=_hosts())
    if all(torch.equal(g, gathered[0]) for g in gathered[1:]):
        return
    names = ", ".join(f"rank {rank} {sorted(k)}" for rank, k in enumerate(gather(keys)))
    raise UsageError(f"the ranks reported different metrics ({names}): train_step and validation_step must "
                     f"return the same metric names on every rank")


def mean_tensor_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The mean of ``t`` over ranks, left on its device (no CPU-GPU sync)."""
    if not active():
        return t
    dist.all_reduce(t)
    return t / dist.get_world_size()


def broadcast_from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=_hosts())
    return box[0]


def persistent_buffers(module: torch.nn.Module) -> list[torch.Tensor]:
    """The buffers of ``module`` that its state dict holds: running statistics (BatchNorm's), which each rank
    updates with its own batches; not a table derived from the config (rotary angles), the same on every rank."""
    saved = module.state_dict(keep_vars=True).keys()
    return [buffer for name, buffer in module.named_buffers() if name in saved]


def broadcast_buffers(buffers: list[torch.Tensor]) -> None:
    """Give every rank rank 0's values of ``buffers`` (persistent_buffers), in place. One broadcast per dtype,
    not per buffer; none without buffers."""
    if not active():
        return
    by_kind: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for buffer in buffers:
        by_kind.setdefault((buffer.dtype, buffer.device), []).append(buffer)
    for kind in by_kind.values():
        flat = torch.cat([b.reshape(-1) for b in kind])
        dist.broadcast(flat, src=0)
        for buffer, part in zip(kind, flat.split([b.numel() for b in kind])):
            buffer.copy_(part.view_as(buffer))


def gather(value: Any, group: dist.ProcessGroup | None = None) -> list[Any]:
    """Every rank's ``value`` (any picklable object), in rank order; ``[value]`` on one process. Over ``group``
    if given (a gloo group of all ranks, new_host_group)."""
    if not active():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value, group=_hosts() if group is None else group)
    return gathered


def node_mesh(world_size: int, device_type: str) -> Any:
    """hsdp's device mesh, (nodes, processes per node), its dimensions named ("replicate", "shard"): the processes
    of a node shard the model among themselves and each node holds a whole copy, so that only the gradients'
    all-reduce crosses between nodes. A node is the processes one torchrun agent started (LOCAL_WORLD_SIZE), whose
    ranks torchrun numbers one after the other; without torchrun, all of them."""
    from torch.distributed.device_mesh import init_device_mesh

    per_node = gather(_whole_number("LOCAL_WORLD_SIZE", str(world_size)))
    if len(set(per_node)) > 1 or world_size % per_node[0] or per_node[0] < 1:
        counts = " and ".join(str(n) for n in sorted(set(per_node)))
        raise UsageError(f"distributed.strategy hsdp needs as many processes on every node, sharing out the "
                         f"{world_size} ranks evenly; torchrun started nodes of {counts} (LOCAL_WORLD_SIZE): give "
                         f"every node the same --nproc-per-node, or use fsdp")
    return init_device_mesh(device_type, (world_size // per_node[0], per_node[0]),
                            mesh_dim_names=("replicate", "shard"))


NODE_SETTINGS = ("data.cache_dir", "data.num_workers", "logging.progress_bar")
"""Settings a node may have of its own: where its cache is, how many loader workers it runs, its terminal."""


def check_same_settings(config: Config) -> None:
    """Refuse in one line, on every rank, ranks started with different settings: a node given another learning
    rate trains apart from the others, silently, and another batch size or save schedule hangs the collectives
    that no longer match. ``NODE_SETTINGS`` may differ."""
    if not active():
        return
    mine = {}
    for section, values in config.to_dict().items():
        mine.update({f"{section}.{k}": v for k, v in values.items()} if isinstance(values, dict) else {section: values})
    for key in NODE_SETTINGS:
        mine.pop(key, None)
    every = gather(mine)
    first, differ = every[0], {}  # setting: (the first rank whose value is not rank 0's, that value)
    for rank, settings in enumerate(every[1:], 1):
        for key, value in first.items():
            if key not in differ and settings.get(key) != value:
                differ[key] = (rank, settings.get(key))
    if differ:
        shown = "; ".join(f"{key} is {first[key]!r} on rank 0 but {value!r} on rank {rank}"
                          for key, (rank, value) in list(differ.items())[:3])
        more = f" (and {len(differ) - 3} more)" if len(differ) > 3 else ""
        raise UsageError(f"the ranks were started with different settings: {shown}{more}; start every node with "
                         f"the same command and config (only {', '.join(NODE_SETTINGS)} may differ)")


def agree_on_errors(fn: Callable[[], None], run_here: bool = True) -> None:
    """Run ``fn`` where ``run_here``; if it raised a UsageError on any rank, raise it on every rank.

    Used around work that only some ranks do (preparing data on one rank per
    node): the ranks that wait learn of a failure instead of waiting for ever,
    and wait however long the work takes, while the ranks doing it are alive
    (_StoreBarrier).
    """
    message = None
    barrier = _StoreBarrier() if active() else None
    if run_here:
        try:
            with barrier.beating() if barrier else contextlib.nullcontext():
                fn()
        except UsageError as e:
            message = str(e)
            if not active():
                raise
    if barrier:
        barrier.wait()
        message = next((m for m in gather(message) if m), None)
        if message:
            raise UsageError(message)
