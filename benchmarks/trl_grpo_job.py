"""One TRL ``GRPOTrainer`` run doing the work of one kit run: the job that ``benchmarks/trl_compare.py`` launches.

    python benchmarks/trl_grpo_job.py --kit-config <kit run>/resolved_config.yaml --model <HF folder> \\
        --out <folder> [--threads N]

Everything that defines the work is read from the kit run's ``resolved_config.yaml`` (``matched_settings``): the
prompt pool (``data.source``, ``pool_size``, ``max_prompt_tokens``), the template, the reward (the kit's
``MathVerifier`` with the ``reward`` group's settings, called as a TRL reward function), the sampling parameters,
the group size, samples per iteration, optimiser updates and sequences per update, the loss (clip, dual clip,
KL coefficient, token-mean over the update), the optimiser and its learning-rate schedule (passed to the trainer
as the kit builds them: torch AdamW over every parameter, the kit's warm-up-cosine multipliers). ``--model`` is
π0 as a Hugging Face folder with its tokenizer (``trl_compare.py`` copies the kit's cached warm start there).

The job trains ``trainer.train()``, then saves the policy (``trainer.save_model``), as a user's script would keep
its result, and writes ``<out>/result.json``: ``loop_s``, the seconds from TRL's ``on_train_begin`` callback (after
the model, reference model, optimiser and dataloader are built, just before the first generation) to
``on_train_end`` (after the last optimiser update and its logging); ``train_s``, the whole ``trainer.train()``
call; ``setup_s``, from the start of ``main()`` to the ``train()`` call; ``save_s``; the generated samples and
response tokens (EOS included, as the kit counts them) seen by the reward function, the accepted samples and the
optimiser updates made.

Needs TRL: ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

BENCH_EXTRA = "pip install -e '.[bench]'"


class Unmatched(ValueError):
    """The kit run does work TRL's GRPOTrainer cannot be set to do."""


