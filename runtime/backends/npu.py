"""The NPU box's runtime: each `.om` of a BACKEND=npu artifact loaded once through pyACL, behind the
graph-callable interface the ModelRunner uses (`graphs[name](*inputs, k_cache, v_cache) -> tensor`).

WRITTEN AGAINST THE DOCUMENTED pyACL API, NEVER RUN ON AN NPU BY US (shared/reference/npu-torchair.md
§3: acl.mdl.load_from_file, acl.mdl.execute, acl.create_data_buffer, acl.rt.*). `acl` is imported
only inside `NpuSession.open`. What is tested on CPU (tests/test_npu.py): the manifest check
(`check_npu_manifest`: versions and SoC, one-line refusals) and the call sequence against a
recording stand-in of the `acl` module, which proves the bookkeeping (one load per graph, the two
pool buffers allocated once and bound at the same dataset positions on every call, inputs copied
host->device and the logits back), not that ACL accepts it.

- One process per NPU (TP ranks likewise: rank r opens `rank<r>/` on the r-th visible NPU, in its
  own process with ASCEND_RT_VISIBLE_DEVICES set to that device).
- The KV pool: two device buffers `[layers, num_blocks, block_size, kv_heads, head_dim]` with the
  manifest's fixed num_blocks (static graphs), allocated once at open and bound as the last two
  inputs of every prefill/decode call; the .air's RefData in-place ScatterNdUpdate is expected to
  write them in place (UNCONFIRMED end to end, reference §3). The host `k_cache`/`v_cache` the
  runner passes are ignored (they only carry the shape, checked).
- Engine.from_artifact opens a BACKEND=npu artifact through `open_npu_engine` (TP > 1 included:
  one follower process per NPU, `follower_main`).
- Not done: async execution on a stream, outputs left on the device.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import torch

from ..errors import ArtifactError

NPU_MANIFEST = "npu_manifest.json"
ACL_MEM_MALLOC_HUGE_FIRST = 0
ACL_MEMCPY_HOST_TO_DEVICE = 1
ACL_MEMCPY_DEVICE_TO_HOST = 2
NP_DTYPES = {"float16": np.float16, "float32": np.float32, "int64": np.int64, "int32": np.int32, "bool": np.bool_,
             "bfloat16": np.uint16}      # numpy has no bf16: its bits travel as uint16
MANIFEST_DTYPES = {"fp16": "float16", "fp32": "float32", "bf16": "bfloat16"}


def _to_np(t: torch.Tensor, dtype: str) -> np.ndarray:
    t = t.detach().cpu().to(getattr(torch, dtype)).contiguous()
    return (t.view(torch.uint16) if dtype == "bfloat16" else t).numpy()


def _from_np(a: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def _base(v):
    return None if v is None else str(v).split("+")[0]


def box_versions() -> dict:
    """torch, torch_npu (None when not installed: the .om path does not need it) and CANN of this box."""
    import importlib.util
    npu = None
    if importlib.util.find_spec("torch_npu") is not None:
        try:
            from importlib.metadata import version
            npu = version("torch_npu")
        except Exception:
            npu = "unknown"
    return {"torch": _base(torch.__version__), "torch_npu": _base(npu), "cann": cann_version()}


def cann_version() -> str | None:
    """The CANN toolkit's version from the install info that set_env.sh points at (UNCONFIRMED file
    layout: <ASCEND_TOOLKIT_HOME>/<arch>-linux/ascend_toolkit_install.info, `version=...`). Here, not
    in compile/, because the NPU box runs the runtime alone."""
    import os
    for var in ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH"):
        home = os.environ.get(var)
        if not home:
            continue
        for info in sorted(Path(home).glob("*/ascend_toolkit_install.info")) + sorted(Path(home).glob("version.cfg")):
            for line in info.read_text(errors="replace").splitlines():
                if line.strip().startswith(("version=", "Version=")):
                    return line.split("=", 1)[1].strip()
    return None


def check_npu_manifest(manifest: dict, versions: dict, soc: str | None) -> None:
    """Refuse, in one line, an artifact built for another SoC or another torch / torch_npu / CANN."""
    if manifest.get("backend") != "npu":
        raise ArtifactError(f"not a BACKEND=npu artifact (backend {manifest.get('backend')!r})")
    want = manifest.get("versions", {})
    for key, what in (("torch", "torch"), ("torch_npu", "torch_npu"), ("cann", "CANN")):
        w, h = _base(want.get(key)), _base(versions.get(key))
        if key == "torch_npu" and h is None:
            continue                    # not installed on the box: the ACL path does not use it
        if w is not None and h is not None and w != h:
            raise ArtifactError(f"this artifact was built with {what} {w}, this box has {what} {h}: re-compile "
                                f"it with {what} {h} (make compile BACKEND=npu ...) or install {what} {w}")
        if key == "cann" and w is not None and h is None:
            raise ArtifactError(f"this artifact's .om files were built with CANN {w}; no CANN toolkit found on this box "
                                f"($ASCEND_TOOLKIT_HOME unset): `source <CANN {w}>/set_env.sh` first")
    if soc is not None and manifest.get("soc") != soc:
        raise ArtifactError(f"this artifact was built for SoC {manifest.get('soc')}, this box's NPU is {soc}: "
                            f"re-compile with SOC={soc}")
    if not manifest.get("om_built"):
        missing = [g["om"] for r in manifest["ranks"] for g in r["graphs"].values() if not g.get("om")]
        if missing:
            raise ArtifactError("this artifact has no .om files yet: run its atc_commands.sh on a machine with the "
                                "CANN toolkit, then set om_built in npu_manifest.json")


def import_acl():
    try:
        import acl  # (pyACL, from the CANN toolkit)
    except ImportError as e:
        raise ArtifactError(f"running a BACKEND=npu artifact needs pyACL (`import acl`) from the CANN toolkit: {e}")
    return acl


def _check(ret, what):
    if ret != 0:
        raise RuntimeError(f"ACL {what} failed with error {ret}")


class NpuSession:
    """One rank's device, stream, KV pool and loaded .om models."""

    def __init__(self, acl, artifact: Path, manifest: dict, rank: int, device_id: int):
        self.acl, self.dir, self.manifest, self.rank, self.device_id = acl, Path(artifact), manifest, rank, device_id
        self.lock = threading.Lock()        # threads sharing a model_id serialise execute (reference §3)
        self.models: dict[str, int] = {}
        self.pool: list[tuple[int, int]] = []   # (device pointer, bytes) for k_cache, v_cache

    @classmethod
    def open(cls, artifact, rank: int = 0, device_id: int | None = None, acl=None, check_versions: bool = True):
        artifact = Path(artifact)
        manifest = json.loads((artifact / NPU_MANIFEST).read_text())
        acl = acl if acl is not None else import_acl()
        device_id = rank if device_id is None else device_id
        _check(acl.init(), "init")
        _check(acl.rt.set_device(device_id), "rt.set_device")
        if check_versions:
            check_npu_manifest(manifest, box_versions(), acl.get_soc_name())
        s = cls(acl, artifact, manifest, rank, device_id)
        s.context, ret = acl.rt.create_context(device_id)
        _check(ret, "rt.create_context")
        s._alloc_pool()
        s.graphs = {name: OmGraph(s, name, g) for name, g in manifest["ranks"][rank]["graphs"].items()}
        return s

    def _alloc_pool(self):
        rows = next((g["inputs"] for g in self.manifest["ranks"][self.rank]["graphs"].values()
                     if any(r.get("kv_pool") for r in g["inputs"])), [])
        for row in (r for r in rows if r.get("kv_pool")):
            nbytes = int(np.prod(row["shape"])) * np.dtype(NP_DTYPES[row["dtype"]]).itemsize
            ptr, ret = self.acl.rt.malloc(nbytes, ACL_MEM_MALLOC_HUGE_FIRST)
            _check(ret, "rt.malloc (KV pool)")
            _check(self.acl.rt.memset(ptr, nbytes, 0, nbytes), "rt.memset (KV pool)")
            self.pool.append((ptr, nbytes))

    def close(self):
        if getattr(self, "closed", False):
            return
        self.closed = True
        acl = self.acl
        for g in getattr(self, "graphs", {}).values():
            g.close()
        for ptr, _ in self.pool:
            acl.rt.free(ptr)
        self.pool = []
        acl.rt.destroy_context(self.context)
        acl.rt.reset_device(self.device_id)
        acl.finalize()


