"""Standalone evaluation of any Hugging Face checkpoint folder: the loop's evaluation, without training.

    python -m dibs.evaluate evaluate.checkpoint=outputs/default/<time>/hf/iter_012   # the embedded test split
    python -m dibs.evaluate evaluate.checkpoint=/models/Qwen2.5-Math-1.5B eval=paper \
        benchmarks.dir=/data/benchmarks

The config is the training config (``conf/config.yaml``, its ``evaluate`` block), so every override of
``train.py`` applies and the defaults are the same: the template, ``max_prompt_tokens``, the ``eval`` group and
the benchmarks. A folder exported by a training run holds ``dibs_export.json`` (its iteration and seed):
the evaluation then draws exactly the samples the loop drew for that iteration, so on one process its
Average@k equals the logged ``val/<benchmark>/avg@k``. Writes ``eval.json`` and ``eval.md`` to ``evaluate.out_dir``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from dibs.conf import register_resolvers

log = logging.getLogger("dibs")
register_resolvers()
FAILURES = ("no_answer", "parse_error", "timeout", "error", "too_long")  # verifier statuses that are no verdict


@hydra.main(config_path="pkg://dibs.configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    import torch
    from hydra.utils import instantiate

    from dibs.data.benchmarks import check_benchmarks
    from dibs.data.prompts import PromptTemplate
    from dibs.data.synthetic import TaskSplits
    from dibs.data.tokenizer import load_tokenizer
    from dibs.lit.assemble import build_eval_plan
    from dibs.lit.console import setup_console
    from dibs.lit.evaluation import eval_seed, evaluate
    from dibs.lit.weights import EXPORT_META
    from dibs.modeling import load_pretrained, require_model_folder
    from dibs.schema import ConfigError, validate_config

    setup_console()  # Lightning's messages once each, without its tips; warnings logged (dibs.lit.console)
    try:  # the same schema as train.py: a bad value fails before any model is loaded
        validate_config(OmegaConf.to_container(cfg, resolve=True))
    except ConfigError as error:
        raise SystemExit(str(error)) from None
    if cfg.rollout.backend == "vllm":
        from dibs.rollout.availability import require_vllm

        require_vllm()  # before anything is loaded
    if cfg.evaluate.checkpoint is None:
        raise SystemExit("python -m dibs.evaluate needs evaluate.checkpoint=<a Hugging Face model folder>")
    folder = require_model_folder(cfg.evaluate.checkpoint, key="evaluate.checkpoint")
    meta = json.loads((folder / EXPORT_META).read_text()) if (folder / EXPORT_META).is_file() else {}
    seed, iteration = meta.get("seed", cfg.seed), meta.get("iteration", 0)
    setup: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    names, sets = setup["eval"]["benchmarks"], setup["benchmarks"]["sets"]
    check_benchmarks(names, sets, dir=setup["benchmarks"]["dir"], has_held_out=True)  # before any data is read
    needs_task = any(sets[name].get("path") is None for name in names)  # the data source's held-out split
    task = instantiate(cfg.data.source) if needs_task else TaskSplits(train=[], test=[])
    verifier = instantiate(cfg.reward)
    verifier.start()  # its workers start in the background while the benchmarks and the model load
    tokenizer = load_tokenizer(folder)
    template = PromptTemplate(**setup["template"])
    plan = build_eval_plan(
        setup["eval"], setup["benchmarks"], task=task, tokenizer=tokenizer, template=template,
        max_prompt_tokens=cfg.eval.max_prompt_tokens,
    )  # fmt: skip
    wanted = cfg.evaluate.device
    device = torch.device(wanted if wanted != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    policy = load_pretrained(folder, dtype=cfg.model.dtype, key="evaluate.checkpoint").eval()
    # a vLLM engine loads the checkpoint folder itself (no weights are pushed here); HF's generator moves its copy
    engine_folder = {"model_path": str(folder)} if cfg.rollout.backend == "vllm" else {}
    generator = instantiate(cfg.rollout.generator, **engine_folder)(model=policy, tokenizer=tokenizer)
    if hasattr(generator, "to"):
        generator.to(device)
    torch.manual_seed(eval_seed(seed, iteration))
    try:
        result = evaluate(
            generator, verifier, plan.benchmarks, samples=plan.samples, pass_k=plan.pass_k,
            sampling=plan.sampling, averages=plan.averages, iteration=iteration, device=device,
        )  # fmt: skip
    finally:
        verifier.close()
    report = build_report(result, plan, checkpoint=str(folder), seed=seed, template=setup["template"])
    out = Path(cfg.evaluate.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "eval.md").write_text(markdown(report))
    print(markdown(report))
    log.info("wrote %s and %s", out / "eval.json", out / "eval.md")
    return result.accuracy


def build_report(result, plan, *, checkpoint: str, seed: int, template: dict[str, Any]) -> dict[str, Any]:
    """Everything a reader needs to trust the numbers: settings, scores, and what could not be scored."""
    return {
        "checkpoint": checkpoint,
        "iteration": result.iteration,
        "seed": seed,
        "samples": result.samples,
        "pass_k": list(plan.pass_k),
        "sampling": dict(plan.sampling.__dict__),
        "template": template,
        "accuracy": result.accuracy,
        "averages": result.averages,
        "benchmarks": {
            bench.name: {
                "problems": len(bench.problems),
                "dropped_prompts": bench.dropped,
                "skipped_rows": bench.skipped,
                "scores": result.scores[bench.name],
            }
            for bench in plan.benchmarks
        },
    }


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: one row per benchmark, then per-level rows where a benchmark has levels."""
    from dibs.report.cells import table  # GitHub tables, as the grid reports write them

    k, ks = report["samples"], report["pass_k"]
    heads = [f"avg@{k}", *(f"pass@{j}" for j in ks), f"maj@{k}"]
    lines = [
        f"# Evaluation of `{report['checkpoint']}`",
        "",
        f"{k} samples per problem at temperature {report['sampling']['temperature']}, top-p "
        f"{report['sampling']['top_p']}, {report['sampling']['max_new_tokens']} new tokens; seed {report['seed']}, "
        f"iteration {report['iteration']}. Scores in %. Verifier columns count samples that got no verdict.",
        "",
    ]
    rows = []
    for name, bench in report["benchmarks"].items():
        scores = bench["scores"]
        cells = [f"{100 * scores[h]:.1f}" for h in heads] + [str(int(scores[f"verifier/{s}"])) for s in FAILURES]
        rows.append([name, str(bench["problems"]), *cells])
    for name, value in report["averages"].items():  # a suite average: its Average@k alone
        rows.append([name, "", f"{100 * value:.1f}", *[""] * (len(heads) + len(FAILURES) - 1)])
    lines += table(["benchmark", "problems", *heads, *FAILURES], rows)
    for name, bench in report["benchmarks"].items():
        levels = sorted({key.split("/level_")[1] for key in bench["scores"] if "/level_" in key})
        if levels:
            rows = [[level, *(f"{100 * bench['scores'][f'{h}/level_{level}']:.1f}" for h in heads)] for level in levels]
            lines += ["", f"## {name} by level", "", *table(["level", *heads], rows)]
    dropped = {n: len(b["dropped_prompts"]) for n, b in report["benchmarks"].items() if b["dropped_prompts"]}
    skipped = {n: len(b["skipped_rows"]) for n, b in report["benchmarks"].items() if b["skipped_rows"]}
    if dropped or skipped:
        lines += ["", f"Left out of the scores: over-long prompts {dropped or '{}'}, bad rows {skipped or '{}'}."]
    return "\n".join(lines) + "\n"


def cli() -> None:
    """The console script ``dibs-eval``: Hydra parses the command line."""
    main()


if __name__ == "__main__":
    cli()
