"""Builds π0 and its tokenizer: a local HF checkpoint, or the embedded tiny Qwen2 warm-started by SFT.

For the embedded task the tokenizer is trained on the task corpus and the model is SFT-ed on reference
solutions; both are cached under ``<cache_dir>/warmstart/<key>``, the key hashing every setting that
determines them, so later runs (other seeds, other methods in a grid) start from the same π0. The folder is
written under a temporary name and renamed, so a crash never leaves a half-written cache; other ranks of
a torchrun/SLURM launch wait for rank 0's folder instead of training their own.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from dibs import __version__
from dibs.data.benchmarks import load_benchmarks
from dibs.data.prompts import PromptTemplate, encode_prompts, encode_response
from dibs.data.synthetic import TaskSplits, corpus
from dibs.data.tokenizer import load_tokenizer, train_tokenizer
from dibs.lit.evaluation import EvalPlan
from dibs.lit.logs import info, warn
from dibs.lit.warmstart import WarmStartReport, cache_key, load_cached, load_curves, log_curves, sft
from dibs.modeling import DTYPES, build_tiny_qwen2, count_parameters, load_pretrained, require_model_folder
from dibs.rollout.base import SamplingParams
from dibs.rollout.hf import HFGenerator

__all__ = ["build_eval_plan", "policy_from_config", "prepare_policy"]


def prepare_policy(
    task: TaskSplits,
    *,
    template: PromptTemplate,
    model: dict[str, Any],
    warmstart: dict[str, Any],
    key_settings: dict[str, Any],
    cache_dir: str,
    max_prompt_tokens: int,
    eval_sampling: SamplingParams,
    verifier: Any,
    pool_size: int | None,
    loggers: Sequence[Any] = (),
    show_progress: bool = True,
):
    """Returns (policy, tokenizer). ``model`` holds the model config group; ``warmstart`` the SFT group;
    ``verifier`` is the run's verifier (the ``reward`` group), which the warm start's accuracy probe shares with the
    E-steps: the caller starts it (its workers come up during the warm start) and closes it;
    ``pool_size`` the RL pool (the first problems of the split), which ``warmstart.skip_pool`` leaves out of
    the SFT; ``loggers`` the run's Lightning loggers, which get the SFT's curves (``warmstart/*``), replayed from
    the cache when π0 is loaded from it; ``show_progress``: the SFT's progress bar."""
    skip = (pool_size or 0) if warmstart["skip_pool"] else 0
    if model.get("path"):
        require_model_folder(model["path"])  # a wrong path fails before anything else runs
        if warmstart["steps"] <= 0:
            return load_pretrained(model["path"], dtype=model["dtype"]), load_tokenizer(model["path"])
    keyed = {k: v for k, v in warmstart.items() if k != "skip_pool"}  # keys of earlier caches stay valid
    settings = {"version": __version__, "task": key_settings, "model": model, "warmstart": keyed}
    if skip:
        settings["sft_skips_pool"] = skip
    settings["template"] = template
    if any(not p.solution for p in task.train):  # answer-only SFT targets: their format is part of pi0
        settings["answer_format"] = verifier.format_answer("{}")
    key = cache_key(settings)
    folder = Path(cache_dir).expanduser() / "warmstart" / key
    cached = _wait_or_load(folder, DTYPES[model.get("dtype") or "float32"])
    if cached is not None:
        policy, report = cached
        info(
            f"pi0: reusing cached warm start {folder} (SFT {report.steps} steps, {report.seconds:.0f}s, "
            f"{_accuracy(report)} when it stopped)"
        )
        _replay_curves(folder, loggers)
        return policy, load_tokenizer(folder)
    _remove_stale_staging(folder.parent)
    staging = folder.with_name(f"{key}.tmp-{socket.gethostname()}-{os.getpid()}")
    staging.mkdir(parents=True, exist_ok=True)
    if model.get("path"):
        policy, tokenizer = load_pretrained(model["path"], dtype=model["dtype"]), load_tokenizer(model["path"])
    else:  # the answers the SFT states (problems without a worked solution) are part of the corpus
        texts = corpus(task.train) + [verifier.format_answer(p.answer) for p in task.train if not p.solution]
        tokenizer = train_tokenizer(texts, staging, vocab_size=model["vocab_size"])
        policy = build_tiny_qwen2(tokenizer, **model["tiny"], seed=warmstart["seed"])
    info(
        f"pi0: SFT warm start of a {count_parameters(policy) / 1e6:.2f}M-parameter policy "
        f"({warmstart['steps']} steps max, stop at {100 * warmstart['target_accuracy']:.0f}% accuracy)"
    )
    report = _run_sft(
        policy,
        tokenizer,
        task,
        template,
        warmstart,
        staging,
        max_prompt_tokens,
        eval_sampling,
        verifier,
        skip,
        loggers=loggers,
        show_progress=show_progress,
    )
    info(
        f"pi0: SFT stopped by {report.stopped_by} after {report.steps} steps ({report.seconds:.0f}s), "
        f"{_accuracy(report)}; cached in {folder}"
    )
    if folder.exists():  # another process finished first; keep its copy
        shutil.rmtree(staging)
    else:
        staging.rename(folder)
    return policy, tokenizer


def policy_from_config(
    cfg: Any, task: TaskSplits, verifier: Any, *, cache_dir: str | None = None, loggers: Sequence[Any] = ()
):
    """``prepare_policy`` with the settings of a composed run config (``train.py``, the benchmarks): π0 and its
    tokenizer, from the warm-start cache or built. ``cache_dir`` overrides ``cfg.cache_dir``; ``loggers``: the
    run's Lightning loggers, for the warm start's curves. The SFT shows a progress bar unless
    ``trainer.enable_progress_bar`` is false."""
    from omegaconf import OmegaConf

    plain = lambda node: OmegaConf.to_container(node, resolve=True)
    return prepare_policy(
        task,
        template=PromptTemplate(**plain(cfg.template)),
        model=plain(cfg.model),
        warmstart=plain(cfg.warmstart),
        key_settings=plain(cfg.data.source),
        cache_dir=cache_dir or cfg.cache_dir,
        max_prompt_tokens=cfg.max_prompt_tokens,
        eval_sampling=SamplingParams(**plain(cfg.eval.sampling)),
        verifier=verifier,
        pool_size=cfg.pool_size,
        loggers=loggers,
        show_progress=cfg.trainer.get("enable_progress_bar", True) is not False,
    )


def _remove_stale_staging(cache: Path, max_age_s: float = 86_400) -> None:
    """Remove the half-built warm starts of killed processes: ``<key>.tmp-<host>-<pid>`` folders whose process is
    gone (this host), or untouched for a day (another host sharing the cache)."""
    if not cache.is_dir():
        return
    host = socket.gethostname()
    for path in cache.glob("*.tmp-*"):
        tail = path.name.rsplit(".tmp-", 1)[1]
        owner, _, pid = tail.rpartition("-")
        if owner == host and pid.isdigit():
            try:
                os.kill(int(pid), 0)
                continue  # its process still runs
            except ProcessLookupError:
                pass
            except PermissionError:
                continue  # another user's live process
        elif time.time() - path.stat().st_mtime < max_age_s:
            continue
        shutil.rmtree(path, ignore_errors=True)
        info(f"removed {path}, a warm start left half-built by a killed process")


def _replay_curves(folder: Path, loggers: Sequence[Any]) -> None:
    """The cached π0's SFT curves to the run's loggers, so every run shows how its π0 was made."""
    if not loggers:
        return
    curves = load_curves(folder)
    if curves is None:
        info(f"pi0: {folder} was cached before the warm start saved its curves: no warmstart/* curves to show")
        return
    for row in curves:
        log_curves(loggers, row)


def _run_sft(
    policy,
    tokenizer,
    task,
    template,
    warmstart,
    out_dir,
    max_prompt_tokens,
    eval_sampling,
    verifier,
    skip,
    *,
    loggers: Sequence[Any],
    show_progress: bool,
) -> WarmStartReport:
    # Without a held-out split, the stop rule probes the pool's tail, which the SFT then leaves out.
    held_out = task.test or task.train[-warmstart["eval_problems"] :]
    probed = set() if task.test else {p.uid for p in held_out}
    # A problem without a worked solution (reasoning-gym's tasks, a JSONL of answers only) is trained on its
    # answer alone, stated the way the run's verifier reads it (\boxed{} or <answer> tags).
    trained = [p for p in task.train[skip:] if p.uid not in probed]  # skip: the RL pool, when left out
    if not trained:
        raise ValueError("warmstart.steps > 0 but the training split has no problem to SFT on")
    answer_only = sum(not p.solution for p in trained)
    if answer_only:
        info(f"warm start: {answer_only} of {len(trained)} problems have no worked solution: SFT on the answer alone")
    kept, prompt_ids, _ = encode_prompts(trained, tokenizer, template, max_prompt_tokens=max_prompt_tokens)
    examples = [
        (ids, encode_response(tokenizer, p.solution or verifier.format_answer(p.answer)))
        for p, ids in zip(kept, prompt_ids)
    ]
    probe, probe_ids, _ = encode_prompts(
        held_out[: warmstart["eval_problems"]], tokenizer, template, max_prompt_tokens=max_prompt_tokens
    )

    def measure(model) -> float:
        # the probe's own chunking (32768 padded tokens a call) and decoder: part of what the cached pi0 depends on
        # (where the SFT stops), so both stay as they were when the cache keys were made: a pi0 built today is the
        # one every earlier run and report started from
        generator = HFGenerator(model, tokenizer, token_budget=32768, show_progress=False, decoder="generate")
        groups = generator.generate(probe_ids, [warmstart["eval_samples"]] * len(probe_ids), eval_sampling)
        texts = [c.text for g in groups for c in g]
        golds = [p.gold for p, g in zip(probe, groups) for _ in g]
        return float(verifier.score(texts, golds).rewards.mean())

    # The stop rule samples from the global RNG: seed it from the warm start's own seed, so pi0 (which is
    # cached without the training seed in its key) never depends on which training seed ran first.
    with torch.random.fork_rng():
        torch.manual_seed(warmstart["seed"])
        return sft(
            policy,
            tokenizer,
            examples,
            steps=warmstart["steps"],
            batch_size=warmstart["batch_size"],
            lr=warmstart["lr"],
            seed=warmstart["seed"],
            eval_every=warmstart["eval_every"],
            target_accuracy=warmstart["target_accuracy"],
            schedule=warmstart["schedule"],
            measure=measure,
            out_dir=out_dir,
            loggers=loggers,
            show_progress=show_progress,
        )


def build_eval_plan(
    evaluation: dict[str, Any],
    benchmarks: dict[str, Any],
    *,
    task: TaskSplits,
    tokenizer,
    template: PromptTemplate,
    max_prompt_tokens: int | None,
) -> EvalPlan:
    """The ``eval`` group with its benchmarks loaded (``benchmarks`` group); drops and skips are reported.
    ``max_prompt_tokens`` None: no prompt is left out."""
    max_prompt_tokens = max_prompt_tokens if max_prompt_tokens is not None else 1 << 40
    loaded = load_benchmarks(
        evaluation["benchmarks"],
        sets=benchmarks["sets"],
        tokenizer=tokenizer,
        template=template,
        max_prompt_tokens=max_prompt_tokens,
        held_out=task.test,
        dir=benchmarks["dir"],
        on_bad_row=benchmarks["on_bad_row"],
    )
    for bench in loaded:
        for message in bench.skipped:
            warn(f"benchmark {bench.name}: skipped bad row: {message}")
        if bench.dropped:
            warn(
                f"benchmark {bench.name}: {len(bench.dropped)} prompt(s) over eval.max_prompt_tokens="
                f"{max_prompt_tokens} left out of its scores, e.g. {bench.dropped[0]}"
            )
        info(f"benchmark {bench.name}: {len(bench.problems)} problems, levels {bench.levels}")
    options = {k: evaluation[k] for k in ("samples", "every", "every_samples", "before_training")}
    options["reuse_pi0"] = evaluation.get("reuse_pi0", True)
    return EvalPlan(
        loaded,
        pass_k=tuple(evaluation["pass_k"]),
        sampling=SamplingParams(**evaluation["sampling"]),
        averages=benchmarks["averages"],
        **options,
    )


def _wait_or_load(folder: Path, dtype: torch.dtype, timeout_s: float = 1800.0):
    """Rank 0 builds the cache; other ranks of a simultaneous launch wait for its folder to appear."""
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    deadline = time.monotonic() + (timeout_s if rank > 0 else 0.0)
    while True:
        cached = load_cached(folder, dtype)
        if cached is not None or time.monotonic() >= deadline:
            return cached
        time.sleep(2.0)


def _accuracy(report: WarmStartReport) -> str:
    return f"accuracy {100 * report.accuracy:.0f}%" if report.accuracy >= 0 else "accuracy not measured"
