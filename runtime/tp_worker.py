"""A follower rank of a tensor-parallel artifact (rank 1..n-1), started by rank 0 (runtime/tp.py).

    python -m internvl_aot.runtime.tp_worker --artifact DIR --rank 1 --master-addr 127.0.0.1 \
        --master-port 29500 --parent-pid 1234

It joins the process group, loads its own weight shard and graphs, and then runs the graphs
rank 0 tells it to run, with the inputs rank 0 sends, until rank 0 says stop or goes away.
Ctrl-C is rank 0's to handle: a follower ignores SIGINT and is stopped by rank 0.
The follower's half of runtime/tp.py lives here: `watch_parent`, `join_group`, `follow`.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import os
import signal
import sys
import threading
import time

import torch

from .tp import IDLE_TIMEOUT, JOIN_TIMEOUT_S, LOAD_FAILED_EXIT, PEER_LOST_EXIT, STEP_TIMEOUT, check_group_name
from .tp_channel import CMD_POOL, CMD_STOP, StepChannel
from .buckets import GraphKey
from .spec import RuntimeSpec


def _exit(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)        # no interpreter teardown: the process group may be half gone


def _peer_lost(e: BaseException) -> bool:
    text = str(e).lower()
    return any(s in text for s in ("connection closed", "connection reset", "broken pipe", "peer", "timed out"))


def watch_parent(parent_pid: int) -> None:
    """End this follower when rank 0 goes away (kernel signal where available, polling otherwise)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)          # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        os._exit(PEER_LOST_EXIT)

    def poll():
        while True:
            if os.getppid() != parent_pid:
                os._exit(PEER_LOST_EXIT)
            time.sleep(0.5)

    threading.Thread(target=poll, name="tp-parent-watch", daemon=True).start()


def join_group(spec: dict, rank: int, addr: str, port: int, device: torch.device):
    """A follower's half of RankGroup.launch: -> (store, command channel)."""
    import torch.distributed as dist
    world = int(spec["tp"])
    store = dist.TCPStore(addr, port, world, is_master=False, timeout=datetime.timedelta(seconds=JOIN_TIMEOUT_S))
    store.set(f"joined/{rank}", "ok")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=STEP_TIMEOUT)
    cmd_group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    return store, StepChannel(RuntimeSpec.from_dict(spec), spec["graphs"], cmd_group)


def follow(graphs: dict, spec: "RuntimeSpec | dict", channel: StepChannel, device: torch.device) -> None:
    """Run rank 0's step commands until it says stop. Any failure ends the process (the caller
    maps a lost peer to PEER_LOST_EXIT). `spec`: the manifest, parsed or not."""
    from .kv_cache import KVPool
    spec = spec if isinstance(spec, RuntimeSpec) else RuntimeSpec.from_dict(spec)
    pool = None
    with torch.inference_mode():
        while True:
            command, arg = channel.receive(device)
            if command == CMD_STOP:
                return
            if command == CMD_POOL:
                pool = KVPool(spec.llm.num_layers, arg, spec.buckets.block_size, spec.rank_kv_heads,
                              spec.llm.head_dim, spec.torch_dtype, device)
                continue
            name, inputs = arg
            if GraphKey.parse(name).stage == "vision":
                graphs[name](*inputs)
                continue
            if pool is None:
                raise RuntimeError("rank 0 sent a step before the KV pool size")
            graphs[name](*inputs, pool.k_cache, pool.v_cache)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="internvl-tp-worker", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--master-addr", required=True)
    ap.add_argument("--master-port", type=int, required=True)
    ap.add_argument("--parent-pid", type=int, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    watch_parent(args.parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    from .artifact import load_artifact
    from .manifest import read_manifest

    if args.threads:
        torch.set_num_threads(args.threads)
    rank, device = args.rank, torch.device(args.device)
    manifest = read_manifest(args.artifact)

    def load():
        # Rank 0 verified every file of the artifact before starting this process.
        return load_artifact(args.artifact, device=str(device), skip_verify=True, rank=rank, tokenizer=False)[1]
    run_follower(manifest, rank, args.master_addr, args.master_port, device, load)
    return 0


def run_follower(spec: dict, rank: int, addr: str, port: int, device: torch.device, load, close=None) -> None:
    """Join the group, `load()` this rank's graphs (its failure reported to rank 0), run rank 0's steps
    until it says stop, `close()`, and end the process with the exit code rank 0 reads. Shared by
    this module's artifacts and runtime/backends/npu.py's (.om graphs on an NPU)."""
    store, channel = join_group(spec, rank, addr, port, device)
    try:
        check_group_name(spec)
        graphs = load()
    except Exception as e:      # noqa: BLE001 - reported to rank 0, which raises it
        store.set(f"loaded/{rank}", str(e).splitlines()[0] if str(e) else type(e).__name__)
        _exit(LOAD_FAILED_EXIT)
    store.set(f"loaded/{rank}", "ok")
    code = 0
    try:
        follow(graphs, spec, channel, device)
    except Exception as e:      # noqa: BLE001
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"tensor-parallel rank {rank}: stopping ({first})", file=sys.stderr)
        code = PEER_LOST_EXIT if _peer_lost(e) else 1
    if close is not None:
        try:
            close()
        except Exception as e:  # noqa: BLE001 - the process ends anyway
            print(f"tensor-parallel rank {rank}: closing failed ({e})", file=sys.stderr)
    _exit(code)


if __name__ == "__main__":
    sys.exit(main())