def matched_settings(kit: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str, str]], list[str]]:
    """(``GRPOConfig`` keyword arguments, table rows ``(setting, kit, TRL)``, differences that cannot be matched)
    for the work of the kit run whose resolved config is ``kit``. Raises ``Unmatched`` when TRL cannot do it."""
    algo, sampling = kit["algo"], kit["rollout"]["sampling"]
    n = int(kit["allocation"]["n_per_prompt"])
    prompts, batch, updates = (
        int(kit["prompts_per_iteration"]),
        int(kit["batch_size"]),
        int(kit["updates_per_iteration"]),
    )
    iterations = int(kit["iterations"])
    if not str(kit["allocation"].get("_target_", "")).endswith("Uniform"):
        raise Unmatched(f"allocation {kit['allocation'].get('_target_')}: TRL draws the same n for every prompt")
    if algo["loss"] not in ("grpo", "drgrpo"):
        raise Unmatched(f"algo.loss={algo['loss']}: TRL's GRPOTrainer has GRPO's group advantages only")
    if kit["update_accounting"] != "fixed" or prompts * n != batch * updates:
        raise Unmatched(
            f"{prompts} prompts x {n} samples per iteration in {updates} updates of {batch}: TRL uses every sample "
            "exactly once per update pass, so samples per iteration must equal updates x batch "
            "(update_accounting=fixed)"
        )
    if not algo["keep_rejected"] or algo["filter_equal_groups"]:
        raise Unmatched("TRL trains on every sample: needs algo.keep_rejected=true, algo.filter_equal_groups=false")
    micro = algo.get("micro_batch_size") or batch
    if batch % micro:
        raise Unmatched(f"batch_size={batch} is not a multiple of algo.micro_batch_size={micro}")
    accumulation = batch // micro
    loss_type = {"token-mean": "bnpo", "seq-mean-token-mean": "grpo"}.get(algo["loss_agg"])
    if loss_type is None:
        raise Unmatched(f"algo.loss_agg={algo['loss_agg']}: no TRL loss_type aggregates that way")
    on_cpu = kit["trainer"]["accelerator"] == "cpu"
    precision = str(kit["trainer"].get("precision", "32-true"))
    config = {
        "per_device_train_batch_size": micro,
        "gradient_accumulation_steps": accumulation,
        "generation_batch_size": prompts * n,  # TRL derives steps_per_generation = generation batch / micro-batch
        "num_generations": n,
        "num_iterations": 1,
        "max_steps": iterations * updates,
        "max_completion_length": int(sampling["max_new_tokens"]),
        "temperature": float(sampling["temperature"]),
        "top_p": float(sampling["top_p"]),
        "top_k": int(sampling["top_k"]),
        "loss_type": loss_type,
        "scale_rewards": "group" if algo["loss"] == "grpo" else "none",
        "epsilon": float(algo["clip_low"]),
        "epsilon_high": float(algo["clip_high"]),
        "delta": None if algo.get("clip_ratio_c") is None else float(algo["clip_ratio_c"]),
        "beta": float(algo.get("kl_coef") or 0.0),
        "learning_rate": float(algo["lr"]),
        "weight_decay": float(algo["weight_decay"]),
        "adam_beta1": float(algo["betas"][0]),
        "adam_beta2": float(algo["betas"][1]),
        "warmup_steps": int(algo["warmup_updates"]),
        "max_grad_norm": float(algo["grad_clip"]),
        "seed": int(kit["seed"]),
        "shuffle_dataset": True,
        "activation_checkpointing": bool(kit.get("activation_checkpointing", False)),
        "bf16": precision.startswith("bf16"),
        "fp16": precision.startswith("16"),
        "use_cpu": on_cpu,
        "logging_steps": 1,
        "report_to": "tensorboard",
        "save_strategy": "no",
    }
    schedule = "cosine" if algo["lr_schedule"] == "cosine" else "constant"
    rows = [
        ("model", "the kit's pi0 (cached warm start)", "the same weights and tokenizer, saved as an HF folder"),
        (
            "prompts",
            f"pool of {kit.get('pool_size') or 'all'} training problems of {kit['data']['source'].get('_target_')}",
            "the same pool, the same template (the kit's PromptTemplate render, token ids checked)",
        ),
        (
            "prompt choice",
            f"pool_sampling={kit['pool_sampling']}: {prompts} prompts an iteration",
            "shuffle_dataset=True: the pool shuffled once, taken in order",
        ),
        ("samples per prompt", f"allocation.n_per_prompt={n}", f"num_generations={n}"),
        (
            "samples per iteration",
            f"prompts_per_iteration={prompts} x {n} = {prompts * n}",
            f"generation_batch_size={prompts * n}",
        ),
        ("sampling", _sampling(sampling), _sampling(sampling)),
        ("iterations", str(iterations), f"{iterations} generations"),
        (
            "optimiser updates",
            f"updates_per_iteration={updates} x {iterations} = {updates * iterations}",
            f"max_steps={updates * iterations}, steps_per_generation={updates * accumulation}",
        ),
        (
            "sequences per update",
            f"batch_size={batch}, micro_batch_size={algo.get('micro_batch_size')}",
            f"per_device_train_batch_size={micro} x gradient_accumulation_steps={accumulation}",
        ),
        ("passes over each sample", "1 (fixed accounting)", "num_iterations=1"),
        (
            "advantage",
            f"{algo['loss']}: (r - mean_g) / (std_g + 1e-6)" if algo["loss"] == "grpo" else "drgrpo: r - mean_g",
            f"scale_rewards={config['scale_rewards']!r}" + (" (std_g + 1e-4)" if algo["loss"] == "grpo" else ""),
        ),
        (
            "clip",
            f"clip_low={algo['clip_low']}, clip_high={algo['clip_high']}",
            f"epsilon={config['epsilon']}, epsilon_high={config['epsilon_high']}",
        ),
        ("dual clip (A < 0)", f"clip_ratio_c={algo.get('clip_ratio_c')}", f"delta={config['delta']} (the same cap)"),
        ("KL to pi0", f"k3, kl_coef={algo.get('kl_coef')}", f"k3, beta={config['beta']}"),
        (
            "loss aggregation",
            f"{algo['loss_agg']} over the update ({algo['loss_scope']})",
            f"loss_type={loss_type!r}" + (" (token mean of the update)" if loss_type == "bnpo" else ""),
        ),
        (
            "old log-probs",
            f"recompute_old_logprobs={algo['recompute_old_logprobs']}",
            "a forward pass of the policy after generation (steps_per_generation > gradient_accumulation_steps)",
        ),
        (
            "optimiser",
            f"AdamW lr={algo['lr']}, wd={algo['weight_decay']}, betas={tuple(algo['betas'])}, clip {algo['grad_clip']}",
            "the same torch AdamW over every parameter, passed as optimizers=, max_grad_norm="
            f"{config['max_grad_norm']}",
        ),
        (
            "learning-rate schedule",
            f"warm-up {algo['warmup_updates']}, {schedule} to {algo['min_lr_ratio']} x lr",
            "the kit's multipliers (dibs.core.schedules.warmup_cosine) in a LambdaLR",
        ),
        ("reward", _reward(kit["reward"]), "the same verifier and settings, as a reward function"),
        ("precision", precision, f"bf16={config['bf16']}, fp16={config['fp16']} (GRPOConfig defaults to bf16)"),
        (
            "activation checkpointing",
            str(config["activation_checkpointing"]),
            f"activation_checkpointing={config['activation_checkpointing']} (GRPOConfig: True)",
        ),
        ("device", f"trainer.accelerator={kit['trainer']['accelerator']}", f"use_cpu={on_cpu}"),
        ("per-update logging", "TensorBoard, every update", "report_to='tensorboard', logging_steps=1"),
        ("checkpoints in the loop", "after every iteration (outside its clock)", "save_strategy='no'"),
    ]
    unmatched = [
        f"generation backend: the kit's rollout.backend={kit['rollout']['backend']} generator ({_generator(kit)}) vs "
        "TRL's one transformers "
        f"model.generate() call over all {prompts * n} rows of a generation batch (its default path: use_vllm=False, "
        "no continuous batching)",
        "which prompts: both draw from the same pool at random, with their own RNGs, so not the same prompts in "
        "the same order, and the policies' samples (hence completion lengths) diverge: tokens per sample are shown",
        "padding: TRL pads every row of a generation batch to its longest prompt and completion and trains its "
        "slices at that width; the kit trims each update to its own longest sequence (an implementation choice of "
        "each, not a setting)",
        "advantage epsilon: kit std + 1e-6, TRL std + 1e-4 (both 0 for equal-reward groups)",
        "KL: the kit clamps k3 to [-10, 10], TRL does not",
        "evaluation: the kit evaluates pi0 and the policy after iterations (eval group); TRL evaluates nothing by "
        "default (eval_strategy='no'); neither is inside a loop clock",
        "warm caches: the kit's loop starts after its pi0 evaluation has run the model and started the verifier's "
        "worker pool; the TRL job starts that pool before train() (outside the clock), and its first generation is "
        "the model's first call",
    ]
    if algo["recompute_old_logprobs"] is not True:
        unmatched.append(
            f"old log-probs: the kit's recompute_old_logprobs={algo['recompute_old_logprobs']} may take the sampler's "
            "own log-probs (no extra pass); TRL's transformers path always recomputes them with a forward pass"
        )
    if kit["pool_sampling"] != "random":
        unmatched.append(f"pool_sampling={kit['pool_sampling']}: TRL shuffles the pool once instead")
    if accumulation > 1:
        unmatched.append(
            f"micro-batches: the kit normalises the token mean over the whole update ({algo['loss_scope']}), TRL's "
            "bnpo over each micro-batch, averaged"
        )
    return config, rows, unmatched


