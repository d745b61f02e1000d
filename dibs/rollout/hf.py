"""Batched sampling with Hugging Face transformers (CPU or GPU); the default generation backend.

Every prompt is repeated n_i times as separate rows (so prompts may get different numbers of samples),
rows are sorted by prompt length and cut into chunks of at most ``token_budget`` padded tokens, and each
chunk is sampled left-padded by one of two decoders:

- ``decoder="loop"`` (the default): the kit's own decode loop (``dibs.rollout.decode``), with a KV cache,
  finished rows dropped from the batch at once and each drawn token's log-prob read from the sampler's own
  softmax, so no second forward runs.
- ``decoder="generate"``: one ``model.generate`` call per chunk, which keeps finished rows until the chunk's
  longest row ends, then a teacher-forced pass over the finished sequences (right-padded, the layout the
  trainer uses) for the log-probs.

Both sample the same distribution (temperature, then top-k, then top-p, with ``transformers``' rules).
Asked for ``head_grad_norms``, a teacher-forced pass runs after either decoder and gives each sample's
output-projection gradient norm in closed form (GVM's G_i w.r.t. lm_head): the output projection's input is
caught by a forward hook, so that pass needs no second forward.
"""

from __future__ import annotations

import copy
from typing import Iterable, Sequence

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from dibs.core.batching import chunk_by_tokens, pad_left, pad_right
from dibs.core.grad_norms import head_grad_norms as closed_form_head_norms
from dibs.core.logprobs import sequence_logprobs
from dibs.rollout.base import Completion, SamplingParams
from dibs.rollout.decode import decode

DECODERS = ("loop", "generate")

__all__ = ["HFGenerator"]


