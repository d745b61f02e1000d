"""Entry point: compose the Hydra config, build the parts, run the EM loop with Lightning. Wiring only.

``dibs-train`` (installed) and ``python train.py`` (a checkout) both run ``cli()``:

    dibs-train                                    # the embedded default (CPU, a few minutes)
    dibs-train algo=raft allocation.n_per_prompt=8
    dibs-train -m seed=0,1,2                      # a sweep

The configs ship inside the package (``pkg://dibs.configs``, the checkout's ``conf/``), so an installed wheel
needs no checkout.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import sys
import threading
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from dibs.conf import flatten, register_resolvers
from dibs.lit.console import RANK_VARIABLES  # light (rich only): the console handler of every run imports it

# Heavy imports (lightning, transformers) live inside main(): the verifier's worker processes re-import the
# launching script's top level when they start, and must not pay for them.
log = logging.getLogger("dibs")
register_resolvers()
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


def plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]


@hydra.main(config_path="pkg://dibs.configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    if "grid" in cfg and HydraConfig.get().mode != RunMode.MULTIRUN:
        raise SystemExit(f"grid {cfg.grid.name!r} sweeps several runs: launch it with `python train.py -m +grid=...`")
    from dibs.schema import ConfigError, validate_config

    try:  # every type and range, before any work
        validate_config(plain(cfg))
    except ConfigError as error:
        raise SystemExit(str(error)) from None
    run_dir = Path(cfg.run_dir)
    launched = any(os.environ.get(k, "0") != "0" for k in RANK_VARIABLES)  # not the first process of the run
    resume, finished = _resume_point(cfg, run_dir, launched)  # a bad path or an untrusted checkpoint fails here
    if finished is not None:  # nothing left to do: the last evaluation, for sweeps that read the return value
        return finished
    from dibs.launch import set_up_process

    set_up_process(cfg.threads)  # torch's threads (a share of the cores side by side), a joblib worker's start method
    from hydra.utils import instantiate

    # The run's one verifier (one per process): its workers start now, in the background, while the heavy imports
    # and the warm start run here, then serve the warm start's probe, every E-step and every evaluation; closed at
    # the end of the run (or at exit, when a check below stops it first).
    verifier = instantiate(cfg.reward)
    verifier.start()
    atexit.register(verifier.close)
    import lightning as L
    import transformers
    from hydra.errors import InstantiationException

    from dibs.core.budget import Budget
    from dibs.core.losses import get_algorithm
    from dibs.data.benchmarks import check_benchmarks
    from dibs.data.pools import describe_shards
    from dibs.data.prompts import PromptTemplate
    from dibs.estep.step import check_keep_rejected
    from dibs.lit.assemble import build_eval_plan, check_update_accounting, policy_from_config, schedule_horizon
    from dibs.lit.checkpoints import IterationCheckpoint
    from dibs.lit.console import setup_console
    from dibs.lit.datamodule import EMDataModule
    from dibs.lit.export import ExportOptions, card_facts
    from dibs.lit.loggers import build_loggers, log_hyperparams
    from dibs.lit.module import EMModule
    from dibs.lit.progress import IterationProgressBar
    from dibs.lit.rollout import RolloutCallback
    from dibs.rollout.base import SamplingParams

    setup_console()  # Lightning's messages once each, without its tips; warnings logged (dibs.lit.console)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "resolved_config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if cfg.rollout.backend == "vllm":  # a missing vllm or GPU fails before anything else runs
        from dibs.rollout.availability import require_vllm

        require_vllm()
    budget = Budget.from_config(**plain(cfg.budget))  # a bad budget fails before the warm start
    check_update_accounting(cfg.update_accounting, cfg.algo.lr_schedule, budget)  # as does a schedule it cannot run
    # the sampling strategy (dibs.core.sampling) and the algorithm, with what they refuse, before the warm start
    algo = plain(cfg.algo)
    algorithm = get_algorithm(algo.pop("loss"))  # the one lookup: advantages for the E-step, loss for the M-step
    e_step = {k: algo.pop(k) for k in ("keep_rejected", "recompute_old_logprobs", "filter_equal_groups")}
    try:
        strategy = instantiate(cfg.allocation)
        check_keep_rejected(algorithm, e_step["keep_rejected"], strategy)
    except (ValueError, InstantiationException) as error:  # a strategy's own checks, named by key
        raise SystemExit(f"config error: {error}") from None
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    transformers.utils.logging.disable_progress_bar()  # per-save/load bars would drown the run's own

    task = instantiate(cfg.data.source)
    benchmarks = plain(cfg.benchmarks)  # checked before the (possibly long) warm start
    check_benchmarks(cfg.eval.benchmarks, benchmarks["sets"], dir=benchmarks["dir"], has_held_out=bool(task.test))
    template = PromptTemplate(**plain(cfg.template))
    sampling = SamplingParams(**plain(cfg.rollout.sampling))
    try:  # before the warm start, which logs to them: a missing package or a bad key fails first
        loggers = build_loggers(cfg.get("logger"), run_dir)
    except ValueError as error:
        raise SystemExit(f"config error: {error}") from None
    log_hyperparams(loggers, flatten(plain(cfg)))
    # the warm start's curves (warmstart/*) too, but once: a resumed run's logs hold them from its first start
    # the warm start's curves (warmstart/*) reach the run's logs once: not again when it resumes in its own folder
    in_place = resume is not None and Path(resume).resolve().parent == (run_dir / "checkpoints").resolve()
    policy, tokenizer = policy_from_config(cfg, task, verifier, loggers=() if in_place else loggers)
    evaluation = build_eval_plan(
        plain(cfg.eval),
        benchmarks,
        task=task,
        tokenizer=tokenizer,
        template=template,
        max_prompt_tokens=cfg.eval.max_prompt_tokens,
    )
    rollout = RolloutCallback(
        instantiate(cfg.rollout.generator)(model=policy, tokenizer=tokenizer),
        verifier,
        strategy,
        tokenizer,
        algorithm=algorithm,
        sampling=sampling,
        evaluation=evaluation,
        **e_step,
        export_dir=str(run_dir / "hf"),
        export=ExportOptions(**plain(cfg.export)),  # which iterations are exported and kept
        card=card_facts(plain(cfg), HydraConfig.get().overrides.task, HydraConfig.get().runtime.choices),
        seed=cfg.seed,
        budget=budget,
        eval_cache=str(Path(cfg.cache_dir).expanduser() / "evals"),
        template_note=describe_template(HydraConfig.get().runtime.choices.get("template"), plain(cfg.template)),
    )
    datamodule = EMDataModule(
        task.train[: cfg.pool_size],
        tokenizer,
        template=template,
        prompts_per_iteration=cfg.prompts_per_iteration,
        pool_sampling=cfg.pool_sampling,
        batch_size=cfg.batch_size,
        updates_per_iteration=cfg.updates_per_iteration,
        update_accounting=cfg.update_accounting,
        samples_per_update=cfg.samples_per_update,
        rows_per_prompt=strategy.rows_per_prompt,
        max_prompt_tokens=cfg.max_prompt_tokens,
        seed=cfg.seed,
        source=rollout,
        cache_dir=cfg.cache_dir,  # the pool's prompts are rendered and tokenised once (dibs.data.prompts)
    )
    if datamodule.dropped:  # a Numina-sized pool can drop thousands: the count, and a few examples
        log.warning(
            "prompt pool: %d of %d prompts over max_prompt_tokens=%d left out, e.g. %s",
            len(datamodule.dropped),
            len(task.train),
            cfg.max_prompt_tokens,
            "; ".join(datamodule.dropped[:3]),
        )
    pool = len(datamodule.train_problems)
    if pool < cfg.prompts_per_iteration:  # every iteration then trains on the same prompts, all of them
        log.warning(
            "prompt pool: %d prompts (data=%s%s), fewer than prompts_per_iteration=%d: every iteration draws all "
            "%d; lower prompts_per_iteration or give a larger pool",
            pool,
            HydraConfig.get().runtime.choices.get("data"),
            f", pool_size={cfg.pool_size}" if cfg.pool_size is not None else "",
            cfg.prompts_per_iteration,
            pool,
        )
    if cfg.pool_sampling == "shards":
        log.info("prompt pool: %s", describe_shards(pool, min(cfg.prompts_per_iteration, pool)))

    horizon = schedule_horizon(
        budget,
        strategy,
        cfg.iterations,
        cfg.updates_per_iteration,
        len(datamodule.iteration_prompts(0)),
        update_accounting=cfg.update_accounting,
    )
    total_updates = horizon * cfg.updates_per_iteration
    if cfg.update_accounting == "per_sample":  # the schedule ends with the sample budget (check_update_accounting)
        total_updates = budget.amount // cfg.samples_per_update if budget.unit == "samples" else 0
        log.info(
            "update_accounting=per_sample: one update per %d generated samples, %s updates in all",
            cfg.samples_per_update,
            total_updates or "an open number of",
        )
    module = EMModule(
        policy,
        algorithm,
        **algo,
        total_updates=total_updates,
        activation_checkpointing=cfg.activation_checkpointing,
    )
    # last.ckpt after the first E-step, every iteration (holding the next iteration's rollouts) and every
    # checkpoint.every_updates updates: a run killed at any moment resumes with `ckpt_path=last`.
    checkpoint = IterationCheckpoint(
        run_dir / "checkpoints",
        run_dir,
        every_updates=cfg.checkpoint.every_updates,
        keep=cfg.checkpoint.keep,
        rollout=rollout,
    )
    rollout.resumed = checkpoint.resumed = resume is not None
    # "iteration k/N", the loss and the E-step's acceptance (dibs.lit.progress), unless the bar is switched off
    bar = [IterationProgressBar(rollout)] if cfg.trainer.get("enable_progress_bar", True) else []
    trainer = L.Trainer(
        **instantiate(cfg.trainer),
        max_epochs=cfg.iterations,
        reload_dataloaders_every_n_epochs=1,
        use_distributed_sampler=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=loggers,
        callbacks=[rollout, checkpoint, *bar],
        default_root_dir=run_dir,
    )
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    finally:
        rollout.verifier.close()
    return rollout.evals[-1].accuracy if rollout.evals else float("nan")


def describe_template(name: str | None, template: dict) -> str:
    """``template=paper`` with its text (system prompt, user suffix, response prefix), for messages about it."""
    text = ", ".join(f"{key} {value!r}" for key, value in template.items() if value)
    return f"template={name or '?'} ({text or 'no system prompt, suffix or prefix: the problem as it is'})"


def _resume_point(cfg: DictConfig, run_dir: Path, launched: bool) -> tuple[str | None, float | None]:
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
            _warn_renamed_run(run_dir)
        return None, None
    try:
        check_trusted(ckpt, trust=cfg.checkpoint.trust)
    except UntrustedCheckpoint as error:
        raise SystemExit(str(error)) from None
    in_place = ckpt.resolve().parent == own.parent.resolve()
    if in_place and occupied:
        _check_same_run(cfg, run_dir)
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


def _warn_renamed_run(run_dir: Path) -> None:
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


def _check_same_run(cfg: DictConfig, run_dir: Path) -> None:
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


def _exit_now() -> None:
    """End the process once the run (or the sweep) is over and every file is written: the exit handlers run
    (the verifier's pool, multiprocessing's helpers), logs and streams are flushed, then the interpreter stops
    without tearing down its modules one by one, which torch, Lightning and transformers make cost 1-1.5 s of
    nothing per process. Only a normal return gets here; an error exits the usual way, with its status. Where
    something still runs (a launcher's worker processes or threads), the interpreter's own shutdown stops it."""
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if multiprocessing.active_children() or others:
        return
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def cli() -> None:
    """The console script ``dibs-train``: Hydra parses the command line."""
    main()
    _exit_now()


if __name__ == "__main__":
    cli()
