"""One EM iteration's phases on a randomly initialised model of Qwen2.5-1.5B's shape: sampling with the HF
backend, then RAFT++ updates (bf16 autocast, fp32 weights and AdamW, optional activation checkpointing),
with tokens/s and the peak of torch's allocations per phase. No download: the model is built from a config.

    python benchmarks/gpu_phases.py                               # Qwen2.5-1.5B's shape on cuda
    python benchmarks/gpu_phases.py --shape tiny --device cpu     # a check that the script runs anywhere
    python benchmarks/gpu_phases.py --json phases.json            # the figures also as JSON (scripts/gpu_check.sh)

A random model rarely emits EOS, so every sample runs to ``--new-tokens``: the sampling numbers are those of
full-length responses. The tokenizer is the embedded task's (its vocabulary is smaller than the model's);
sampled ids it does not know only affect the decoded text, which nothing here reads.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

SHAPES = {  # Qwen2.5-1.5B's config.json, and a tiny stand-in for a quick check
    "qwen2.5-1.5b": dict(
        hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
        intermediate_size=8960, vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True,
    ),
    "tiny": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=256, vocab_size=1024, max_position_embeddings=4096, tie_word_embeddings=True,
    ),
}  # fmt: skip


def phase(device: torch.device):
    """Seconds and peak allocated GiB of the code run between two calls (peaks only on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()

    def done() -> tuple[float, float]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            return time.perf_counter() - start, torch.cuda.max_memory_allocated(device) / 2**30
        return time.perf_counter() - start, float("nan")  # printed as "peak n/a"

    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-1.5b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=8, help="samples per prompt")
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--token-budget", type=int, default=8192, help="padded tokens per generate() call")
    parser.add_argument("--batch", type=int, default=16, help="sequences per update")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--layers", type=int, default=None, help="override the shape's decoder layers")
    parser.add_argument("--json", metavar="PATH", help="also write the settings and figures to this JSON file")
    args = parser.parse_args()
    device = torch.device(args.device)

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dibs.core.logprobs import sequence_logprobs
    from dibs.core.losses import raftpp_loss
    from dibs.data.prompts import PromptTemplate, encode_prompts
    from dibs.data.synthetic import corpus, make_task
    from dibs.data.tokenizer import train_tokenizer
    from dibs.rollout.base import SamplingParams
    from dibs.rollout.hf import HFGenerator

    task = make_task(seed=0, n_train=2000, n_test=args.prompts)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = train_tokenizer(corpus(task.train), folder, vocab_size=512)
    torch.manual_seed(0)
    shape = dict(SHAPES[args.shape], **({"num_hidden_layers": args.layers} if args.layers else {}))
    config = Qwen2Config(**shape, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    policy = Qwen2ForCausalLM(config).to(device)  # fp32 weights, as the trainer keeps them
    params = sum(p.numel() for p in policy.parameters())
    _, prompts, _ = encode_prompts(task.test, tokenizer, PromptTemplate(None, "", ""), max_prompt_tokens=1024)
    print(f"{args.shape}: {params / 1e6:.0f}M parameters on {device}; {len(prompts)} prompts x {args.n} samples")

    # ---- E-step: sampling (bf16 copy of the policy in the generator, as a colocated engine would hold) ----
    generator = HFGenerator(policy.to(torch.bfloat16 if device.type == "cuda" else torch.float32), tokenizer,
                            token_budget=args.token_budget, show_progress=False)  # fmt: skip
    policy.float()
    done = phase(device)
    groups = generator.generate(prompts, [args.n] * len(prompts), SamplingParams(max_new_tokens=args.new_tokens))
    seconds, peak = done()
    tokens = sum(len(c.token_ids) for g in groups for c in g)
    print(f"sampling : {tokens} tokens in {seconds:.1f} s = {tokens / seconds:,.0f} tokens/s; {_gib(peak)}")
    figures = {"sampling": _figures(tokens, seconds, peak)}
    del generator

    # ---- M-step: RAFT++ updates on the samples (every one accepted: the cost does not depend on rewards) ----
    if args.activation_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6, weight_decay=0.01)
    rows = [(torch.tensor(p), c) for p, g in zip(prompts, groups) for c in g][: args.batch * args.updates]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    done, trained = phase(device), 0
    for start in range(0, len(rows), args.batch):
        optimizer.zero_grad(set_to_none=True)
        update = rows[start : start + args.batch]
        denom = sum(len(c.token_ids) for _, c in update)  # token-mean over the whole update
        for m in range(0, len(update), args.micro_batch):
            micro = update[m : m + args.micro_batch]
            ids, mask, resp = _pad(micro, tokenizer.pad_token_id, device)
            with autocast:
                logp = sequence_logprobs(lambda **kw: policy(**kw, use_cache=False).logits, ids, mask)  # [b, L-1]
            out = raftpp_loss(logp.float(), logp.detach().float(), resp, torch.ones(len(micro), device=device),
                              clip_low=0.2, clip_high=0.2, agg="token-mean", kl_coef=0.0, denom=denom)  # fmt: skip
            out.loss.backward()
            trained += int(mask.sum())
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
    seconds, peak = done()
    print(f"training : {trained} tokens in {seconds:.1f} s = {trained / seconds:,.0f} tokens/s "
          f"(forward + backward + AdamW); {_gib(peak)}")  # fmt: skip
    figures["training"] = _figures(trained, seconds, peak)
    if args.json:
        settings = dict({k: v for k, v in vars(args).items() if k != "json"}, parameters=params)
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        info = dict(torch=torch.__version__, cuda=torch.version.cuda, device=str(device), gpu=gpu)
        with open(args.json, "w") as handle:
            json.dump(dict(settings=settings, **info, **figures), handle, indent=1)


def _figures(tokens: int, seconds: float, peak: float) -> dict:
    """One phase's figures for --json; peak_gib is null on CPU (no allocation peaks there)."""
    return dict(tokens=tokens, seconds=round(seconds, 3), tokens_per_s=round(tokens / seconds, 1),
                peak_gib=None if peak != peak else round(peak, 3))  # fmt: skip


def _gib(peak: float) -> str:
    return "peak n/a (CPU)" if peak != peak else f"peak {peak:.1f} GiB of torch allocations"


def _pad(micro, pad_id: int, device: torch.device):
    """Right-padded prompt+response rows, their attention mask and the response-token mask [b, L-1]."""
    seqs = [torch.cat([p, c.token_ids]) for p, c in micro]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    resp = torch.zeros(len(seqs), width - 1)
    for row, ((p, _), s) in enumerate(zip(micro, seqs)):
        ids[row, : len(s)], mask[row, : len(s)] = s, 1
        resp[row, len(p) - 1 : len(s) - 1] = 1.0
    return ids.to(device), mask.to(device), resp.to(device)


if __name__ == "__main__":
    main()
