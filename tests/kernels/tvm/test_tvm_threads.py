"""TVM's CPU thread pool: as many workers as torch's threads, unless the user says otherwise.

TVM sizes the pool at its first parallel loop, from ``TVM_NUM_THREADS``/``OMP_NUM_THREADS`` or
else half the logical CPUs (on x86): one worker on a 2-core machine without SMT, where torch's
SDPA runs on two. Each case is a fresh process, since a process sizes its pool once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, os, sys, torch
torch.set_num_threads(int(sys.argv[1]))
import tvm_ffi
import twilight as tw
from twilight.compiler import ir
from twilight.compiler.backend import CPU_THREADS

pipe, shape = tw.builtins.quest_twilight(32, p=0.9), ir.Shape(4, 2, 32, 16, "float32")
workers = []
for schedule in json.loads(sys.argv[2]):  # one served step a schedule, in turn
    ctx = schedule.pop("context_threads", 0)  # CPU_THREADS around the step
    dec = tw.load(pipe, device="cpu", shape=shape, backend="tvm", schedule=schedule)
    cache = dec.make_cache(initial_pages=8)
    ids = cache.add_requests(2)
    cache.append(torch.randn(2, 2, 40, 32), torch.randn(2, 2, 40, 32), ids)
    token = CPU_THREADS.set(ctx)
    assert dec.run(torch.randn(2, 4, 32), cache, ids).isfinite().all()
    CPU_THREADS.reset(token)
    workers.append(tvm_ffi.get_global_func("runtime.NumThreads")())
if len(sys.argv) > 3:  # then a step from another Python thread: its own pool, configured too
    import threading
    def other():
        token = CPU_THREADS.set(int(sys.argv[3]))
        assert dec.run(torch.randn(2, 4, 32), cache, ids).isfinite().all()
        CPU_THREADS.reset(token)
        workers.append(tvm_ffi.get_global_func("runtime.NumThreads")())
    t = threading.Thread(target=other)
    t.start()
    t.join()
print(json.dumps({"workers": workers, "spin": os.environ.get("TVM_THREAD_POOL_SPIN_COUNT")}))
"""


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    """One kernel cache for every process of this file (one compile per schedule)."""
    return str(tmp_path_factory.mktemp("kernels"))


def _run(kernels: str, torch_threads: int, schedules: list[dict], *extra: str, **env) -> dict:
    """The pool's workers in use after each schedule's step, in a fresh process, and TVM's
    spin count there."""
    clean = {k: v for k, v in os.environ.items()
             if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "TVM_THREAD_POOL_SPIN_COUNT")}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(torch_threads),
                           json.dumps(schedules), *extra],
                          env={**clean, "TWILIGHT_CACHE_DIR": kernels, **env},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _workers(kernels: str, torch_threads: int, schedules: list[dict], **env) -> list[int]:
    return _run(kernels, torch_threads, schedules, **env)["workers"]


def test_the_pool_has_torchs_threads_and_a_schedule_or_the_context_uses_fewer(kernels):
    # TVM's own default would be 1 on this project's 2-core machine, whatever torch runs on
    got = _run(kernels, 2, [{}, {"threads": 1}, {}, {"threads": 8},
                            {"context_threads": 1}, {"threads": 1, "context_threads": 2}, {},
                            {"context_threads": 1}], "1")
    # the last: a step from another Python thread, which has a pool of its own (its whole pool
    # until configured), asking for 1 as this thread's last step did
    assert got["workers"] == [2, 1, 2, 2, 1, 2, 2, 1, 1]
    assert got["spin"] == "3000"  # not TVM's 300,000: asleep before torch's next op


def test_the_users_variables_win(kernels):
    got = _run(kernels, 2, [{}], TVM_NUM_THREADS="1", TVM_THREAD_POOL_SPIN_COUNT="5000")
    assert got == {"workers": [1], "spin": "5000"}
    assert _workers(kernels, 1, [{}], OMP_NUM_THREADS="2") == [2]


@pytest.mark.parametrize(("env", "threads", "want"), [
    ({"TVM_NUM_THREADS": "2"}, 0, 2),  # 2 rows (1 request × 2 KV heads): two a thread
    ({"TVM_NUM_THREADS": "2"}, 8, 2),  # a schedule's threads past the pool run on the pool
    ({"TVM_NUM_THREADS": "4"}, 1, 1),
    ({"OMP_NUM_THREADS": "3"}, 0, 3),  # the pool TVM sizes from OMP_NUM_THREADS
    ({"TVM_NUM_THREADS": "4", "cpu": 1}, 0, 1),  # inside a model: the threads it runs on
    ({"TVM_NUM_THREADS": "4", "cpu": 2}, 8, 2),  # ... over the schedule's
    ({"TVM_NUM_THREADS": "2", "cpu": 3}, 0, 2),  # ... at most the pool
])
def test_splits_fill_the_pool_the_loops_run_on(monkeypatch, env, threads, want):
    from types import SimpleNamespace

    from twilight.compiler.backend import CPU_THREADS
    from twilight.compiler.tvm.pipeline import splits_for
    env = dict(env)
    cpu = env.pop("cpu", 0)
    for var in ("TVM_NUM_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    token = CPU_THREADS.set(cpu)
    try:
        assert splits_for(SimpleNamespace(sched={"threads": threads}, HKV=2), 1) == want
    finally:
        CPU_THREADS.reset(token)


def test_threads_at_or_past_the_pool_do_not_reconfigure_it(monkeypatch):
    """A schedule's ``threads`` at or past the pool runs on the whole pool, as 0 does: layers
    alternating such schedules must not reconfigure TVM's pool on every call."""
    import threading

    import tvm_ffi

    from twilight.compiler.tvm import build
    calls, real = [], tvm_ffi.get_global_func

    def spy(name, *a, **k):
        if name == "runtime.config_threadpool":
            return lambda *args: calls.append(args)
        return real(name, *a, **k)
    monkeypatch.setattr(tvm_ffi, "get_global_func", spy)
    pool = build._pool_size()

    def steps():  # a fresh Python thread: its own TVM pool, last asked for 0
        for n in (0, pool + 2, 0, pool, pool + 6, 0, 1, 1, 0):
            build.set_threads(n)
    t = threading.Thread(target=steps)
    t.start()
    t.join()
    assert calls == ([(1, 1), (1, 0)] if pool > 1 else [])
