"""The search: Optuna over a backend's declared schedule space, one study per shape bucket.

Space (``schedules.space``), search (this module) and store (``runtime.store.tuning_log``) are three
separate pieces. Each trial: draw a schedule (conditional parameters only when active), claim
it in the study (``claims``: a schedule that another trial holds is never measured twice),
reject illegal ones for the device before compiling, lower, pass the correctness gate against
the torch reference, then time it exactly as serving runs it: a ``DecodePipeline`` around the
lowered kernels, ``plan`` once, ``run`` per step (median of repeats) — the path ``twilight.load``
hands out and ``twilightc eval --backend`` times, so the tuned figure and eval's agree. Compile
failures and gate failures are recorded on the trial (user attrs ``error`` / ``gate``) and never
become winners.

The data: real attention when ``TuneConfig.snapshots`` names snapshot layers (every problem of
the bucket's snapshots, timed one after the other; the trial's figure is their sum, as eval
sums its layers), else the synthetic problem of ``evaluation.problems.make_problem``.

Studies live in real storage (``storage``) — a journal file by default, SQLite or any RDB URL
(PostgreSQL lets many machines tune one study) — so a killed tune resumes: finished trials
count toward the budget and are not rerun; a trial that was running when its process died is
failed and its schedule enqueued again. ``TuneConfig.trials`` is the study's budget, shared by
every process tuning it: two machines asked for 8 trials measure 8 schedules between them.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import optuna
from optuna.trial import TrialState

from ... import knobs
from ...compiler import ir
from ...compiler.backend import Target, get_backend
from ...errors import TwilightError
from ...schedules.devices import DeviceProfile
from ...schedules.space import Space
from ..evaluation.measure import (
    Problem,
    correctness_gate,
    make_problem,
    served_ms,
    snapshot_bucket,
    snapshot_problem,
)
from ..evaluation.problems import SYNTHETIC_VERSION
from ..evaluation.snapshot import Snapshot
from ..serving.load import DecodePipeline
from ..store.tuning_log import ShapeBucket
from .claims import DUPLICATE, RETRIED, claim, taken_schedules, tally
from .storage import StorageError, open_storage

__all__ = ["GateFailed", "Objective", "StorageError", "TuneConfig", "best_trial",
           "bucket_problems", "default_trial", "finished_count", "make_sampler", "open_storage",
           "recover_stale_trials", "study_name", "tune_bucket"]

# a failing trial is a result (its error is on the trial, and the summary says why none
# passed): Optuna's per-trial warning with a traceback is shown with TWILIGHT_DEBUG=1 only
optuna.logging.set_verbosity(optuna.logging.ERROR)

WAIT_FOR_OTHERS_S = 600.0  # longest wait for other processes' last trials before logging


@dataclass
class TuneConfig:
    pipeline: ir.PipelineIR
    shape: ir.Shape
    buckets: list[ShapeBucket]
    backend: str
    device: DeviceProfile
    trials: int = 24  # per shape bucket, in all: every process sharing the study together
    timeout: float | None = None
    storage: str | None = None
    sampler: str = "tpe"
    seed: int = 0
    repeats: int = 10
    warm_start: list[dict] = field(default_factory=list)
    snapshots: list[tuple[Snapshot, list[int]]] = field(default_factory=list)
    """Real data: (snapshot, layer slots) pairs; empty → the synthetic problem."""
    dense_trials: int = 8
    """Trials for the dense fallback's schedule (0: its logged or default schedule)."""

    @property
    def data_tag(self) -> str:
        """What the trials measure on, short: ``synthetic`` or ``snap<hash of names, shapes
        and layers>`` (studies of different data never mix)."""
        if not self.snapshots:
            return f"synthetic{SYNTHETIC_VERSION}"
        desc = repr([(os.path.basename(s.path), tuple(s.q.shape), s.context, list(ls))
                     for s, ls in self.snapshots])
        return "snap" + hashlib.sha256(desc.encode()).hexdigest()[:8]

    def describe_data(self, bucket: ShapeBucket) -> str:
        """What a bucket is measured on, for the tuning log and the printout."""
        if not self.snapshots:
            return f"synthetic: log-normal attention, seed {self.seed}"
        parts = [f"{os.path.basename(s.path)} layers {[s.layers[i] for i in ls]}"
                 for s, ls in self.snapshots if snapshot_bucket(s) == bucket]
        return "snapshot: " + "; ".join(parts)

    @property
    def target(self) -> Target:
        """Where the backend serves this device (``Backend.serving_target``); on a device it
        does not serve, the target it runs on in this process (``local_target``: Triton's
        interpreter with ``TRITON_INTERPRET=1`` — for tests, tiny shapes)."""
        backend = get_backend(self.backend)
        t = backend.serving_target(self.device)
        if t is None and self.device.kind == "cpu":
            t = backend.local_target()
        if t is None:
            raise TwilightError(f"the {self.backend} backend does not run on {self.device.name}")
        return t


