"""The model card of a Hugging Face export (its ``README.md``, written by ``dibs.lit.export``): what trained the
policy and on what (``card_facts``, from the run's config, overrides and group choices), its held-out scores at
that iteration against π0's, the prompt template it expects and how to load and evaluate it (``model_card``)."""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from typing import Any

from huggingface_hub import ModelCardData

from dibs import __version__
from dibs.core.tags import VAL_ACC
from dibs.lit.evaluation import EvalResult
from dibs.lit.weights import EXPORT_META
from dibs.rollout.base import SamplingParams

__all__ = ["MANIFEST", "card_facts", "folder_name", "model_card"]

MANIFEST = "exports.json"  # in the hf/ folder: the kept exports, the best and the last


def folder_name(iteration: int) -> str:
    return f"iter_{iteration:03d}"


def card_facts(config: Mapping[str, Any], overrides: Sequence[str], choices: Mapping[str, Any]) -> dict[str, Any]:
    """What trained the policy and on what, for the model card: from the resolved config, the command line's
    ``overrides`` and the config groups chosen (Hydra's ``runtime.choices``). Plain values only."""
    model, source, warm = config["model"], dict(config["data"]["source"]), config["warmstart"]
    target = source.pop("_target_", "?")
    if model.get("path"):
        base = f"`{model['path']}`"
    else:
        tiny = model.get("tiny") or {}
        shape = ", ".join(f"{k} {v}" for k, v in tiny.items() if k in ("hidden_size", "num_hidden_layers"))
        base = f"the embedded tiny Qwen2 ({shape}), built from the config with its own byte-level BPE tokenizer"
    if warm.get("steps", 0) > 0:
        base += f", warm-started by SFT on the training split (up to {warm['steps']} steps, pi0)"
    return {
        "dibs_version": __version__,
        "algo": choices.get("algo") or config["algo"]["loss"],
        "loss": config["algo"]["loss"],
        "allocation": choices.get("allocation", "?"),
        "n_per_prompt": config["allocation"].get("n_per_prompt"),
        "experiment": choices.get("experiment"),
        "iterations": config["iterations"],
        "prompts_per_iteration": config["prompts_per_iteration"],
        "seed": config["seed"],
        # what trained it: not how it resumed, nor where it logged (a tracking URI may hold credentials)
        "overrides": [o for o in overrides if o != "ckpt_path=last" and not o.lstrip("+~").startswith("logger")],
        "data": f"data={choices.get('data', '?')}: `{target}` ("
        + ", ".join(f"{k}={v}" for k, v in source.items() if v is not None)
        + ")",
        "base_model": base,
        "reward": choices.get("reward"),
        "template_name": choices.get("template"),
        "template": dict(config["template"]),
        "eval_benchmarks": list(config["eval"]["benchmarks"]),
    }


def _scores_table(rows: Sequence[tuple[str, EvalResult]]) -> list[str]:
    k = rows[0][1].samples
    pass_keys = sorted(
        {key for _, e in rows for s in e.scores.values() for key in s if key.startswith("pass@") and "/" not in key},
        key=lambda key: int(key.split("@")[1]),
    )
    heads = [f"avg@{k}", *pass_keys, f"maj@{k}"]
    lines = ["| benchmark | policy | " + " | ".join(heads) + " |", "|---" * (2 + len(heads)) + "|"]
    for label, result in rows:
        for name, scores in result.scores.items():
            cells = [f"{100 * scores[h]:.1f}" if h in scores else "-" for h in heads]
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
        for name, value in result.averages.items():
            lines.append(f"| {name} | {label} | {100 * value:.1f} |" + " |" * (len(heads) - 1))
    return lines


