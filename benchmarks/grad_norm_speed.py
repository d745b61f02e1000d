"""Time per accepted sample of GVM's gradient-norm estimate (G_i): the reference's loop against the kit's paths.

The reference runs a batch-1 forward and ``autograd.grad`` w.r.t. the chosen tensor for each accepted sample
(``dibs.core.grad_norms.reference_grad_norms``). The kit has two paths:

- batched: one batched forward (and, for embed_tokens, one batched backward to the inputs) per chunk of
  samples on the training policy (``grad_norms``), what runs for embed_tokens or with a backend that cannot
  measure (``allocation.grad_in_generator=false``);
- in the log-prob pass: the kit's default (``grad_param=lm_head``) with the HF backend; the generator's
  teacher-forced log-prob pass, which runs for every sample anyway, catches the output projection's input
  with a hook and adds the closed form (a Gram product). Its cost is that added work: the closed form on the
  pass's hidden states and logits (``head_grad_norms``), timed by itself, per sample; the log-prob pass
  itself is not counted, as it runs whether or not G_i is measured.

Same model, same samples; every path is checked equal to the reference to 1e-4 relative before timing is
reported. Samples are random token rows shaped like the embedded task's (prompt ~30 tokens, response ~40),
all counted as accepted. With tied embeddings (the default model), lm_head is the shared tensor's
output-projection part, and the reference differentiates an untied copy of the same weights.

    python benchmarks/grad_norm_speed.py                        # the default model and a 4x larger one
    python benchmarks/grad_norm_speed.py --samples 128 --untied
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from rich import box
from rich.console import Console
from rich.table import Table

from dibs.core.batching import pad_right
from dibs.core.grad_norms import grad_norms, head_grad_norms, reference_grad_norms
from dibs.rollout.hf import HFGenerator


def rows(count: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids, masks = [], []
    for _ in range(count):
        prompt, response = int(torch.randint(24, 36, (1,), generator=g)), int(torch.randint(20, 60, (1,), generator=g))
        ids.append(torch.randint(0, vocab, (prompt + response,), generator=g))
        masks.append(torch.cat([torch.zeros(prompt), torch.ones(response)]))
    padded, attention = pad_right(ids, 0)
    response, _ = pad_right(masks, 0)
    return padded, attention, response


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--untied", action="store_true", help="separate input table and output projection")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timings")
    args = parser.parse_args()

    from dibs.data.synthetic import corpus, make_task
    from dibs.data.tokenizer import train_tokenizer
    from dibs.modeling import build_tiny_qwen2

    tokenizer = train_tokenizer(
        corpus(make_task(seed=0, n_train=2000, n_test=10).train), tempfile.mkdtemp(), vocab_size=512
    )
    print(
        f"{args.samples} samples, {'untied' if args.untied else 'tied'} embeddings, {torch.get_num_threads()} threads"
    )
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for column in ("model", "param", "path", "reference ms/sample", "kit ms/sample", "speed-up"):
        table.add_column(column, justify="right")
    for hidden, layers, inter in ((64, 2, 256), (256, 4, 1024)):
        model = build_tiny_qwen2(
            tokenizer,
            hidden_size=hidden,
            num_hidden_layers=layers,
            intermediate_size=inter,
            tie_word_embeddings=not args.untied,
        ).float()
        params = sum(p.numel() for p in model.parameters())
        batch = rows(args.samples, len(tokenizer))
        label = f"h{hidden} L{layers} ({params / 1e6:.2f}M)"
        generator = HFGenerator(model, tokenizer, token_budget=1 << 20, show_progress=False)
        for param in ("embed_tokens", "lm_head"):
            times = measure(model, generator, param, batch, args.repeats)
            for path in ("batched", "in the log-prob pass"):
                if path in times:
                    mark = " (default)" if param == "lm_head" and path != "batched" else ""
                    speed = times["reference"] / times[path]
                    ms = f"{times['reference']:.2f}", f"{times[path]:.3f}"
                    table.add_row(label, param, path + mark, *ms, f"{speed:.1f}x")
    Console(width=140).print(table)


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(model, generator, param: str, batch, repeats: int) -> dict[str, float]:
    """Milliseconds per sample, best of ``repeats``, after checking every path against the reference."""
    ids, attention, response = batch
    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    tensor = embed if param == "embed_tokens" else head
    if param == "lm_head" and head is embed:  # the output-projection part: an untied copy's lm_head
        tensor = head.detach().clone().requires_grad_(True)

    def hidden_fn(e, m):
        return model.model(inputs_embeds=e, attention_mask=m).last_hidden_state

    def logits_fn(x, m):
        if tensor is embed or tensor is head:
            return model(input_ids=x, attention_mask=m).logits
        return hidden_fn(embed.detach()[x], m) @ tensor.T  # the untied copy's output projection

    def ref():
        return reference_grad_norms(logits_fn, tensor, ids, attention, response)

    def kit():
        pad = model.model.embed_tokens.padding_idx
        return grad_norms(hidden_fn, embed, head, ids, attention, response, param=param, padding_idx=pad)

    lengths = attention.sum(1)
    starts = lengths - response.sum(1)
    prompts = [ids[b, : int(starts[b])] for b in range(len(ids))]
    responses = [ids[b, int(starts[b]) : int(lengths[b])] for b in range(len(ids))]

    def logprob_pass(norms: bool):
        return generator._logprobs(prompts, responses, 1.0, norms)

    caught = {}
    hook = generator.model.get_output_embeddings().register_forward_hook(
        lambda m, args, out: caught.update(hidden=args[0], logits=out)
    )
    logprob_pass(False)
    hook.remove()

    oracle = ref()
    torch.testing.assert_close(kit(), oracle, rtol=1e-4, atol=0)
    times = {"reference": best_of(ref, repeats), "batched": best_of(kit, repeats)}
    if param == "lm_head":
        torch.testing.assert_close(torch.tensor(logprob_pass(True)[1]), oracle, rtol=1e-4, atol=0)
        added = best_of(lambda: head_grad_norms(caught["hidden"], caught["logits"], ids, response), repeats)
        times["in the log-prob pass"] = added
    return {k: 1000 * v / len(ids) for k, v in times.items()}


if __name__ == "__main__":
    main()