def study_name(cfg: TuneConfig, bucket: ShapeBucket) -> str:
    """Pipeline, device, backend, head layout, bucket, data and the schedule space's
    fingerprint: trials measured on other data, or drawn from another space (a knob's choices
    changed with a release), never join the study."""
    s = cfg.shape
    data = f"-{cfg.data_tag}"
    space = get_backend(cfg.backend).space(cfg.pipeline, cfg.shape, cfg.target).fingerprint()
    return (f"{cfg.pipeline.name}-{cfg.pipeline.key()[:12]}-{cfg.device.name}-{cfg.backend}-"
            f"h{s.q_heads}x{s.kv_heads}d{s.head_dim}p{s.page_size}{s.dtype}-{bucket.name}{data}"
            f"-s{space}")


# ---- samplers -----------------------------------------------------------------------------------
def make_sampler(kind: str, seed: int, space: Space):
    """``tpe`` (default), ``random``, or ``grid``: every schedule of a space small enough to
    enumerate, once (``ValueError`` for a larger one — the Triton space has millions). Each
    marks a new trial with its worker first thing (``_MarksWorker``)."""
    if kind == "grid":
        return ScheduleGridSampler(space, seed)
    if kind == "random":
        return _RandomSampler(seed=seed)
    return _TPESampler(seed=seed, n_startup_trials=min(8, max(2, space.size() // 4)))


class _MarksWorker:
    """Sampler mixin: write the trial's worker (``host:pid``) as soon as Optuna has created
    (or popped) the trial — ``before_trial`` is the first code of ours that sees it — so a
    process killed while a trial starts leaves the smallest window in which the trial is
    RUNNING with no worker to check (``recover_stale_trials`` then waits ``UNMARKED_GRACE_S``)."""

    def before_trial(self, study, trial) -> None:
        study._storage.set_trial_user_attr(trial._trial_id, "worker", _WORKER)
        super().before_trial(study, trial)


class _TPESampler(_MarksWorker, optuna.samplers.TPESampler):
    pass


class _RandomSampler(_MarksWorker, optuna.samplers.RandomSampler):
    pass


def _key(schedule: dict) -> str:
    return json.dumps(schedule, sort_keys=True, default=str)


class ScheduleGridSampler(_MarksWorker, optuna.samplers.BaseSampler):
    """Grid search over a space's distinct schedules (conditional parameters respected, unlike
    ``optuna.samplers.GridSampler``'s full product), in a seeded order; each trial takes the
    first schedule no trial of the study holds, so processes sharing a study split the grid."""

    def __init__(self, space: Space, seed: int):
        self.space = space
        self._order = [(_key(s), s) for s in space.grid()]
        random.Random(seed).shuffle(self._order)
        self._picked: dict[int, dict] = {}
        self._lock = threading.Lock()

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def before_trial(self, study, trial) -> None:
        super().before_trial(study, trial)
        taken = {_key(s) for s in taken_schedules(study)}
        with self._lock:
            taken |= {_key(s) for s in self._picked.values()}
            pick = next((s for k, s in self._order if k not in taken), None)
            if pick is None:  # every schedule is measured or being measured
                study.stop()
                pick = self._order[0][1]
            self._picked[trial.number] = pick

    def sample_independent(self, study, trial, param_name, param_distribution):
        pick = self._picked.get(trial.number, {})
        if param_name in pick:
            return pick[param_name]
        return random.choice(param_distribution.choices)

    def after_trial(self, study, trial, state, values) -> None:
        with self._lock:
            self._picked.pop(trial.number, None)


def _sampler_seed(seed: int, trials_so_far: int) -> int:
    """Distinct per process (host and pid) and per resume, derived from ``seed``: processes
    that share a study must not propose the same stream."""
    text = f"{seed}:{trials_so_far}:{_WORKER}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


# ---- resume ---------------------------------------------------------------------------------------
_WORKER = f"{socket.gethostname()}:{os.getpid()}"


def _alive(worker: str | None) -> bool:
    host, _, pid = (worker or ":").partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # another machine's: its RDB heartbeat decides
    try:
        os.kill(int(pid), 0)
        return True
    except OSError:
        return False


# A RUNNING trial with no worker was created by a process that died before it could write
# one (a window of one storage write, see ``_MarksWorker``) — or is being created right now.
# Past this age it is the former, even across machines whose clocks disagree by a minute.
UNMARKED_GRACE_S = 120.0


def _dead(t: optuna.trial.FrozenTrial) -> bool:
    worker = t.user_attrs.get("worker")
    if worker is not None:
        return not _alive(worker)
    start = t.datetime_start
    if start is None:
        return False
    now = datetime.now(start.tzinfo) if start.tzinfo else datetime.now()  # storages: local time
    return (now - start).total_seconds() > UNMARKED_GRACE_S


def recover_stale_trials(study: optuna.Study) -> int:
    """Fail the RUNNING trials whose local worker process is gone (or that never recorded a
    worker, after ``UNMARKED_GRACE_S``) and enqueue their schedules again (journal storage has
    no heartbeat). A trial killed before it drew its schedule is retried with the schedule it
    was enqueued with, if any. Returns how many were recovered."""
    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not _dead(t):
            continue
        study._storage.set_trial_user_attr(t._trial_id, "error", RETRIED)
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        params = t.params or t.system_attrs.get("fixed_params")
        if params:
            study.enqueue_trial(params, user_attrs={"retry_of": t.number})
        n += 1
    return n


def finished_count(study: optuna.Study) -> int:
    """Trials that count toward the budget: finished ones, less those retried after a crash
    and proposals that stepped back (a repeated schedule, a budget already full)."""
    return tally(study)[0]


# ---- the objective ----------------------------------------------------------------------------------
def suggest(trial: optuna.Trial, space: Space) -> dict:
    schedule: dict = {}
    for p in space.params:
        if p.active(schedule):
            schedule[p.name] = trial.suggest_categorical(p.name, list(p.choices))
    return schedule


class GateFailed(Exception):
    pass


@dataclass
class Objective:
    cfg: TuneConfig
    space: Space
    problems: list[Problem]
    check: Callable[[dict], str | None] = lambda s: None
    rng: random.Random = field(default_factory=random.Random)

    def __call__(self, trial: optuna.Trial) -> float:  # the sampler named the worker
        schedule = suggest(trial, self.space)
        refused = claim(trial, schedule, self.cfg.trials)
        if refused is not None:  # held by another trial, or the budget is full: measure nothing
            why, other = refused
            trial.set_user_attr(why, True if other is None else other)
            if why == DUPLICATE:
                self._propose_free(trial.study)
            else:
                trial.study.stop()
            raise optuna.TrialPruned(why)
        illegal = self.check(schedule)
        if illegal:
            trial.set_user_attr("illegal", illegal)
            raise optuna.TrialPruned(illegal)
        try:
            dp = served(self.cfg, schedule)
            answers = [_answer(dp, prob) for prob in self.problems]
        except Exception as e:  # a schedule that does not compile or run is a result too
            trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:500])
            raise
        for prob, (out, lists) in zip(self.problems, answers, strict=True):
            gate = correctness_gate(self.cfg.pipeline, prob, out, lists)
            trial.set_user_attr("gate", "pass" if gate.ok else gate.reason)
            trial.set_user_attr("rel_error", gate.rel_error)
            if not gate.ok:
                raise GateFailed(f"{prob.label}: {gate.reason}" if len(self.problems) > 1
                                 else gate.reason)
        times = [served_ms(dp, prob, self.cfg.repeats) for prob in self.problems]
        trial.set_user_attr("problem_ms", [round(t, 4) for t in times])
        return sum(times)

    def _propose_free(self, study: optuna.Study) -> None:
        """After a repeat, queue a schedule nobody holds, so a sampler stuck on a small,
        mostly measured space still makes progress."""
        taken = {_key(s) for s in taken_schedules(study)}
        for _ in range(64):
            s = self.space.sample(self.rng)
            if _key(s) not in taken:
                study.enqueue_trial(s)
                return


def served(cfg: TuneConfig, schedule: dict) -> DecodePipeline:
    """The served pipeline of a trial: a ``DecodePipeline`` (what ``twilight.load`` returns)
    around ``schedule``'s freshly lowered kernels, never falling back to dense."""
    kernels = get_backend(cfg.backend).lower(cfg.pipeline, cfg.shape, schedule, cfg.target)
    return DecodePipeline(cfg.pipeline, cfg.shape, cfg.backend, cfg.target, dict(schedule),
                          "trial", kernels, "lowered", None)


def _answer(dp: DecodePipeline, prob: Problem):
    dp.plan(prob.batch, prob.max_context, prob.q.device)
    return dp.run(prob.q, prob.cache, prob.ids, return_lists=True)


def tune_bucket(cfg: TuneConfig, bucket: ShapeBucket, space: Space, storage,
                check: Callable[[dict], str | None] = lambda s: None,
                timeout: float | None = None,
                callback: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
                workers: int = 1, problems: list[Problem] | None = None) -> optuna.Study:
    """Run (or join, or resume) the study of one bucket until ``cfg.trials`` trials that count
    have finished — by this process and any other sharing the storage — or every schedule of
    the space has, or ``timeout`` passes. The problems (default ``bucket_problems(cfg,
    bucket)``) are built only if trials remain.

    ``workers`` > 1 runs trials in threads (compiles overlap; on a CPU device the timings of
    concurrent trials disturb each other — use one machine per worker with an RDB storage)."""
    if _debug():
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=study_name(cfg, bucket), storage=storage,
                                direction="minimize", load_if_exists=True)
    study.sampler = make_sampler(cfg.sampler, _sampler_seed(cfg.seed, len(study.trials)), space)
    recover_stale_trials(study)
    for schedule in [space.default(), *cfg.warm_start]:
        try:
            study.enqueue_trial(space.complete(schedule), skip_if_exists=True)
        except ValueError:  # a winner from an older space: its knobs no longer exist
            continue
    deadline = None if timeout is None else time.monotonic() + timeout
    goal = min(cfg.trials, space.size())
    objective, idle, waited = None, 0, 0.0
    while True:
        _fail_stale(study)
        done, running = tally(study)
        left = None if deadline is None else deadline - time.monotonic()
        if done >= goal or (left is not None and left <= 0) or idle >= 3:
            break
        if done + running >= goal:  # other processes are measuring the rest of the budget
            if waited >= WAIT_FOR_OTHERS_S:
                break
            time.sleep(0.5)
            waited += 0.5
            continue
        objective = objective or Objective(
            cfg, space, problems or bucket_problems(cfg, bucket), check,
            random.Random(_sampler_seed(cfg.seed + 1, len(study.trials))))
        try:
            study.optimize(objective, n_trials=goal - done - running, timeout=left,
                           catch=(Exception,), n_jobs=workers,
                           callbacks=[callback] if callback else None)
        except ValueError as e:  # our trial was finished meanwhile by another process (an RDB
            if "Cannot tell a" not in str(e):  # heartbeat check failed it as stale): go on
                raise
        idle = idle + 1 if tally(study)[0] == done else 0
    return study


