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
from dibs.run_folder import resume_point

# Heavy imports (lightning, transformers) live inside main(): the verifier's worker processes re-import the
# launching script's top level when they start, and must not pay for them.
log = logging.getLogger("dibs")
register_resolvers()


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
    resume, finished = resume_point(cfg, run_dir, launched)  # a bad path or an untrusted checkpoint fails here
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
    from dibs.lit.assemble import build_eval_plan, policy_from_config
    from dibs.lit.checkpoints import IterationCheckpoint
    from dibs.lit.console import setup_console
    from dibs.lit.datamodule import EMDataModule, check_update_accounting, schedule_horizon
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
