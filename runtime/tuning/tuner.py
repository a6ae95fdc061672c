"""The search: Optuna over a backend's declared schedule space, one study per shape bucket.

Space (``schedules.space``), search (this module) and store (``runtime.store.tuning_log``) are three
separate pieces. Each trial: draw a schedule (conditional parameters only when active), reject
illegal ones for the device before compiling, lower, pass the correctness gate against the
torch reference, then time it (median of repeats). Compile failures and gate failures are
recorded on the trial (user attrs ``error`` / ``gate``) and never become winners.

Studies live in real storage — a journal file by default, SQLite or any RDB URL (PostgreSQL
lets many machines tune one study) — so a killed tune resumes: finished trials count toward
the budget and are not rerun; a trial that was running when its process died is failed and
its schedule enqueued again.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import optuna.storages
from optuna.trial import TrialState

from ...compiler import ir
from ...compiler.backend import Target, get_backend
from ...errors import TwilightError
from ...schedules.devices import DeviceProfile
from ...schedules.space import Space
from ..evaluation.measure import Problem, correctness_gate, make_problem, median_time
from ..store.tuning_log import ShapeBucket

optuna.logging.set_verbosity(optuna.logging.WARNING)

FINISHED = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)


class StorageError(TwilightError):
    """A study storage that cannot be opened (missing driver, unreachable server)."""


@dataclass
class TuneConfig:
    pipeline: ir.PipelineIR
    shape: ir.Shape
    buckets: list[ShapeBucket]
    backend: str
    device: DeviceProfile
    trials: int = 24
    timeout: float | None = None
    storage: str | None = None
    sampler: str = "tpe"
    seed: int = 0
    repeats: int = 10
    warm_start: list[dict] = field(default_factory=list)

    @property
    def target(self) -> Target:
        """Where the backend serves this device (``Backend.serving_target``)."""
        t = get_backend(self.backend).serving_target(self.device)
        if t is None:
            raise TwilightError(f"the {self.backend} backend does not run on {self.device.name}")
        return t


# ---- storage ------------------------------------------------------------------------------------
def open_storage(spec: str | None, default_path: Path):
    """``None`` → a journal file at ``default_path``; ``*.journal`` → that journal file;
    ``sqlite:///x.db``, ``*.db``, ``postgresql://…``, ``mysql://…`` → an RDB storage with
    heartbeats, so trials of a dead worker are failed and retried."""
    spec = spec or str(default_path)
    if "://" in spec or spec.endswith((".db", ".sqlite", ".sqlite3")):
        url = spec if "://" in spec else f"sqlite:///{Path(spec).resolve()}"
        if url.startswith("sqlite:///"):
            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        try:
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=30, grace_period=120,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=1))
        except ImportError as e:
            driver = {"postgresql": "psycopg2-binary", "mysql": "PyMySQL"}.get(
                url.partition(":")[0].partition("+")[0], "the database driver")
            raise StorageError(f"storage {url.split('@')[-1]}: {e} (pip install {driver})") \
                from None
    path = Path(spec.removeprefix("journal:"))
    path.parent.mkdir(parents=True, exist_ok=True)
    from optuna.storages.journal import JournalFileBackend
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def study_name(cfg: TuneConfig, bucket: ShapeBucket) -> str:
    s = cfg.shape
    return (f"{cfg.pipeline.name}-{cfg.pipeline.key()[:12]}-{cfg.device.name}-{cfg.backend}-"
            f"h{s.q_heads}x{s.kv_heads}d{s.head_dim}p{s.page_size}{s.dtype}-{bucket.name}")


def make_sampler(kind: str, seed: int, space: Space):
    if kind == "grid":
        grid = {p.name: list(p.choices) for p in space.params}
        return optuna.samplers.GridSampler(grid, seed=seed)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(8, max(2, space.size() // 4)))


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


def recover_stale_trials(study: optuna.Study) -> int:
    """Fail the RUNNING trials whose local worker process is gone and enqueue their schedules
    again (journal storage has no heartbeat). Returns how many were recovered."""
    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _alive(t.user_attrs.get("worker")):
            continue
        study._storage.set_trial_user_attr(t._trial_id, "error", "worker died; retried")
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
        n += 1
    return n


def _counts(t: optuna.trial.FrozenTrial) -> bool:
    return t.user_attrs.get("error") != "worker died; retried" and \
        "duplicate_of" not in t.user_attrs


def finished_count(study: optuna.Study) -> int:
    """Trials that count toward the budget: finished ones, less those retried after a crash
    and proposals that merely repeated an earlier schedule."""
    return sum(1 for t in study.get_trials(deepcopy=False, states=FINISHED) if _counts(t))


def _duplicate_of(study: optuna.Study, schedule: dict, number: int) -> int | None:
    for t in study.get_trials(deepcopy=False, states=FINISHED):
        if t.number != number and _counts(t) and t.params == schedule:
            return t.number
    return None


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
    problem: Problem
    check: Callable[[dict], str | None] = lambda s: None

    def __call__(self, trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", _WORKER)
        schedule = suggest(trial, self.space)
        dup = _duplicate_of(trial.study, schedule, trial.number)
        if dup is not None:  # measured already: do not spend the budget twice
            trial.set_user_attr("duplicate_of", dup)
            raise optuna.TrialPruned(f"same schedule as trial {dup}")
        illegal = self.check(schedule)
        if illegal:
            trial.set_user_attr("illegal", illegal)
            raise optuna.TrialPruned(illegal)
        backend, prob = get_backend(self.cfg.backend), self.problem
        try:
            compiled = backend.lower(self.cfg.pipeline, self.cfg.shape, schedule,
                                     self.cfg.target)
            out, lists = compiled.run(prob.q, prob.cache, prob.ids, return_lists=True)
        except Exception as e:  # a schedule that does not compile or run is a result too
            trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:500])
            raise
        gate = correctness_gate(self.cfg.pipeline, prob, out, lists)
        trial.set_user_attr("gate", "pass" if gate.ok else gate.reason)
        trial.set_user_attr("rel_error", gate.rel_error)
        if not gate.ok:
            raise GateFailed(gate.reason)
        seconds = median_time(lambda: compiled.run(prob.q, prob.cache, prob.ids),
                              repeats=self.cfg.repeats)
        return seconds * 1e3


def tune_bucket(cfg: TuneConfig, bucket: ShapeBucket, space: Space, storage,
                check: Callable[[dict], str | None] = lambda s: None,
                timeout: float | None = None,
                callback: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
                workers: int = 1, problem: Problem | None = None) -> optuna.Study:
    """Run (or resume) the study of one bucket until it has ``cfg.trials`` finished trials,
    on ``problem`` (default: ``bucket_problem(cfg, bucket)``, built only if trials remain).

    ``workers`` > 1 runs trials in threads (compiles overlap; on a CPU device the timings of
    concurrent trials disturb each other — use one machine per worker with an RDB storage)."""
    name = study_name(cfg, bucket)
    study = optuna.create_study(study_name=name, storage=storage, direction="minimize",
                                load_if_exists=True)
    # a resumed study continues a fresh random stream instead of replaying the first one
    study.sampler = make_sampler(cfg.sampler, cfg.seed + len(study.trials), space)
    recover_stale_trials(study)
    for schedule in [space.default(), *cfg.warm_start]:
        try:
            study.enqueue_trial(space.complete(schedule), skip_if_exists=True)
        except ValueError:  # a winner from an older space: its knobs no longer exist
            continue
    objective, deadline = None, None if timeout is None else time.monotonic() + timeout
    for _ in range(space.size()):  # duplicates do not count; a small space can run dry
        remaining = min(cfg.trials - finished_count(study), space.size() - finished_count(study))
        left = None if deadline is None else deadline - time.monotonic()
        if remaining <= 0 or (left is not None and left <= 0):
            break
        objective = objective or Objective(cfg, space, problem or bucket_problem(cfg, bucket),
                                           check)
        study.optimize(objective, n_trials=remaining, timeout=left, catch=(Exception,),
                       n_jobs=workers, callbacks=[callback] if callback else None)
    return study


def bucket_problem(cfg: TuneConfig, bucket: ShapeBucket) -> Problem:
    """The decode problem a bucket is measured on, on the target's device."""
    device = "cuda" if cfg.target.kind == "cuda" else "cpu"
    return make_problem(cfg.pipeline, cfg.shape, bucket, seed=cfg.seed, device=device)


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