def _debug() -> bool:
    try:
        return knobs.debug()
    except knobs.KnobError:
        return False


def _fail_stale(study: optuna.Study) -> None:
    """Fail (and retry) the trials of dead workers: local ones by pid, remote ones by the RDB
    heartbeat (a journal has none)."""
    recover_stale_trials(study)
    with warnings.catch_warnings():  # "experimental" since Optuna 2.9
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # a no-op without heartbeats


def bucket_problems(cfg: TuneConfig, bucket: ShapeBucket,
                    context: int | None = None) -> list[Problem]:
    """The decode problems a bucket is measured on, on the target's device: every chosen layer
    of the snapshots of this bucket (``context``: each request's sink and last tokens,
    ``problems.window``), or the synthetic problem (at ``context`` tokens)."""
    device = "cuda" if cfg.target.kind == "cuda" else "cpu"
    if not cfg.snapshots:
        at = bucket if context is None else ShapeBucket(bucket.batch, context)
        return [make_problem(cfg.pipeline, cfg.shape, at, seed=cfg.seed, device=device)]
    return [snapshot_problem(cfg.pipeline, snap, i, device, context)
            for snap, layers in cfg.snapshots if snapshot_bucket(snap) == bucket
            for i in layers]


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The fastest trial that completed — only gate-passing trials complete."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.user_attrs.get("gate") == "pass"]
    return min(done, key=lambda t: t.value) if done else None


def default_trial(study: optuna.Study, default: dict) -> optuna.trial.FrozenTrial | None:
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.params == default:
            return t
    return None
