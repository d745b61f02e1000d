"""Sampling throughput of the HF backend against the floor: a minimal hand-written decode loop.

All methods draw n samples for each of P prompts of the embedded task from the same model, with T = 1,
top-k and top-p off and the same ``--max-new-tokens``; rounds are interleaved (each round runs every method
once, in turn) and the median over ``--rounds`` is reported. Generated tokens are counted up to and including
EOS. The methods:

  floor            a minimal decode loop written here, on the kit's batches (rows sorted by prompt length,
                   chunks of ``token_budget`` padded tokens: what the model costs on these shapes): a KV
                   cache, softmax + multinomial, finished rows dropped every step; no log-probs, no
                   top-k/top-p, no text
  dibs loop        the kit's HFGenerator with decoder=loop (its default): chunks of ``token_budget``
                   padded tokens, log-probs from the sampler's softmax, decoded text, Completion objects
  dibs generate    the kit's HFGenerator with decoder=generate: model.generate per chunk + a teacher-forced
                   log-prob pass (the kit's earlier path)
  plain generate   one batched model.generate call over all rows, nothing else

The figure is ``dibs loop / floor``. Models: ``--model default`` is the default job's pi0 (built by its warm
start if the cache lacks it, about two minutes); ``--model random`` a randomly initialised Qwen2 of
``--hidden``/``--layers`` (``--hidden 256 --layers 4``: 4.2M parameters) which rarely draws EOS.

    python benchmarks/generation_throughput.py                                   # default pi0, 512 x 4
    python benchmarks/generation_throughput.py --model random --hidden 256 --layers 4
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("default", "random"), default="default")
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--n", type=int, default=4, help="samples per prompt (the default job's best-of-n)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256, help="--model random: hidden size")
    parser.add_argument("--layers", type=int, default=4, help="--model random: decoder layers")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache" / "dibs"), help="--model default: pi0's cache")
    parser.add_argument("--skip", nargs="*", default=[], help="methods to leave out, e.g. 'plain generate'")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from dibs.core.batching import chunk_by_tokens
    from dibs.modeling import count_parameters
    from dibs.rollout.base import SamplingParams
    from dibs.rollout.hf import HFGenerator

    model, tokenizer, prompts, token_budget = _setup(args)
    model = model.eval().requires_grad_(False)
    sampling = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=args.max_new_tokens)
    print(
        f"model: {args.model} Qwen2, {count_parameters(model) / 1e6:.2f}M parameters; {len(prompts)} prompts x "
        f"{args.n} samples, T=1, max_new_tokens={args.max_new_tokens}, {torch.get_num_threads()} threads, "
        f"token_budget={token_budget}, median of {args.rounds} interleaved rounds"
    )
    loop = HFGenerator(model, tokenizer, token_budget=token_budget, show_progress=False, decoder="loop")
    old = HFGenerator(model, tokenizer, token_budget=token_budget, show_progress=False, decoder="generate")
    counts = [args.n] * len(prompts)
    rows = sorted((p for p in prompts for _ in range(args.n)), key=len, reverse=True)  # as HFGenerator batches
    chunks = [[rows[j] for j in c] for c in chunk_by_tokens([len(p) for p in rows], args.max_new_tokens, token_budget)]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    def kit(generator):
        groups = generator.generate(prompts, counts, sampling)
        return sum(len(c.token_ids) for g in groups for c in g)

    methods = {
        "floor": lambda: sum(_floor(loop.model, c, args.max_new_tokens, eos, pad) for c in chunks),
        "dibs loop": lambda: kit(loop),
        "dibs generate": lambda: kit(old),
        "plain generate": lambda: _plain_generate(loop.model, prompts, args.n, args.max_new_tokens, eos, pad),
    }
    methods = {k: v for k, v in methods.items() if k not in args.skip}
    torch.manual_seed(0)
    loop.generate(prompts[:4], [2] * 4, sampling)  # warm-up (allocator, first-call paths)
    rates: dict[str, list[float]] = {k: [] for k in methods}
    tokens: dict[str, list[int]] = {k: [] for k in methods}
    for r in range(args.rounds):
        for name, run in methods.items():
            torch.manual_seed(1000 + r)
            started = time.perf_counter()
            n_tokens = run()
            seconds = time.perf_counter() - started
            rates[name].append(n_tokens / seconds)
            tokens[name].append(n_tokens)
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("method")
    for column in ("tokens (median)", "tokens/s (median)", "min", "max", "x floor"):
        table.add_column(column, justify="right")
    floor = statistics.median(rates["floor"]) if "floor" in rates else float("nan")
    for name in methods:
        med = statistics.median(rates[name])
        cells = (statistics.median(tokens[name]), med, min(rates[name]), max(rates[name]))
        table.add_row(name, *(f"{x:.0f}" for x in cells), f"{med / floor:.2f}")
    Console(width=120).print(table)
    print(f"dibs loop / floor: {statistics.median(rates['dibs loop']) / floor:.2f}")


def _setup(args):
    """(model, tokenizer, prompt ids, the default job's token_budget)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from dibs.conf import register_resolvers
    from dibs.data.prompts import PromptTemplate, encode_prompts

    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("config", overrides=[f"cache_dir={args.cache_dir}"])
    plain = lambda node: OmegaConf.to_container(node, resolve=True)
    task = instantiate(cfg.data.source)
    template = PromptTemplate(**plain(cfg.template))
    if args.model == "default":
        from dibs.lit.assemble import policy_from_config

        with instantiate(cfg.reward) as verifier:  # the warm start's accuracy probe, when π0 is not cached
            model, tokenizer = policy_from_config(cfg, task, verifier)
    else:
        from dibs.data.synthetic import corpus
        from dibs.data.tokenizer import train_tokenizer
        from dibs.modeling import build_tiny_qwen2

        tokenizer = train_tokenizer(corpus(task.train), tempfile.mkdtemp(), vocab_size=cfg.model.vocab_size)
        model = build_tiny_qwen2(
            tokenizer, hidden_size=args.hidden, num_hidden_layers=args.layers, intermediate_size=4 * args.hidden, seed=0
        )
    problems = task.train[: args.prompts]
    _, prompts, _ = encode_prompts(problems, tokenizer, template, max_prompt_tokens=cfg.max_prompt_tokens)
    return model, tokenizer, prompts, cfg.rollout.generator.token_budget


@torch.no_grad()
def _floor(model, rows, max_new_tokens, eos, pad) -> int:
    """A minimal decode loop: the rows in one left-padded batch, KV cache, finished rows dropped."""
    from transformers import DynamicCache

    width = max(len(p) for p in rows)
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in rows])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, logits_to_keep=1).logits[:, -1]
    pos, generated = pos[:, -1:], 0
    for step in range(max_new_tokens):
        token = torch.multinomial(logits.softmax(-1), 1)  # [A, 1]
        generated += len(token)
        alive = token[:, 0] != eos
        if step + 1 == max_new_tokens or not alive.any():
            break
        if not alive.all():
            keep = alive.nonzero()[:, 0]
            token, mask, pos = token[keep], mask[keep], pos[keep]
            cache.batch_select_indices(keep)
        mask, pos = torch.cat([mask, torch.ones_like(pos)], -1), pos + 1
        logits = model(input_ids=token, attention_mask=mask, position_ids=pos, cache=cache).logits[:, -1]
    return generated


@torch.no_grad()
def _plain_generate(model, prompts, n, max_new_tokens, eos, pad) -> int:
    rows = [p for p in prompts for _ in range(n)]
    width = max(len(p) for p in rows)
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in rows])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows])
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad,
        eos_token_id=eos,
    )[:, width:]
    total = 0
    for row in out:
        hits = (row == eos).nonzero()
        total += int(hits[0]) + 1 if len(hits) else len(row)
    return total


if __name__ == "__main__":
    main()
