"""Tensor-parallel ranks at run time, rank 0's side: launching them, running steps, the watchdog.

Rank 0 is the process that opened the artifact: it owns the tokenizer, image tiling, the
scheduler, the block tables and sampling. Every other rank is a follower process
(runtime/tp_worker.py) that holds its weight shard, its graphs and its own KV pool (its KV
heads, the same block count), and runs whatever graph rank 0 runs, with the same inputs,
in the same order. The collectives inside the graphs then line up across ranks.

Start-up: rank 0 opens a TCPStore on MASTER_ADDR:MASTER_PORT (a free port when MASTER_PORT
is unset; a port in use is an error at once), spawns the followers, and waits for each to
check in while watching that none has died; then all ranks create the default process
group (gloo on CPU, NCCL on CUDA), whose name must be the one the graphs were compiled
against, and a gloo group for the step commands. Followers report through the store when
their weights and graphs are loaded (or why they could not).

Steps: `LeaderGraph` wraps each of rank 0's graphs: before running a graph it sends the
command and inputs over the step channel (runtime/tp_channel.py) so that every follower runs
the same graph with its own KV pool.
Commands use their own gloo group: a gloo worker thread may need the GIL to release a tensor
Python created, and must never do that while holding the lock of the group a running graph
(which holds the GIL) waits on.

Failure: a watchdog thread on rank 0 polls the followers; a follower watches its parent
(PR_SET_PDEATHSIG plus a polling thread). A rank that dies closes its sockets, so the others'
pending collectives fail within milliseconds; rank 0 then names the dead rank
("rank 1 died (signal SIGKILL)"), kills the remaining followers and raises `TPError`. The
watchdog runs whenever rank 0 is not inside a compiled graph (a graph call holds the GIL), so
a death between steps is noticed within 0.1 s; should rank 0 stay stuck in a call after a
death, the watchdog ends the process after a grace period.
"""
from __future__ import annotations

import atexit
import datetime
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Callable

import torch

from .spec import RuntimeSpec
from .tp_channel import CMD_POOL, CMD_STOP, StepChannel

PEER_LOST_EXIT = 3           # a follower that stopped because another rank went away
LOAD_FAILED_EXIT = 2
STEP_TIMEOUT = datetime.timedelta(minutes=5)     # in-graph collectives: the ranks start each graph together
IDLE_TIMEOUT = datetime.timedelta(days=365)      # followers wait for the next command as long as rank 0 lives
JOIN_TIMEOUT_S = 300.0
LOAD_TIMEOUT_S = 3600.0
STUCK_GRACE_S = 6.0                              # after a death, rank 0 must be out of its graph call by then



class TPError(RuntimeError):
    """The group of ranks failed (a rank died, could not start or load); one line, naming the rank."""


class LeaderGraph:
    """One of rank 0's graphs: tells the followers to run it too, then runs it."""

    def __init__(self, name: str, fn: Callable, group: "RankGroup"):
        self.name, self.fn, self.group = name, fn, group

    @property
    def input_signature(self):
        return getattr(self.fn, "input_signature", None)

    def __call__(self, *inputs):
        g = self.group
        g.raise_if_failed()
        g.busy = True
        try:
            g.channel.send_run(self.name, inputs[:len(g.channel.inputs[self.name])])   # not the KV pool
            return self.fn(*inputs)
        except KeyboardInterrupt:
            g.broken = "interrupted in the middle of a step"
            raise
        except RuntimeError as e:
            if isinstance(e, TPError):
                raise
            raise g.failure_after(e) from None
        finally:
            g.busy = False


