"""The run folder at start-up, before any work: where a run resumes from (``ckpt_path``), whether a folder already
holds another run or the same run with other settings, and a sweep's run found under another folder name.

Run folders are named by their overrides (``dibs.conf.run_name``), so a resume must give the overrides the run was
started with; only the keys in ``RESUME_MAY_CHANGE`` may differ (``check_same_run``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from dibs.conf import flatten

__all__ = ["RESUME_MAY_CHANGE", "check_same_run", "resume_point", "warn_renamed_run"]

log = logging.getLogger("dibs")


def plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]


# May differ when a run is resumed: where it resumes from, how far it goes, how it checkpoints and shows progress.
RESUME_MAY_CHANGE = (
    "ckpt_path",
    "threads",
    "checkpoint.",
    "iterations",
    "budget.",
    "run_dir",
    "cache_dir",
    "evaluate.",
    "export.",
    "logger.",  # run folders of older versions (one logger, logger._target_); a logger added on resume starts there
    "trainer.enable_progress_bar",
    "rollout.generator.show_progress",
)


def resume_point(cfg: DictConfig, run_dir: Path, launched: bool) -> tuple[str | None, float | None]:
    """(the checkpoint to resume from or None for a fresh start, None or the run's last accuracy when it has
    nothing left to do).

    ``ckpt_path=last`` resumes this run folder from its ``checkpoints/last.ckpt`` (a fresh start in the folder when
    the run was killed before its first checkpoint); any other value must name a checkpoint. Everything is checked
    here, before the warm start."""
    from dibs.core.budget import Budget
    from dibs.resume import (
        LAST,
        UntrustedCheckpoint,
        check_trusted,
        drop_newer,
        read_info,
        remove_unfinished,
        rewind_event_files,
    )

    occupied = (run_dir / "resolved_config.yaml").exists()
    if cfg.ckpt_path is None:
        if occupied and not launched:
            raise SystemExit(
                f"{run_dir} already holds a run: resume it with ckpt_path=last (and hydra.run.dir={run_dir}), or "
                "write to another folder (two runs in one folder would mix their logs)"
            )
        return None, None
    own = run_dir / "checkpoints" / LAST
    ckpt = own if cfg.ckpt_path == "last" else Path(cfg.ckpt_path).expanduser()
    if not ckpt.exists():
        if cfg.ckpt_path != "last":
            raise SystemExit(f"ckpt_path={cfg.ckpt_path}: no such checkpoint (ckpt_path=last resumes this run folder)")
        if occupied and not launched:  # killed before its first checkpoint: start over, logs included
            rewind_event_files(run_dir, {})
            remove_unfinished(run_dir / "checkpoints")
            log.info("%s holds no checkpoint yet: starting the run over", run_dir)
        elif not occupied:
            warn_renamed_run(run_dir)
        return None, None
    try:
        check_trusted(ckpt, trust=cfg.checkpoint.trust)
    except UntrustedCheckpoint as error:
        raise SystemExit(str(error)) from None
    in_place = ckpt.resolve().parent == own.parent.resolve()
    if in_place and occupied:
        check_same_run(cfg, run_dir)
    found = read_info(ckpt)
    if found is not None:
        budget = Budget.from_config(**OmegaConf.to_container(cfg.budget, resolve=True))
        # A run its budget stopped holds no next E-step; an unfinished one's costs already count the next one's.
        stopped_by_budget = found.stopped and budget.reached(found.costs)
        if found.iterations_done >= cfg.iterations or stopped_by_budget:
            why = (
                f"its budget ({budget.spent(found.costs):.0f} {budget.unit})"
                if stopped_by_budget
                else f"iterations={cfg.iterations}"
            )
            print(
                f"{ckpt}: the run already finished ({found.iterations_done} iterations, {found.global_step} updates, "
                f"{why} reached): nothing to do. Raise iterations= or the budget to train further."
            )
            last = found.last_accuracy
            return None, float("nan") if last is None else last
        if in_place and not launched:  # the logs return to the checkpoint's moment: every point once
            cut, deleted = rewind_event_files(run_dir, found.events)
            removed = remove_unfinished(own.parent) + drop_newer(own.parent, found.path)
            log.info(
                "resuming %s from %s (iteration %d done, %d updates): %d event files rewound, %d removed%s",
                run_dir,
                found.path.name,
                found.iterations_done,
                found.global_step,
                cut,
                deleted,
                f", unfinished checkpoints removed: {', '.join(removed)}" if removed else "",
            )
    return str(ckpt), None


def warn_renamed_run(run_dir: Path) -> None:
    """``ckpt_path=last`` in a new folder of a sweep: when a sibling folder holds this very run under other values
    of keys a resume may change (``iterations=``, ``budget.*``: part of the folder name, Hydra's override_dirname),
    say so, since this run then starts over instead of resuming that one."""
    if HydraConfig.get().mode != RunMode.MULTIRUN or not run_dir.parent.is_dir():
        return
    free = lambda overrides: sorted(  # noqa: E731
        o for o in overrides if not o.lstrip("+~").split("=")[0].startswith(RESUME_MAY_CHANGE)
    )
    mine = free(HydraConfig.get().overrides.task)
    for other in sorted(run_dir.parent.iterdir()):
        listed = other / ".hydra" / "overrides.yaml"
        if other != run_dir and listed.is_file() and free(OmegaConf.load(listed)) == mine:
            log.warning(
                "ckpt_path=last: %s holds no run, but %s holds this one (launched with %s) under other values of "
                "keys a resume may change; run folders are named by their overrides, so this run starts over here. "
                "To extend that run in its own folder, set the new value in the grid's file or its size preset, "
                "not on the command line (docs/sweeps.md)",
                run_dir.name,
                other.name,
                " ".join(OmegaConf.load(listed)),
            )
            return


def check_same_run(cfg: DictConfig, run_dir: Path) -> None:
    """Refuse to resume a run folder with other settings than the run it holds (a forgotten override would
    otherwise continue it silently with the defaults), naming every key that differs."""
    before = flatten(OmegaConf.to_container(OmegaConf.load(run_dir / "resolved_config.yaml"), resolve=False))
    now = flatten(plain(cfg))
    moved = before.get("run_dir")  # a run folder copied or moved: paths inside it follow it
    if isinstance(moved, str) and moved != now["run_dir"]:
        before = {k: v.replace(moved, now["run_dir"]) if isinstance(v, str) else v for k, v in before.items()}
    changed = [
        key
        for key in sorted(set(before) | set(now))
        if before.get(key, "<absent>") != now.get(key, "<absent>") and not key.startswith(RESUME_MAY_CHANGE)
    ]
    if changed:
        shown = "; ".join(
            f"{k}={before.get(k, '<absent>')!r} in the run, {now.get(k, '<absent>')!r} now" for k in changed
        )
        raise SystemExit(
            f"{run_dir} holds a run with other settings: {shown}. Resume it with the overrides it was started with "
            f"(all its settings are in {run_dir / 'resolved_config.yaml'}); only {', '.join(RESUME_MAY_CHANGE)} may "
            "change. To go on with new settings, start a new run from its checkpoint: ckpt_path=<that checkpoint> "
            "in another folder."
        )
