"""Prompt templates: a problem becomes chat messages, rendered by the tokenizer's own chat template.

The embedded task and real datasets go through the same path; only the system prompt, the user suffix and
the response prefix differ. The named templates are the YAML files of ``conf/template/`` (``template=<name>``):
``paper`` (docs/method.md), ``qwen25-math-cot`` and ``qwen-boxed`` (the Qwen2.5-Math evaluation
prompts), ``think`` (a long chain of thought opened by ``<think>``) and ``none`` (the problem alone).
Rendering through ``apply_chat_template`` rather than a hard-coded ChatML string keeps the prompt right for
any model family whose tokenizer carries a chat template.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from transformers import PreTrainedTokenizerBase

from dibs.data.records import Problem

__all__ = ["PromptTemplate", "encode_prompts", "encode_prompts_cached", "encode_response"]


@dataclass(frozen=True)
class PromptTemplate:
    """``system_prompt`` (None: no system turn), text appended to the problem in the user turn, and text that
    opens the assistant turn (e.g. ``"<think>\\n"``): part of the prompt, so never of the trained response."""

    system_prompt: str | None  # the settings of conf/template/*.yaml (``none``: None, "", "")
    user_suffix: str
    response_prefix: str

    def messages(self, problem: str) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return messages + [{"role": "user", "content": problem + self.user_suffix}]

    def render(self, tokenizer: PreTrainedTokenizerBase, problem: str) -> str:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"the tokenizer {type(tokenizer).__name__} ({getattr(tokenizer, 'name_or_path', '')}) has no chat "
                "template, so prompts cannot be rendered: use a model folder whose tokenizer_config.json has one "
                "(base Qwen2.5-Math checkpoints do)"
            )
        text = tokenizer.apply_chat_template(self.messages(problem), add_generation_prompt=True, tokenize=False)
        return text + self.response_prefix


def encode_prompts(
    problems: Sequence[Problem],
    tokenizer: PreTrainedTokenizerBase,
    template: PromptTemplate,
    *,
    max_prompt_tokens: int,
) -> tuple[list[Problem], list[list[int]], list[str]]:
    """Token ids of each rendered prompt. Prompts longer than ``max_prompt_tokens`` are dropped and
    reported (uid and length) rather than truncated: a cut prompt is a different problem."""
    kept, ids, dropped = [], [], []
    if not problems:
        return kept, ids, dropped
    texts = [template.render(tokenizer, p.problem) for p in problems]
    for problem, encoded in zip(problems, tokenizer(texts, add_special_tokens=False)["input_ids"]):
        if len(encoded) > max_prompt_tokens:
            dropped.append(f"{problem.uid}: prompt has {len(encoded)} tokens > max_prompt_tokens={max_prompt_tokens}")
            continue
        kept.append(problem)
        ids.append(list(encoded))
    return kept, ids, dropped


def encode_prompts_cached(
    problems: Sequence[Problem],
    tokenizer: PreTrainedTokenizerBase,
    template: PromptTemplate,
    *,
    max_prompt_tokens: int,
    cache_dir: str | Path | None,
) -> tuple[list[Problem], list[list[int]], list[str]]:
    """``encode_prompts`` through a cache in ``<cache_dir>/prompts``: a pool is rendered and tokenised once (about
    a second for 10,000 prompts), then read back. The key hashes the tokenizer (its whole serialised form and
    chat template), the template, ``max_prompt_tokens`` and every problem's uid and text. A tokenizer without a
    serialised form (a slow, Python one) is never cached."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if cache_dir is None or backend is None or not problems:
        return encode_prompts(problems, tokenizer, template, max_prompt_tokens=max_prompt_tokens)
    digest = hashlib.blake2b(digest_size=16)
    for part in (
        backend.to_str(),
        str(getattr(tokenizer, "chat_template", "")),
        repr(template),
        str(max_prompt_tokens),
    ):
        digest.update(part.encode())
        digest.update(b"\0")
    for p in problems:
        digest.update(f"{p.uid}\0{p.problem}\0".encode())
    path = Path(cache_dir).expanduser() / "prompts" / f"{digest.hexdigest()}.npz"
    if path.is_file():
        try:
            with np.load(path) as saved:
                kept, lengths, flat = saved["kept"].tolist(), saved["lengths"].tolist(), saved["flat"].tolist()
                dropped = json.loads(str(saved["dropped"]))
            ends = list(itertools.accumulate(lengths))
            ids = [flat[end - n : end] for n, end in zip(lengths, ends)]
            return [problems[i] for i in kept], ids, dropped
        except (OSError, ValueError, KeyError):  # damaged: encode again and overwrite it
            pass
    kept_problems, ids, dropped = encode_prompts(problems, tokenizer, template, max_prompt_tokens=max_prompt_tokens)
    index = {id(p): i for i, p in enumerate(problems)}
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f"{path.stem}.tmp-{os.getpid()}.npz")
    np.savez(
        staging,
        kept=np.array([index[id(p)] for p in kept_problems], dtype=np.int64),
        lengths=np.array([len(i) for i in ids], dtype=np.int64),
        flat=np.array([t for i in ids for t in i], dtype=np.int64),
        dropped=np.array(json.dumps(dropped)),
    )
    staging.replace(path)  # atomic: runs side by side never read half a file
    return kept_problems, ids, dropped


def encode_response(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """A target response (e.g. an SFT solution) as ids, ending with EOS like a sampled completion."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