class RankGroup:
    """Rank 0's side of the group: the follower processes, the store, the process groups."""

    def __init__(self, spec: dict, device: torch.device):
        self.spec, self.world = spec, int(spec["tp"])
        self.device = torch.device(device)
        self.backend = "nccl" if self.device.type == "cuda" else "gloo"
        self.procs: list[subprocess.Popen | None] = [None] * self.world
        self.store = None
        self.channel: StepChannel | None = None
        self.failure: str | None = None
        self.broken: str | None = None
        self.busy = False
        self.stopping = False
        self._watchdog: threading.Thread | None = None
        self._spawned = threading.Event()
        self._spawn_error: BaseException | None = None
        self._initialized = False

    # ------------------------------------------------------------------- start-up
    def launch(self, follower_argv: Callable[[int, str, int], list[str]], env: dict | None = None) -> None:
        """Open the store, start the followers and create the process groups (all ranks)."""
        import torch.distributed as dist
        if dist.is_initialized():
            raise TPError("this process already has a torch.distributed process group: a TP artifact needs its own "
                          "(close the other engine first)")
        addr = os.environ.get("MASTER_ADDR") or "127.0.0.1"
        port_env = os.environ.get("MASTER_PORT")
        port = int(port_env) if port_env else 0
        try:
            self.store = dist.TCPStore(addr, port, self.world, is_master=True, wait_for_workers=False,
                                       timeout=datetime.timedelta(seconds=JOIN_TIMEOUT_S))
        except (RuntimeError, ValueError, OSError) as e:
            if "in use" in str(e) or "EADDRINUSE" in str(e):
                raise TPError(f"MASTER_PORT={port} on {addr} is already in use: set MASTER_PORT to a free port, or "
                              f"unset it to let the runtime choose one") from None
            raise TPError(f"cannot open the rendezvous store on {addr}:{port} ({str(e).splitlines()[0]}): check "
                          f"MASTER_ADDR/MASTER_PORT") from None
        port = self.store.port
        atexit.register(self.stop)
        # The followers are started by the watchdog thread, which lives as long as the group:
        # their PR_SET_PDEATHSIG fires when the thread that started them ends.
        self._watchdog = threading.Thread(target=self._watch, args=(follower_argv, addr, port, env),
                                          name="tp-watchdog", daemon=True)
        self._watchdog.start()
        self._spawned.wait()
        if self._spawn_error is not None:
            raise TPError(f"cannot start the follower ranks: {self._spawn_error}")
        try:
            self._wait_for("joined", JOIN_TIMEOUT_S, "to start")
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            self.busy = True            # a rank dying in here must not leave this one waiting
            dist.init_process_group(self.backend, store=self.store, rank=0, world_size=self.world,
                                    timeout=STEP_TIMEOUT)
            self._initialized = True
            cmd_group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
            self.busy = False
            self.raise_if_failed()
            check_group_name(self.spec)
            self.channel = StepChannel(RuntimeSpec.from_dict(self.spec), self.spec["graphs"], cmd_group)
        except BaseException:
            self.busy = False
            self.stop()
            raise

    def wait_loaded(self) -> None:
        """Block until every follower has loaded its shard and graphs (or raise why one could not)."""
        self._wait_for("loaded", LOAD_TIMEOUT_S, "to load its weights and graphs")

    def _wait_for(self, what: str, timeout_s: float, doing: str) -> None:
        keys = [f"{what}/{r}" for r in range(1, self.world)]
        deadline = time.monotonic() + timeout_s
        while True:
            self.raise_if_failed()
            if self.store.check(keys):
                break
            if time.monotonic() > deadline:
                late = [k.split("/")[1] for k in keys if not self.store.check([k])]
                self.stop()
                raise TPError(f"rank(s) {', '.join(late)} did not manage {doing} within {timeout_s:.0f} s")
            time.sleep(0.05)
        for k in keys:
            value = self.store.get(k).decode()
            if value != "ok":
                self.stop()
                raise TPError(f"rank {k.split('/')[1]}: {value}")

    def wrap(self, graphs: dict) -> dict:
        return {name: LeaderGraph(name, fn, self) for name, fn in graphs.items()}

    def allocate_pools(self, num_blocks: int) -> None:
        """Followers allocate their KV pools with rank 0's block count (block tables are shared)."""
        self.raise_if_failed()
        self.channel.send(CMD_POOL, num_blocks)

    # ------------------------------------------------------------------- failure
    def _watch(self, follower_argv, addr: str, port: int, env: dict | None) -> None:
        try:
            for r in range(1, self.world):
                self.procs[r] = subprocess.Popen(follower_argv(r, addr, port), env=env)
        except BaseException as e:   # noqa: BLE001 - reported by launch()
            self._spawn_error = e
        finally:
            self._spawned.set()
        if self._spawn_error is not None:
            self._kill_followers()
            return
        while True:
            alive = [p for p in self.procs if p is not None and p.poll() is None]
            if self.stopping:
                if not alive:       # this thread must outlive the followers (their PR_SET_PDEATHSIG)
                    return
            elif len(alive) < self.world - 1 or self.failure is not None:
                if self.failure is None:
                    self._record_death()
                self._kill_followers()
                self._end_if_stuck()
                return
            time.sleep(0.1)

    def _record_death(self) -> None:
        """The failure message, naming the rank that died first on its own (others stop with PEER_LOST_EXIT)."""
        time.sleep(0.2)                       # let the other ranks' exits show, to tell cause from effect
        dead = [(r, p.returncode) for r, p in enumerate(self.procs) if p is not None and p.poll() is not None]
        culprits = [(r, rc) for r, rc in dead if rc != PEER_LOST_EXIT] or dead
        r, rc = culprits[0]
        if rc is not None and rc < 0:
            try:
                name = signal.Signals(-rc).name
            except ValueError:
                name = f"signal {-rc}"
            how = f"signal {name}" + (" - killed, e.g. out of memory" if -rc == signal.SIGKILL else "")
        elif rc == PEER_LOST_EXIT:
            how = "it lost its connection to another rank"
        else:
            how = f"exit code {rc}"
        self.failure = f"tensor-parallel rank {r} died ({how}); all ranks stopped"

    def _end_if_stuck(self) -> None:
        """Rank 0's graph call fails as soon as a peer's sockets close; if it does not, end the process."""
        deadline = time.monotonic() + STUCK_GRACE_S
        while time.monotonic() < deadline:
            if not self.busy:
                return
            time.sleep(0.1)
        if self.busy and not self.stopping:
            print(f"error: {self.failure} (rank 0 was stuck in a collective)", file=sys.stderr, flush=True)
            os._exit(1)

    def failure_after(self, error: BaseException) -> TPError:
        """The error to raise after a graph or broadcast failed on rank 0."""
        deadline = time.monotonic() + 3.0
        while self.failure is None and time.monotonic() < deadline:
            if any(p is not None and p.poll() is not None for p in self.procs):
                self._record_death()
                break
            time.sleep(0.05)
        msg = self.failure or f"tensor-parallel step failed on rank 0 ({str(error).splitlines()[0]})"
        self.failure = msg
        self.stop()
        return TPError(msg)

    def raise_if_failed(self) -> None:
        if self.failure:
            self.stop()
            raise TPError(self.failure)
        if self.broken:
            raise TPError(f"the tensor-parallel group is unusable ({self.broken}); open the artifact again")

    # ------------------------------------------------------------------- shutdown
    def _kill_followers(self, grace_s: float = 0.0) -> None:
        live = [p for p in self.procs if p is not None and p.poll() is None]
        if grace_s:
            deadline = time.monotonic() + grace_s
            for p in live:
                try:
                    p.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        for p in live:
            if p.poll() is None:
                p.kill()
        for p in live:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass

    def stop(self) -> None:
        """Stop every follower (asking nicely when the group is healthy) and leave the process group."""
        if self.stopping:
            return
        self.stopping = True
        healthy = self.channel is not None and not self.failure and not self.broken and not self.busy
        if healthy:
            try:
                self.channel.send(CMD_STOP)
            except Exception:       # noqa: BLE001 - killing them below is the fallback
                healthy = False
        self._kill_followers(grace_s=5.0 if healthy else 0.0)
        if self._initialized:
            import torch.distributed as dist
            try:
                dist.destroy_process_group()
            except Exception:       # noqa: BLE001 - a broken group cannot always be torn down cleanly
                pass
            self._initialized = False
        atexit.unregister(self.stop)


def check_group_name(spec: dict) -> None:
    import torch.distributed as dist
    want = spec.get("tp_group")
    have = dist.group.WORLD.group_name
    if want is not None and have != want:
        raise TPError(f"the graphs were compiled for process group {want!r} but this process's default group is "
                      f"{have!r}: run the artifact in a fresh process")


def default_threads(world: int) -> int:
    """CPU threads per rank: the cores shared out between the ranks."""
    return max(1, (os.cpu_count() or 1) // world)
