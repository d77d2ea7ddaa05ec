"""A follower rank of a tensor-parallel artifact (rank 1..n-1), started by rank 0 (runtime/tp.py).

    python -m internvl_aot.runtime.tp_worker --artifact DIR --rank 1 --master-addr 127.0.0.1 \
        --master-port 29500 --parent-pid 1234

It joins the process group, loads its own weight shard and graphs, and then runs the graphs
rank 0 tells it to run, with the inputs rank 0 sends, until rank 0 says stop or goes away.
Ctrl-C is rank 0's to handle: a follower ignores SIGINT and is stopped by rank 0.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys


def _exit(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)        # no interpreter teardown: the process group may be half gone


def _peer_lost(e: BaseException) -> bool:
    text = str(e).lower()
    return any(s in text for s in ("connection closed", "connection reset", "broken pipe", "peer", "timed out"))


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

    from .tp import LOAD_FAILED_EXIT, PEER_LOST_EXIT, check_group_name, follow, join_group, watch_parent
    watch_parent(args.parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    import torch
    from .artifact import load_artifact
    from .manifest import read_manifest

    if args.threads:
        torch.set_num_threads(args.threads)
    rank, device = args.rank, torch.device(args.device)
    manifest = read_manifest(args.artifact)
    store, channel = join_group(manifest, rank, args.master_addr, args.master_port, device)
    try:
        check_group_name(manifest)
        # Rank 0 verified every file of the artifact before starting this process.
        _, graphs, _, _ = load_artifact(args.artifact, device=str(device), skip_verify=True, rank=rank,
                                        tokenizer=False)
    except Exception as e:      # noqa: BLE001 - reported to rank 0, which raises it
        store.set(f"loaded/{rank}", str(e).splitlines()[0] if str(e) else type(e).__name__)
        _exit(LOAD_FAILED_EXIT)
    store.set(f"loaded/{rank}", "ok")
    try:
        follow(graphs, manifest, channel, device)
    except Exception as e:      # noqa: BLE001
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"tensor-parallel rank {rank}: stopping ({first})", file=sys.stderr)
        _exit(PEER_LOST_EXIT if _peer_lost(e) else 1)
    _exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