def model_card(
    facts: Mapping[str, Any],
    *,
    iteration: int,
    global_step: int,
    evals: Sequence[EvalResult],
    sampling: SamplingParams,
) -> str:
    """The export's README.md: metadata (YAML) and what trained it, on what, its held-out scores at this iteration
    against pi0's, the prompt it expects and how to load it."""
    metadata = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["dibs", "reasoning", str(facts.get("algo")), str(facts.get("allocation"))],
    )
    template = facts.get("template") or {}
    system, suffix, prefix = (template.get(k) or "" for k in ("system_prompt", "user_suffix", "response_prefix"))
    mine = next((e for e in reversed(evals) if e.iteration == iteration), None)
    pi0 = next((e for e in evals if e.iteration == 0), None)
    overrides = shlex.join(facts.get("overrides", []))  # quoted for a shell: eval.pass_k=[1,2] is a glob there
    if any(o.lstrip("+").startswith("grid=") for o in facts.get("overrides", [])):
        overrides = f"-m {overrides}"  # a grid launches with -m (its axes fixed by the run's own values)
    lines = [
        "---",
        metadata.to_yaml(),
        "---",
        "",
        f"# dibs policy after iteration {iteration} of {facts.get('iterations')}",
        "",
        f"Trained with dibs {facts.get('dibs_version')}: algorithm "
        f"`{facts.get('algo')}` (loss `{facts.get('loss')}`), sampling strategy `{facts.get('allocation')}`"
        + (f" ({facts['n_per_prompt']} samples per prompt)" if facts.get("n_per_prompt") else "")
        + f", {iteration} EM iteration(s) of {facts.get('prompts_per_iteration')} prompts and {global_step} "
        f"optimiser updates so far, seed {facts.get('seed')}"
        + (f", preset `experiment={facts['experiment']}`" if facts.get("experiment") else "")
        + ".",
        "",
        "## Training",
        "",
        f"- **Data**: {facts.get('data')}",
        f"- **Base model**: {facts.get('base_model')}",
        f"- **Run**: `{' '.join(['dibs-train', overrides]).strip()}`",
        "",
        "## Held-out evaluation",
        "",
    ]
    if mine is None:
        lines.append(
            f"Iteration {iteration} was not evaluated (`eval.every`); the run's evaluations are in its logs "
            f" and `hf/{MANIFEST}`."
        )
    else:
        k = mine.samples
        lines += [
            f"{k} samples per problem; Average@{k} is the mean accuracy of the samples, pass@j the share of problems "
            f"solved by one of j, maj@{k} the majority vote's accuracy (in %). `{VAL_ACC}` = "
            f"{100 * mine.accuracy:.1f}" + (f" (pi0: {100 * pi0.accuracy:.1f})" if pi0 else "") + ".",
            "",
            *_scores_table([(f"iteration {iteration}", mine), *([("pi0", pi0)] if pi0 else [])]),
        ]
    user = f"problem + {suffix!r}" if suffix else "problem"
    prompt_code = [
        "messages = []" if not system else f"messages = [{{'role': 'system', 'content': {system!r}}}]",
        f"messages.append({{'role': 'user', 'content': {user}}})",
        "prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)"
        + (f" + {prefix!r}" if prefix else ""),
    ]
    lines += [
        "",
        "## Prompt",
        "",
        f"Template `{facts.get('template_name') or '?'}`, rendered by the tokenizer's chat template: "
        + "; ".join(
            [
                f"system prompt {system!r}" if system else "no system prompt",
                f"after the problem {suffix!r}" if suffix else "the problem alone as the user turn",
                f"the answer opened with {prefix!r}" if prefix else "nothing opens the answer",
            ]
        )
        + f". The reward (`reward={facts.get('reward') or '?'}`) scores the final answer the response states.",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'folder = "."  # this folder',
        "tokenizer = AutoTokenizer.from_pretrained(folder)",
        "model = AutoModelForCausalLM.from_pretrained(folder)",
        'problem = "..."',
        *prompt_code,
        "inputs = tokenizer(prompt, return_tensors='pt', add_special_tokens=False)",
        "output = model.generate(**inputs)  # samples as the run did: generation_config.json",
        "print(tokenizer.decode(output[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True))",
        "```",
        "",
        f"`generation_config.json` holds the run's sampling: temperature {sampling.temperature}, top-p "
        f"{sampling.top_p}, top-k {sampling.top_k or 'off'}, up to {sampling.max_new_tokens} new tokens. "
        "With the run's overrides, the standalone evaluation repeats this iteration's evaluation exactly "
        f"(`{EXPORT_META}` holds its iteration and seed):",
        "",
        "```bash",
        f"python -m dibs.evaluate evaluate.checkpoint=path/to/{folder_name(iteration)} {overrides}".strip(),
        "```",
        "",
    ]
    return "\n".join(lines)
