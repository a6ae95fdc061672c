"""Device profiles: presets, detection of the device present, clear errors."""

from __future__ import annotations

import pytest

from twilight.schedules.devices import PROFILES, DeviceError, present_device, resolve_device


def test_presets_are_sane():
    for name in ("a100", "h100", "h200", "l40s", "rtx4090", "cpu"):
        p = PROFILES[name]
        assert p.name == name and p.sm_count > 0
        if p.kind == "cuda":
            assert p.arch.startswith("sm_") and p.smem_per_block > 48 * 1024
            assert p.bandwidth_gbs > 500 and p.target == f"cuda:{p.arch}"
    assert PROFILES["h200"].bandwidth_gbs > PROFILES["h100"].bandwidth_gbs


def test_auto_is_the_present_device_and_absent_gpu_is_a_clear_error():
    present = present_device()
    assert resolve_device("auto") == present
    if present.kind == "cpu":
        with pytest.raises(DeviceError, match="this machine has cpu"):
            resolve_device("a100")
        assert resolve_device("a100", allow_absent=True).arch == "sm_80"
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("tpu9")
