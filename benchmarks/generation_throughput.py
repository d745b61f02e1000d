"""Sampling throughput of the HF backend against a per-prompt ``generate`` loop (the reference's pattern).

Both draw n samples for each of P prompts of the embedded task from the same model, with the same explicit
sampling parameters; the loop issues one ``generate(num_return_sequences=n)`` call per prompt, the kit
batches all rows into left-padded chunks of at most ``--token-budget`` tokens. Generated tokens are
counted up to and including EOS (padding excluded); the kit's time includes its log-prob pass.

    python benchmarks/generation_throughput.py                    # the default job's model and n = 4
    python benchmarks/generation_throughput.py --n 8 --prompts 64
    python benchmarks/generation_throughput.py --hidden 256 --layers 4 --prompts 32
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--n", type=int, default=4, help="samples per prompt (the default job's best-of-n)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--token-budget", type=int, default=65536)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from dibs.data.prompts import PromptTemplate, encode_prompts
    from dibs.data.synthetic import corpus, make_task
    from dibs.data.tokenizer import train_tokenizer
    from dibs.modeling import build_tiny_qwen2, count_parameters
    from dibs.rollout.base import SamplingParams
    from dibs.rollout.hf import HFGenerator

    task = make_task(seed=0, n_train=2000, n_test=max(200, args.prompts))
    tokenizer = train_tokenizer(corpus(task.train), tempfile.mkdtemp(), vocab_size=512)
    model = build_tiny_qwen2(
        tokenizer, hidden_size=args.hidden, num_hidden_layers=args.layers, intermediate_size=4 * args.hidden, seed=0
    ).eval()
    _, prompts, _ = encode_prompts(
        task.test[: args.prompts], tokenizer, PromptTemplate(None, "", ""), max_prompt_tokens=512
    )
    sampling = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=args.max_new_tokens)
    print(
        f"model: Qwen2 hidden={args.hidden} layers={args.layers} ({count_parameters(model) / 1e6:.2f}M params), "
        f"{len(prompts)} prompts x {args.n} samples, max_new_tokens={args.max_new_tokens}, "
        f"{torch.get_num_threads()} threads"
    )

    generator = HFGenerator(model, tokenizer, token_budget=args.token_budget, show_progress=False)
    torch.manual_seed(0)
    generator.generate(prompts[:2], [1, 1], sampling)  # warm-up
    started = time.perf_counter()
    groups = generator.generate(prompts, [args.n] * len(prompts), sampling)
    kit_s = time.perf_counter() - started
    kit_tokens = sum(len(c.token_ids) for g in groups for c in g)

    started, loop_tokens = time.perf_counter(), 0
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = generator.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                num_return_sequences=args.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                max_new_tokens=sampling.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            loop_tokens += _count_generated(out[:, ids.shape[1] :], tokenizer.eos_token_id)
    loop_s = time.perf_counter() - started

    print(f"{'method':<28} {'tokens':>8} {'seconds':>8} {'tokens/s':>9}")
    print(f"{'per-prompt generate loop':<28} {loop_tokens:>8} {loop_s:>8.2f} {loop_tokens / loop_s:>9.0f}")
    print(f"{'dibs HFGenerator (batched)':<28} {kit_tokens:>8} {kit_s:>8.2f} {kit_tokens / kit_s:>9.0f}")
    print(f"speed-up: {(kit_tokens / kit_s) / (loop_tokens / loop_s):.1f}x")


def _count_generated(rows: torch.Tensor, eos: int) -> int:
    """Tokens up to and including the first EOS of each row (what the kit counts)."""
    total = 0
    for row in rows:
        hits = (row == eos).nonzero()
        total += int(hits[0]) + 1 if len(hits) else len(row)
    return total


if __name__ == "__main__":
    main()
