"""Device profiles: named presets of what a GPU (or the CPU) can do.

The tuner prunes illegal schedules with these before anything is compiled, and benchmarks use
the bandwidth to report a roofline. Figures are the vendors' published numbers for the common
SKU (dense fp16/bf16 tensor throughput, HBM/GDDR bandwidth, max shared memory per block).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import InputError


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    kind: str  # "cuda" | "cpu"
    arch: str  # "sm_90", "sm_80", ... or "x86_64"/"aarch64"
    sm_count: int  # streaming multiprocessors, or CPU cores
    smem_per_block: int  # bytes (opt-in maximum); 0 for CPU
    regs_per_sm: int  # 32-bit registers; 0 for CPU
    max_threads_per_block: int
    bandwidth_gbs: float  # memory bandwidth, GB/s (0 = measure at run time)
    peak_tflops: float  # dense fp16 tensor TFLOP/s (CPU: 0)
    match: tuple[str, ...] = ()  # substrings of torch.cuda.get_device_name()

    @property
    def target(self) -> str:
        return f"cuda:{self.arch}" if self.kind == "cuda" else "llvm"


PROFILES: dict[str, DeviceProfile] = {p.name: p for p in (
    DeviceProfile("a100", "cuda", "sm_80", 108, 166912, 65536, 1024, 2039.0, 312.0, ("A100",)),
    DeviceProfile("h100", "cuda", "sm_90", 132, 232448, 65536, 1024, 3350.0, 989.0, ("H100",)),
    DeviceProfile("h200", "cuda", "sm_90", 132, 232448, 65536, 1024, 4800.0, 989.0, ("H200",)),
    DeviceProfile("l40s", "cuda", "sm_89", 142, 101376, 65536, 1024, 864.0, 362.0, ("L40S",)),
    DeviceProfile("rtx4090", "cuda", "sm_89", 128, 101376, 65536, 1024, 1008.0, 165.0,
                  ("4090",)),
    DeviceProfile("cpu", "cpu", os.uname().machine, os.cpu_count() or 1, 0, 0, 1, 0.0, 0.0),
)}


class DeviceError(InputError):
    """A device name that is unknown, or names a device this machine does not have."""


def present_device() -> DeviceProfile:
    """The profile of the device this process would run on: the first CUDA GPU, or the CPU."""
    try:
        import torch
        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
            for p in PROFILES.values():
                if any(m in name for m in p.match):
                    return p
            major, minor = torch.cuda.get_device_capability(0)
            props = torch.cuda.get_device_properties(0)
            return DeviceProfile(name.lower().replace(" ", "_"), "cuda", f"sm_{major}{minor}",
                                 props.multi_processor_count, 0, 0, 1024, 0.0, 0.0)
    except Exception:  # no usable CUDA: the CPU it is
        pass
    return PROFILES["cpu"]


def resolve_device(name: str, allow_absent: bool = False) -> DeviceProfile:
    """The profile for ``name`` (``auto`` = the device present). Naming a device that is not
    present is an error that says what is present, unless ``allow_absent``."""
    present = present_device()
    if name == "auto":
        return present
    if name not in PROFILES:
        raise DeviceError(f"unknown device {name!r}; known: {', '.join(PROFILES)}, auto")
    want = PROFILES[name]
    if want.name != present.name and not allow_absent:
        here = present.name if present.name in PROFILES else "auto"
        raise DeviceError(f"device {name!r}: this machine has {present.name} "
                          f"({present.kind}, {present.arch}), not {name}; run on a machine "
                          f"with that device, or name {here}")
    return want