class HFGenerator:
    """Owns its own copy of the policy; the trainer pushes fresh weights with ``load_weights``.

    Its log-probs come from the policy's own module class, weights and dtype (a deep copy, refreshed before
    every E-step), so where the trainer computes in that same precision they are the trainer's up to float
    rounding: ``logprobs_are_trainers`` lets ``algo.recompute_old_logprobs=auto`` skip recomputing them."""

    measures_head_grad_norms = True
    logprobs_are_trainers = True

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        token_budget: int,
        show_progress: bool,
        decoder: str = "loop",
    ) -> None:
        if decoder not in DECODERS:
            raise ValueError(f"rollout.generator.decoder={decoder!r} is not one of {', '.join(DECODERS)}")
        self.decoder = decoder
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        # Neutral defaults: a checkpoint's generation_config.json (repetition penalty, top_p, ...) must never
        # leak into sampling, so every value generate() might fill in is set here or in SamplingParams.
        self.model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        self.tokenizer = tokenizer
        self.token_budget = token_budget
        self.show_progress = show_progress

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = self.model.state_dict(keep_vars=True)  # tied weights appear under both names
        with torch.no_grad():
            for name, tensor in weights:
                if name not in params:
                    raise KeyError(f"generator model has no parameter named {name!r}")
                params[name].copy_(tensor.to(params[name].device, params[name].dtype))

    def to(self, device: torch.device | str) -> HFGenerator:
        self.model.to(device)
        return self

    def sleep(self) -> None:  # nothing to release: the HF model is small next to the trainer's state
        pass

    def wake(self) -> None:
        pass

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        n_per_prompt: Sequence[int],
        sampling: SamplingParams,
        *,
        head_grad_norms: bool = False,
    ) -> list[list[Completion]]:
        if len(prompts) != len(n_per_prompt):
            raise ValueError(f"{len(prompts)} prompts but {len(n_per_prompt)} sample counts")
        rows = [i for i, n in enumerate(n_per_prompt) for _ in range(int(n))]
        rows.sort(key=lambda i: -len(prompts[i]))
        prompt_tensors = [torch.as_tensor(p, dtype=torch.long) for p in prompts]
        results: list[list[Completion]] = [[] for _ in prompts]
        chunks = chunk_by_tokens([len(prompts[i]) for i in rows], sampling.max_new_tokens, self.token_budget)
        for chunk in self._progress(chunks, total_rows=len(rows)):
            members = [rows[j] for j in chunk]
            for index, completion in zip(
                members, self._generate_chunk(prompt_tensors, members, sampling, head_grad_norms)
            ):
                results[index].append(completion)
        return results

    def _generate_chunk(
        self, prompts: list[torch.Tensor], members: list[int], sampling: SamplingParams, head_grad_norms: bool
    ) -> list[Completion]:
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        ids, mask = pad_left([prompts[i] for i in members], pad)
        chosen = [prompts[i] for i in members]
        if self.decoder == "loop":
            out = decode(
                self.model, ids.to(self.device), mask.to(self.device), sampling, eos_token_id=eos, pad_token_id=pad
            )
            lengths = out.lengths.tolist()
            tokens, decoded_logprobs = out.tokens.cpu(), out.logprobs.cpu()
            responses = [tokens[k, :n].clone() for k, n in enumerate(lengths)]
            logprobs = [decoded_logprobs[k, :n].clone() for k, n in enumerate(lengths)]
            norms: list[float | None] = [None] * len(members)
            if head_grad_norms:  # the closed form needs every position's hidden state: one teacher-forced pass
                _, norms = self._logprobs(chosen, responses, sampling.temperature, head_grad_norms)
            return self._completions(responses, logprobs, norms)
        out = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            do_sample=True,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            max_new_tokens=sampling.max_new_tokens,
            pad_token_id=pad,
            eos_token_id=eos,
        ).cpu()  # [R, Lp + T]
        responses = [_cut_at_eos(row, eos) for row in out[:, ids.shape[1] :]]
        logprobs, norms = self._logprobs(chosen, responses, sampling.temperature, head_grad_norms)
        return self._completions(responses, logprobs, norms)

    def _completions(
        self, responses: list[torch.Tensor], logprobs: list[torch.Tensor], norms: list[float | None]
    ) -> list[Completion]:
        eos = self.tokenizer.eos_token_id
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        return [
            Completion(r, lp, t, "stop" if len(r) and r[-1] == eos else "length", g)
            for r, lp, t, g in zip(responses, logprobs, texts, norms)
        ]

    def _logprobs(
        self, prompts: list[torch.Tensor], responses: list[torch.Tensor], temperature: float, head_grad_norms: bool
    ) -> tuple[list[torch.Tensor], list[float | None]]:
        seqs = [torch.cat([p, r]) for p, r in zip(prompts, responses)]
        ids, mask = pad_right(seqs, self.tokenizer.pad_token_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        caught: dict[str, torch.Tensor] = {}

        def forward(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            caught["logits"] = self._forward(input_ids, attention_mask)
            return caught["logits"]

        head = self.model.get_output_embeddings()
        hook = (
            head.register_forward_hook(lambda m, args, out: caught.update(hidden=args[0])) if head_grad_norms else None
        )
        try:
            logp = sequence_logprobs(forward, ids, mask, temperature)
        finally:
            if hook is not None:
                hook.remove()
        logp = logp.cpu()  # [R, L-1]; token j of a response sits at column len(prompt) - 1 + j
        norms: list[float | None] = [None] * len(seqs)
        if head_grad_norms:
            response = torch.zeros_like(ids, dtype=torch.float32)
            for k, (p, r) in enumerate(zip(prompts, responses)):
                response[k, len(p) : len(p) + len(r)] = 1.0
            norms = closed_form_head_norms(caught["hidden"], caught["logits"], ids, response).tolist()
        return [logp[k, len(p) - 1 : len(p) - 1 + len(r)] for k, (p, r) in enumerate(zip(prompts, responses))], norms

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def _progress(self, chunks: list[list[int]], total_rows: int):
        """The chunks, counted on a transient bar of the run's console (``dibs.lit.console.progress``: above it
        the log lines, under it Lightning's training bar; none off a terminal or on a rank > 0)."""
        from dibs.lit.console import progress

        with progress(total_rows, "generating", unit="samples", enabled=self.show_progress) as advance:
            for chunk in chunks:
                yield chunk
                advance(len(chunk))


def _cut_at_eos(row: torch.Tensor, eos: int) -> torch.Tensor:
    """Response tokens up to and including the first EOS (generate pads only after it)."""
    hits = (row == eos).nonzero()
    return row[: int(hits[0]) + 1].clone() if len(hits) else row.clone()