def _sampling(sampling: dict[str, Any]) -> str:
    return (
        f"T={sampling['temperature']}, top_p={sampling['top_p']}, top_k={sampling['top_k']}, "
        f"max_new_tokens={sampling['max_new_tokens']}"
    )


def _generator(kit: dict[str, Any]) -> str:
    options = kit["rollout"]["generator"].items()
    return ", ".join(f"{k}={v}" for k, v in options if not k.startswith("_") and k != "show_progress")


def _reward(reward: dict[str, Any]) -> str:
    name = str(reward.get("_target_", "?")).rsplit(".", 1)[-1]
    return f"{name}({', '.join(f'{k}={v}' for k, v in reward.items() if not k.startswith('_'))})"


def main() -> None:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kit-config", type=Path, required=True, help="a kit run's resolved_config.yaml")
    parser.add_argument("--model", type=Path, required=True, help="pi0 as an HF folder with its tokenizer")
    parser.add_argument("--out", type=Path, required=True, help="the run's folder (result.json, logs, the policy)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        from trl import GRPOConfig, GRPOTrainer
    except ImportError:
        sys.exit(f"trl is not installed: {BENCH_EXTRA}")
    import yaml
    from datasets import Dataset
    from hydra.utils import instantiate
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from dibs.core.schedules import warmup_cosine
    from dibs.data.prompts import PromptTemplate, encode_prompts

    kit = yaml.safe_load(args.kit_config.read_text())
    config, _, _ = matched_settings(kit)
    task = instantiate(kit["data"]["source"])
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=getattr(torch, kit["model"].get("dtype") or "float32")
    )
    template = PromptTemplate(**kit["template"])
    pool = task.train[: kit.get("pool_size")]
    kept, prompt_ids, _ = encode_prompts(pool, tokenizer, template, max_prompt_tokens=kit["max_prompt_tokens"])
    texts = [template.render(tokenizer, p.problem) for p in kept]
    for text, ids in zip(texts[:32], prompt_ids[:32]):  # TRL tokenises a text prompt with the tokenizer's defaults
        if tokenizer(text)["input_ids"] != ids:
            raise SystemExit(f"TRL's tokenisation of {text!r} differs from the kit's: the prompts would not match")
    dataset = Dataset.from_list([{"prompt": t, "gold": p.gold} for t, p in zip(texts, kept)])

    verifier = instantiate(kit["reward"])
    verifier.score(["\\boxed{1/2}"], ["0.5"])  # starts its worker pool (math-verify decides this one) before the clock
    counts = {"samples": 0, "tokens": 0, "accepted": 0}

    def math_verifier(prompts, completions, completion_ids, gold, **_):
        """The kit's verifier as a TRL reward function: 1 for a correct last \\boxed{}, else 0."""
        scored = verifier.score(completions, gold)
        counts["samples"] += len(completions)
        counts["tokens"] += sum(len(ids) for ids in completion_ids)
        counts["accepted"] += int(scored.rewards.sum())
        return scored.rewards.tolist()

    class LoopClock(TrainerCallback):
        began = ended = 0.0

        def on_train_begin(self, *_, **__):
            LoopClock.began = time.perf_counter()

        def on_train_end(self, *_, **__):
            LoopClock.ended = time.perf_counter()

    algo = kit["algo"]
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=algo["lr"], weight_decay=algo["weight_decay"], betas=tuple(algo["betas"])
    )
    total = config["max_steps"] if algo["lr_schedule"] == "cosine" else 0
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: warmup_cosine(step, warmup=algo["warmup_updates"], total=total, floor=algo["min_lr_ratio"]),
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=math_verifier,
        args=GRPOConfig(output_dir=str(args.out), **config),
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[LoopClock()],
        optimizers=(optimizer, schedule),
    )
    train_started = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - train_started
    save_started = time.perf_counter()
    trainer.save_model(str(args.out / "policy"))
    save_s = time.perf_counter() - save_started
    verifier.close()
    result = {
        **counts,
        "updates": trainer.state.global_step,
        "loop_s": LoopClock.ended - LoopClock.began,
        "train_s": train_s,
        "setup_s": train_started - started,
        "save_s": save_s,
        "threads": torch.get_num_threads(),
        "prompts_in_pool": len(kept),
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
