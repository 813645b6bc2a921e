"""The proof's workload: submitted to the appliance as an experiment, run in a slot as the slot's
unprivileged account by the box's own python (runner.python), so it imports nothing of ours.

It looks at the GPUs it is given through the CUDA driver API by ctypes (libcuda.so.1: no framework
needed), then through PyTorch when the box has it, and ends with one line `PROOF {json}` that
tests/gpu/drive.py reads back from the job's output:

    python workload.py probe [--busy S] [--hold-bytes N]   what CUDA and PyTorch see; keep the GPU
                                                           busy S seconds (for /metrics)
    python workload.py hold --bytes N --seconds S          take N bytes of GPU memory, hold them S s
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time

CUDA_SUCCESS = 0


class CudaError(Exception):
    pass


class Cuda:
    """The few CUDA driver API calls the proof needs, through ctypes."""

    def __init__(self):
        self.lib = ctypes.CDLL("libcuda.so.1")

    def _fn(self, *names):
        for name in names:  # the _v2 entry points are the ones CUDA headers map the plain names to
            fn = getattr(self.lib, name, None)
            if fn is not None:
                return name, fn
        raise CudaError(f"libcuda.so.1 has none of {', '.join(names)}")

    def call(self, names, *args):
        name, fn = self._fn(*names) if isinstance(names, tuple) else self._fn(names)
        rc = fn(*args)
        if rc != CUDA_SUCCESS:
            text = ctypes.c_char_p()
            err = getattr(self.lib, "cuGetErrorName", None)
            if err is not None and err(rc, ctypes.byref(text)) == 0 and text.value:
                raise CudaError(f"{name} failed: {text.value.decode()} ({rc})")
            raise CudaError(f"{name} failed: CUDA error {rc}")

    def probe(self, nbytes: int) -> dict:
        out: dict = {}
        self.call("cuInit", 0)
        version = ctypes.c_int()
        self.call("cuDriverGetVersion", ctypes.byref(version))
        out["driver_version"] = version.value
        count = ctypes.c_int()
        self.call("cuDeviceGetCount", ctypes.byref(count))
        out["device_count"] = count.value
        out["uuids"] = []
        for i in range(count.value):
            dev = ctypes.c_int()
            self.call("cuDeviceGet", ctypes.byref(dev), i)
            raw = (ctypes.c_ubyte * 16)()
            self.call(("cuDeviceGetUuid_v2", "cuDeviceGetUuid"), ctypes.byref(raw), dev)
            out["uuids"].append(format_uuid(bytes(raw)))
        if count.value == 0:
            return out
        dev = ctypes.c_int()
        self.call("cuDeviceGet", ctypes.byref(dev), 0)
        ctx = ctypes.c_void_p()
        self.call(("cuCtxCreate_v2", "cuCtxCreate"), ctypes.byref(ctx), 0, dev)
        try:
            ptr = ctypes.c_uint64()
            self.call(("cuMemAlloc_v2", "cuMemAlloc"), ctypes.byref(ptr), ctypes.c_size_t(nbytes))
            try:
                pattern = bytes(range(256)) * 4096  # 1 MiB, copied to the device and back
                host = ctypes.create_string_buffer(pattern, len(pattern))
                back = ctypes.create_string_buffer(len(pattern))
                self.call(("cuMemcpyHtoD_v2", "cuMemcpyHtoD"), ptr, host, ctypes.c_size_t(len(pattern)))
                self.call(("cuMemcpyDtoH_v2", "cuMemcpyDtoH"), back, ptr, ctypes.c_size_t(len(pattern)))
                out["allocated_bytes"] = nbytes
                out["copy_ok"] = back.raw == pattern
            finally:
                self.call(("cuMemFree_v2", "cuMemFree"), ptr)
        finally:
            self.call(("cuCtxDestroy_v2", "cuCtxDestroy"), ctx)
        return out

    def hold(self, nbytes: int, seconds: float) -> dict:
        """Take nbytes of device memory (in 1 GiB pieces) and keep it for `seconds`."""
        self.call("cuInit", 0)
        dev = ctypes.c_int()
        self.call("cuDeviceGet", ctypes.byref(dev), 0)
        ctx = ctypes.c_void_p()
        self.call(("cuCtxCreate_v2", "cuCtxCreate"), ctypes.byref(ctx), 0, dev)
        taken, piece = 0, 1 << 30
        while taken < nbytes:
            ptr = ctypes.c_uint64()
            size = min(piece, nbytes - taken)
            self.call(("cuMemAlloc_v2", "cuMemAlloc"), ctypes.byref(ptr), ctypes.c_size_t(size))
            self.call(("cuMemsetD8_v2", "cuMemsetD8"), ptr, ctypes.c_ubyte(1), ctypes.c_size_t(size))
            taken += size
        emit({"event": "holding", "bytes": taken, "t": time.time()})
        time.sleep(seconds)
        return {"held_bytes": taken}


def format_uuid(raw: bytes) -> str:
    """16 bytes of CUuuid as NVML and CUDA_VISIBLE_DEVICES write them: GPU-8-4-4-4-12 hex."""
    h = raw.hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def torch_probe(nbytes: int, busy_s: float) -> dict:
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - any import failure means: no PyTorch here
        return {"missing": f"{type(e).__name__}: {e}"}
    out = {"version": torch.__version__, "cuda_available": torch.cuda.is_available(),
           "device_count": torch.cuda.device_count()}
    if not out["cuda_available"] or out["device_count"] == 0:
        return out
    props = torch.cuda.get_device_properties(0)
    uuid = getattr(props, "uuid", None)
    out["name"] = props.name
    out["uuid"] = None if uuid is None else (str(uuid) if str(uuid).startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
    x = torch.arange(nbytes // 4, dtype=torch.float32, device="cuda")
    out["copy_ok"] = bool(torch.equal(x[:1 << 20].cpu(), torch.arange(1 << 20, dtype=torch.float32)))
    out["allocated_bytes"] = x.numel() * 4
    if busy_s > 0:
        a = torch.randn(4096, 4096, device="cuda")
        end, n = time.time() + busy_s, 0
        while time.time() < end:
            for _ in range(20):
                a = torch.tanh(a @ a)  # tanh keeps it finite
            torch.cuda.synchronize()
            n += 20
        out["busy_matmuls"] = n
    return out


def emit(record: dict) -> None:
    print("PROOF " + json.dumps(record), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="mode", required=True)
    probe = sub.add_parser("probe")
    probe.add_argument("--busy", type=float, default=0.0)
    probe.add_argument("--bytes", type=int, default=256 << 20)
    hold = sub.add_parser("hold")
    hold.add_argument("--bytes", type=int, required=True)
    hold.add_argument("--seconds", type=float, default=20.0)
    args = p.parse_args(argv)
    record = {"mode": args.mode, "t_start": time.time(), "pid": os.getpid(), "uid": os.getuid(),
              "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
              "share_env": os.environ.get("APPLIANCE_GPU_MEMORY_BYTES"), "python": sys.executable}
    emit({"event": "started", "t": record["t_start"]})
    try:
        cuda = Cuda()
    except OSError as e:
        cuda, record["cuda"] = None, {"error": f"no libcuda.so.1: {e}"}
    if cuda is not None:
        try:
            record["cuda"] = cuda.probe(args.bytes) if args.mode == "probe" else cuda.hold(args.bytes, args.seconds)
        except CudaError as e:
            record["cuda"] = {"error": str(e)}
    if args.mode == "hold" and "error" in record["cuda"]:
        time.sleep(min(args.seconds, 20.0))  # still a job that lasts (a rehearsal's fake NVML lists it)
    if args.mode == "probe":
        try:
            record["torch"] = torch_probe(args.bytes, args.busy)
        except Exception as e:  # noqa: BLE001 - reported, judged by the proof
            record["torch"] = {"error": f"{type(e).__name__}: {e}"}
    record["t_end"] = time.time()
    emit(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