class OmGraph:
    """One .om, loaded once; called like the compiled graphs: (*inputs, k_cache, v_cache) -> logits."""

    def __init__(self, session: NpuSession, name: str, entry: dict):
        acl = session.acl
        self.s, self.name, self.inputs = session, name, entry["inputs"]
        path = str(session.dir / entry["om"]) if entry.get("om") else None
        if path is None:
            raise ArtifactError(f"graph {name} has no .om (run atc_commands.sh)")
        self.model_id, ret = acl.mdl.load_from_file(path)
        _check(ret, f"mdl.load_from_file({path})")
        self.desc = acl.mdl.create_desc()
        _check(acl.mdl.get_desc(self.desc, self.model_id), "mdl.get_desc")
        n_in = acl.mdl.get_num_inputs(self.desc)
        if n_in != len(self.inputs):
            raise ArtifactError(f"{path} takes {n_in} inputs, the manifest lists {len(self.inputs)}: re-compile")
        # Device buffers for the per-call inputs and the output, allocated once; the pool is bound as is.
        self.in_bufs = []
        pool = iter(session.pool)
        for i, row in enumerate(self.inputs):
            if row.get("kv_pool"):
                self.in_bufs.append((*next(pool), True))
            else:
                size = acl.mdl.get_input_size_by_index(self.desc, i)
                ptr, ret = acl.rt.malloc(size, ACL_MEM_MALLOC_HUGE_FIRST)
                _check(ret, "rt.malloc (input)")
                self.in_bufs.append((ptr, size, False))
        self.in_ds = acl.mdl.create_dataset()
        for ptr, size, _ in self.in_bufs:
            _, ret = acl.mdl.add_dataset_buffer(self.in_ds, acl.create_data_buffer(ptr, size))
            _check(ret, "mdl.add_dataset_buffer (input)")
        self.out_size = acl.mdl.get_output_size_by_index(self.desc, 0)
        self.out_ptr, ret = acl.rt.malloc(self.out_size, ACL_MEM_MALLOC_HUGE_FIRST)
        _check(ret, "rt.malloc (output)")
        self.out_ds = acl.mdl.create_dataset()
        _, ret = acl.mdl.add_dataset_buffer(self.out_ds, acl.create_data_buffer(self.out_ptr, self.out_size))
        _check(ret, "mdl.add_dataset_buffer (output)")

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        acl = self.s.acl
        if len(args) != len(self.inputs):
            raise ValueError(f"{self.name}: {len(args)} inputs, expected {len(self.inputs)}")
        with self.s.lock:
            for t, row, (ptr, size, is_pool) in zip(args, self.inputs, self.in_bufs):
                if list(t.shape) != list(row["shape"]):
                    raise ValueError(f"{self.name}: input {row['name']} has shape {list(t.shape)}, "
                                     f"the .om takes {row['shape']}")
                if is_pool:
                    continue                    # the device pool, bound once, written in place by the graph
                arr = _to_np(t, row["dtype"])
                _check(acl.rt.memcpy(ptr, size, acl.util.numpy_to_ptr(arr), arr.nbytes, ACL_MEMCPY_HOST_TO_DEVICE),
                       f"rt.memcpy {row['name']}")
            _check(acl.mdl.execute(self.model_id, self.in_ds, self.out_ds), f"mdl.execute {self.name}")
            dt = MANIFEST_DTYPES[self.s.manifest["dtype"]]
            out = np.empty(self.out_size // np.dtype(NP_DTYPES[dt]).itemsize, dtype=NP_DTYPES[dt])
            _check(acl.rt.memcpy(acl.util.numpy_to_ptr(out), out.nbytes, self.out_ptr, self.out_size,
                                 ACL_MEMCPY_DEVICE_TO_HOST), "rt.memcpy (output)")
        return _from_np(out, dt).view(self._out_shape(args))

    def _out_shape(self, args):
        name = self.name
        if name.startswith("vision"):
            return (args[0].shape[0], -1, self.s.manifest["model"]["config"]["llm"]["hidden_size"])
        rows = 1 if name.startswith("prefill") else args[0].shape[0]
        return (rows, -1)

    def close(self):
        acl = self.s.acl
        acl.mdl.unload(self.model_id)
        acl.mdl.destroy_desc(self.desc)
        for ptr, _, is_pool in self.in_bufs:
            if not is_pool:
                acl.rt.free(ptr)
        acl.rt.free(self.out_ptr)
        acl.mdl.destroy_dataset(self.in_ds)
        acl.mdl.destroy_dataset(self.out_ds)


def rank_devices(tp: int, visible: str | None) -> list[str]:
    """The physical NPU of each rank: rank r takes the r-th of rank 0's ASCEND_RT_VISIBLE_DEVICES
    (all devices, 0..tp-1, when unset). One line when there are fewer than tp."""
    devices = [d.strip() for d in visible.split(",") if d.strip()] if visible else [str(r) for r in range(tp)]
    if len(devices) < tp:
        raise ArtifactError(f"this TP={tp} artifact needs {tp} NPUs, ASCEND_RT_VISIBLE_DEVICES={visible} names "
                            f"{len(devices)}: name {tp} devices or compile with TP={len(devices)}")
    return devices[:tp]


def _runtime_manifest(manifest: dict) -> dict:
    """The manifest as the TP runtime reads it: the .om graphs' collectives are HCCL ops of their
    own (torchair's HcomAllReduce), not torch.distributed's group, so its name is not checked."""
    return dict(manifest, tp_group=None)


def open_npu_engine(artifact, acl=None, check_versions: bool = True, device_id: int = 0):
    """An Engine over a BACKEND=npu artifact's .om graphs (never run on an NPU by us).

    The engine's block allocator must cover exactly the graphs' fixed pool (kv_pool.num_blocks), so
    its budget is sized to that; its host pool only carries the shape (the device pool is the one
    the graphs use), which costs one pool's worth of host memory per rank.

    TP > 1: one process per NPU. Rank 0 (this process) opens rank0/ on its first visible device;
    follower r is `python -m internvl_aot.runtime.backends.npu --rank r --device <r-th device>`,
    started by runtime/tp.py's RankGroup, which sets ASCEND_RT_VISIBLE_DEVICES to that one device
    (so it opens logical device 0), RANK_ID and RANK_SIZE before pyACL is imported, opens its own
    session on rank<r>/, and runs the graphs rank 0 runs (runtime/tp_worker.py `follow`); the
    step commands travel over gloo on the host, the graphs' all-reduces over HCCL inside the .om.
    What HCCL itself needs there (a rank table, torchair's model_relation_config.json) is
    UNCONFIRMED: never run on NPUs by us."""
    from ..engine import Engine
    from ..kv_cache import GiB, KVPool
    from ..spec import RuntimeSpec
    from ..tokenizer import Tokenizer
    artifact = Path(artifact).resolve()
    manifest = _runtime_manifest(json.loads((artifact / NPU_MANIFEST).read_text()))
    tp = int(manifest.get("tp", 1))
    spec = RuntimeSpec.from_dict(manifest)
    blocks = manifest["kv_pool"]["num_blocks"]
    per_block = KVPool.bytes_per_block(spec.llm.num_layers, spec.rank_kv_heads, spec.llm.head_dim,
                                       spec.buckets.block_size, spec.torch_dtype)
    group = session = None
    acl = acl if acl is not None else import_acl()      # before any follower is started
    if tp > 1:
        import os
        import sys

        from ..tp import RankGroup
        devices = rank_devices(tp, os.environ.get("ASCEND_RT_VISIBLE_DEVICES"))
        group = RankGroup(manifest, torch.device("cpu"))
        group.launch(lambda r, addr, port: [
            sys.executable, "-m", "internvl_aot.runtime.backends.npu", "--artifact", str(artifact), "--rank", str(r),
            "--device", devices[r], "--master-addr", addr, "--master-port", str(port),
            "--parent-pid", str(os.getpid())] + ([] if check_versions else ["--no-version-check"]), dict(os.environ))
    try:
        session = NpuSession.open(artifact, 0, device_id, acl=acl, check_versions=check_versions)
        graphs = session.graphs
        if group is not None:
            group.wait_loaded()
            graphs = group.wrap(graphs)
        engine = Engine(manifest, graphs, Tokenizer.from_dir(artifact / manifest["tokenizer_dir"]), "cpu",
                        kv_cache_gb=(blocks + 0.5) * per_block / GiB, tp_group=group)
        if engine.allocator.num_blocks != blocks:
            raise ArtifactError(f"the engine's KV pool has {engine.allocator.num_blocks} blocks, the .om graphs "
                                f"take {blocks}")
    except BaseException:
        if group is not None:
            group.stop()
        if session is not None:
            session.close()
        raise
    engine.npu_session = session
    engine.resources.append(session)
    return engine


def follower_main(argv=None) -> int:
    """A follower rank of a TP>1 BACKEND=npu artifact, on its own NPU (started by open_npu_engine)."""
    import argparse
    import os
    import signal
    ap = argparse.ArgumentParser(prog="python -m internvl_aot.runtime.backends.npu")
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--device", required=True, help="the physical NPU (becomes ASCEND_RT_VISIBLE_DEVICES)")
    ap.add_argument("--master-addr", required=True)
    ap.add_argument("--master-port", type=int, required=True)
    ap.add_argument("--parent-pid", type=int, required=True)
    ap.add_argument("--no-version-check", action="store_true")
    args = ap.parse_args(argv)
    from ..tp_worker import run_follower, watch_parent
    watch_parent(args.parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    manifest = _runtime_manifest(json.loads((Path(args.artifact) / NPU_MANIFEST).read_text()))
    # Before pyACL is imported (NpuSession.open): this process sees its one NPU as device 0.
    os.environ["ASCEND_RT_VISIBLE_DEVICES"] = args.device
    os.environ["RANK_ID"], os.environ["RANK_SIZE"] = str(args.rank), str(manifest.get("tp", 1))
    torch.set_num_threads(1)            # the host side only copies inputs and outputs
    sessions = []

    def load():
        sessions.append(NpuSession.open(args.artifact, args.rank, 0, check_versions=not args.no_version_check))
        return sessions[0].graphs
    run_follower(manifest, args.rank, args.master_addr, args.master_port, torch.device("cpu"), load,
                 close=lambda: [s.close() for s in sessions])
    return 0


if __name__ == "__main__":
    raise SystemExit(follower_main())
