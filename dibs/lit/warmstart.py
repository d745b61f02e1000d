"""Warm start π0: a short SFT phase on the task's reference solutions, cached on disk.

The SFT stops after ``steps`` updates or as soon as the sampled held-out accuracy reaches
``target_accuracy`` (checked every ``eval_every`` steps), so π0 stays a moderate solver that RL can
improve. The result (model, tokenizer and a JSON report) is stored under a key derived from everything
that determines it, so later runs with the same settings load it and say so.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from dibs.core.batching import pad_right
from dibs.core.logprobs import sequence_logprobs
from dibs.core.losses import masked_mean
from dibs.core.schedules import warmup_cosine

__all__ = ["WarmStartReport", "cache_key", "load_cached", "sft"]


@dataclass(frozen=True)
class WarmStartReport:
    steps: int
    seconds: float
    accuracy: float  # last sampled held-out accuracy measured during SFT (-1 if never measured)
    stopped_by: str  # "steps" or "target_accuracy"


def cache_key(settings: dict[str, Any]) -> str:
    """A short stable hash of the JSON-serialised settings that determine π0."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def load_cached(folder: Path, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, WarmStartReport] | None:
    report = folder / "warmstart.json"
    if not report.is_file():
        return None
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype)
    return model, WarmStartReport(**json.loads(report.read_text()))


def sft(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[tuple[list[int], list[int]]],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    eval_every: int,
    target_accuracy: float,
    measure: Callable[[PreTrainedModel], float],
    out_dir: Path,
    schedule: str,
) -> WarmStartReport:
    """Train on (prompt ids, response ids) pairs with the response-only NLL; save model+report."""
    started, generator = time.perf_counter(), torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"warmstart.schedule={schedule!r} is not 'cosine' or 'constant'")
    horizon = steps if schedule == "cosine" else 0
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, warmup=30, total=horizon))
    accuracy, stopped_by, step = -1.0, "steps", 0
    model.train()
    for step in range(1, steps + 1):
        picks = torch.randint(len(examples), (batch_size,), generator=generator).tolist()
        loss = _nll(model, [examples[i] for i in picks], tokenizer.pad_token_id)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if eval_every > 0 and step % eval_every == 0:
            accuracy = measure(model.eval())
            model.train()
            if accuracy >= target_accuracy:
                stopped_by = "target_accuracy"
                break
    report = WarmStartReport(step, time.perf_counter() - started, accuracy, stopped_by)
    model.eval().save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "warmstart.json").write_text(json.dumps(report.__dict__, indent=2))
    return report


def _nll(model: PreTrainedModel, batch: list[tuple[list[int], list[int]]], pad_id: int) -> torch.Tensor:
    seqs = [torch.tensor(p + r) for p, r in batch]
    ids, mask = pad_right(seqs, pad_id)  # [B, L]
    target_mask = torch.zeros(ids.shape[0], ids.shape[1] - 1)  # [B, L-1]
    for row, (p, r) in enumerate(batch):
        target_mask[row, len(p) - 1 : len(p) - 1 + len(r)] = 1.0
    forward = lambda input_ids, attention_mask: (
        model(  # noqa: E731
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).logits
    )
    return masked_mean(-sequence_logprobs(forward, ids, mask), target_mask)
