"""Time per accepted sample of GVM's gradient-norm estimate (G_i): the reference's loop against the kit's path.

The reference runs a batch-1 forward and ``autograd.grad`` w.r.t. the chosen tensor for each accepted sample
(``dibs.core.grad_norms.reference_grad_norms``); the kit runs one batched forward (and, for embed_tokens, one
batched backward to the inputs) per chunk (``grad_norms``). Same model, same samples; the results are
checked equal to 1e-4 relative before timing is reported. Samples are random token rows shaped like the
embedded task's (prompt ~30 tokens, response ~40).

    python benchmarks/grad_norm_speed.py                        # the default model and a 4x larger one
    python benchmarks/grad_norm_speed.py --samples 128 --untied
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from dibs.core.batching import pad_right
from dibs.core.grad_norms import grad_norms, reference_grad_norms


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
    print(f"{'model':>24} {'param':>13} {'reference ms/sample':>20} {'kit ms/sample':>14} {'speed-up':>9}")
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
        for param in ("embed_tokens", "lm_head"):
            times = measure(model, param, batch, args.repeats)
            label = f"h{hidden} L{layers} ({params / 1e6:.2f}M)"
            speed = times["reference"] / times["kit"]
            print(f"{label:>24} {param:>13} {times['reference']:>20.2f} {times['kit']:>14.2f} {speed:>8.1f}x")


def measure(model, param: str, batch, repeats: int) -> dict[str, float]:
    """Milliseconds per sample, best of ``repeats``, after checking both ways agree."""
    ids, attention, response = batch
    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    tensor = embed if param == "embed_tokens" else head

    def hidden_fn(e, m):
        return model.model(inputs_embeds=e, attention_mask=m).last_hidden_state

    def logits_fn(x, m):
        return model(input_ids=x, attention_mask=m).logits

    def ref():
        return reference_grad_norms(logits_fn, tensor, ids, attention, response)

    def kit():
        pad = model.model.embed_tokens.padding_idx
        return grad_norms(hidden_fn, embed, head, ids, attention, response, param=param, padding_idx=pad)

    torch.testing.assert_close(kit(), ref(), rtol=1e-4, atol=0)
    times = {}
    for name, fn in (("reference", ref), ("kit", kit)):
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        times[name] = 1000 * best / len(ids)
    return times


if __name__ == "__main__":
    main()
