"""One study, many tuning processes: every schedule measured once, the trial budget met once.

Processes (threads, machines) that share a study's storage see each other's trials and
nothing else: there is no lock and no atomic counter across a journal file, SQLite and
PostgreSQL alike. Two rules over what the storage shows make sharing safe anyway:

* a trial, once its schedule is drawn, **claims** it (user attr ``claimed``) and then looks at
  the study: if any *other* trial that counts (below) holds the same schedule, or the others
  that count already fill the budget, it steps back (PRUNED, ``duplicate_of`` /
  ``over_budget``) before measuring anything;
* a trial **counts** when it is claimed and running, or finished — less the trials that
  stepped back and those failed because their worker died (their schedule is retried).

Why no schedule is measured twice: of two trials holding one schedule, the one that looked
second saw the other's claim (written before the other looked, hence before it looked), so at
least that one steps back. Both may step back (each claimed before either looked): the
schedule then stays free for a later trial — a wasted proposal, never a repeat. The budget
works the same way: the last trial to look sees every other claim, so more than ``budget``
trials never count; too few count only while one has stepped back, and the tune loop then
starts another.
"""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState

CLAIMED = "claimed"
DUPLICATE = "duplicate_of"
OVER_BUDGET = "over_budget"
RETRIED = "worker died; retried"
FINISHED = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)


def retried(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of trials whose worker died and whose schedule was enqueued again (by
    ``recover_stale_trials`` or an RDB heartbeat's retry callback)."""
    out = {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}
    out |= {t.system_attrs["failed_trial"] for t in trials if "failed_trial" in t.system_attrs}
    return out | {t.number for t in trials if t.user_attrs.get("error") == RETRIED}


def counts(t: FrozenTrial, retried_numbers: set[int]) -> bool:
    """Whether ``t`` holds its schedule and a place in the budget (see the module doc)."""
    if t.number in retried_numbers or DUPLICATE in t.user_attrs or OVER_BUDGET in t.user_attrs:
        return False
    if t.state == TrialState.RUNNING:
        return bool(t.user_attrs.get(CLAIMED))
    return t.state in FINISHED


def tally(study: optuna.Study) -> tuple[int, int]:
    """``(finished, running)`` trials that count: the budget spent and the budget in flight."""
    trials = study.get_trials(deepcopy=False)
    gone = retried(trials)
    held = [t for t in trials if counts(t, gone)]
    running = sum(t.state == TrialState.RUNNING for t in held)
    return len(held) - running, running


def taken_schedules(study: optuna.Study) -> list[dict]:
    """The schedules that trials which count hold (measured, being measured, or refused)."""
    trials = study.get_trials(deepcopy=False)
    gone = retried(trials)
    return [t.params for t in trials if counts(t, gone)]


def claim(trial: optuna.Trial, schedule: dict, budget: int) -> tuple[str, int | None] | None:
    """Claim ``schedule`` for ``trial``; ``None`` if it may be measured, else why to step
    back: ``("duplicate_of", number)`` or ``("over_budget", None)``. The caller records it and
    prunes the trial."""
    trial.set_user_attr(CLAIMED, True)
    trials = trial.study.get_trials(deepcopy=False)
    gone = retried(trials)
    others = [t for t in trials if t.number != trial.number and counts(t, gone)]
    for t in others:
        if t.params == schedule:
            return DUPLICATE, t.number
    if len(others) >= budget:
        return OVER_BUDGET, None
    return None
