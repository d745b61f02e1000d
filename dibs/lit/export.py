"""Hugging Face exports of the policy: which iterations are written and kept, and how a folder is written.

A run writes ``<run_dir>/hf/iter_NNN`` (NNN: the iterations done, 1-based) after every ``export.every``-th
iteration and always after the last one. Each folder holds the model, the tokenizer, ``dibs_export.json``
(iteration, updates, seed: what ``python -m dibs.evaluate`` needs to repeat that iteration's evaluation),
``generation_config.json`` with the run's E-step sampling (so a plain ``model.generate()`` samples as the run did
and is not cut at transformers' default 20 tokens) and a model card, ``README.md``.

**Thinning** (``select``, pure). Of the exports written so far, the newest ``export.keep_last`` are kept, and
always the newest one and the best one by ``val/acc`` (the held-out evaluation after that iteration; an
iteration that was not evaluated cannot be best; of equal accuracies the earliest stays best, so a later tie
deletes nothing). The decision depends only on the iteration numbers and the evaluations, both in the
checkpoint, so a run killed at any moment and resumed with ``ckpt_path=last`` keeps the same folders as an
uninterrupted run. ``hf/exports.json`` lists the kept exports with their updates and accuracy, and names the
best and the last.

**Atomic.** A folder is written under a hidden name (``.iter_NNN.partial``) and renamed into place, so a kill
never leaves a half-written folder that looks complete; the manifest is replaced in one rename; only then are
the folders no longer kept deleted. Whatever a kill leaves (a partial folder, a folder not yet deleted) is
cleared by the next export, which a resumed run writes again. Every rank gathers the weights (a collective under
FSDP2); only the writing rank (global rank 0) touches the disk.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard
from transformers import GenerationConfig

from dibs.core.tags import VAL_ACC
from dibs.lit.card import MANIFEST, card_facts, folder_name, model_card
from dibs.lit.evaluation import EvalResult
from dibs.lit.logs import info
from dibs.lit.weights import EXPORT_META, export_policy
from dibs.rollout.base import SamplingParams

__all__ = [
    "MANIFEST",
    "ExportOptions",
    "Selection",
    "card_facts",  # from dibs.lit.card
    "export_iteration",
    "folder_name",  # from dibs.lit.card
    "generation_config",
    "model_card",
    "publish",
    "select",
    "thin",
]

_EXPORT = re.compile(r"^iter_(\d+)$")
_LEFTOVER = re.compile(r"^\.iter_\d+\.(partial|old)$")  # what a kill in the middle of a write leaves


@dataclass(frozen=True)
class ExportOptions:
    """The ``export`` config block: ``every`` k-th iteration (0: the last only), the ``keep_last`` newest kept
    (None: every export), besides the last and the best, which are always kept."""

    every: int
    keep_last: int | None

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"export.every={self.every} must be >= 0 (0: only the final iteration is exported)")
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError(f"export.keep_last={self.keep_last} must be >= 1 or null (keep every export)")

    def due(self, iteration: int, last: bool) -> bool:
        """Whether the policy after ``iteration`` (1-based) is exported: every ``every``-th, and the last."""
        return last or (self.every > 0 and iteration % self.every == 0)

    def exported(self, iteration: int, last: bool) -> list[int]:
        """The iterations a run has exported once ``iteration`` is done (``last``: it ends there)."""
        return [i for i in range(1, iteration + 1) if self.due(i, last and i == iteration)]


@dataclass(frozen=True)
class Selection:
    keep: tuple[int, ...]  # ascending
    best: int | None  # the kept export with the highest val/acc; None when no export was evaluated
    last: int | None  # the newest export


def select(exported: Sequence[int], accuracy: Mapping[int, float], keep_last: int | None) -> Selection:
    """Which of the ``exported`` iterations (ascending) stay: the ``keep_last`` newest (None: all), the newest, and
    the best by ``accuracy`` (val/acc per evaluated iteration; NaN never wins; a tie goes to the earliest)."""
    if not exported:
        return Selection((), None, None)
    scored = [i for i in exported if i in accuracy and math.isfinite(accuracy[i])]
    best = max(scored, key=lambda i: (accuracy[i], -i)) if scored else None
    newest = list(exported) if keep_last is None else list(exported)[-keep_last:]
    keep = set(newest) | {exported[-1]} | ({best} if best is not None else set())
    return Selection(tuple(sorted(keep)), best, exported[-1])


# ---- writing -------------------------------------------------------------------------------------


def generation_config(sampling: SamplingParams, tokenizer: Any) -> GenerationConfig:
    """The run's E-step sampling as transformers' defaults for ``generate()``. Every value is explicit:
    ``top_k=0`` (off) stays 0 instead of transformers' 50, and ``max_new_tokens`` replaces its 20-token length."""
    return GenerationConfig(
        do_sample=True,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        max_new_tokens=sampling.max_new_tokens,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def publish(hf_dir: Path, iteration: int, write: Any) -> Path:
    """Write a folder under a hidden name with ``write(folder)`` and rename it into ``hf_dir/iter_NNN`` (an
    earlier one of the same iteration, from a run resumed before its checkpoint, is replaced)."""
    final = hf_dir / folder_name(iteration)
    staging, old = hf_dir / f".{final.name}.partial", hf_dir / f".{final.name}.old"
    for leftover in (staging, old):
        shutil.rmtree(leftover, ignore_errors=True)
    hf_dir.mkdir(parents=True, exist_ok=True)
    write(staging)
    if final.exists():  # a directory cannot be renamed over a full one: set it aside first
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def thin(hf_dir: Path, selection: Selection, accuracy: Mapping[int, float], pi0: float | None = None) -> list[str]:
    """Write the manifest of the kept exports, then delete every other export folder (and any leftover of an
    interrupted write). Returns the deleted folders' names."""
    present = {int(m.group(1)): p for p in hf_dir.iterdir() if p.is_dir() and (m := _EXPORT.match(p.name))}
    kept = [i for i in selection.keep if i in present]  # a run started from another folder's checkpoint lacks some
    entries = []
    for i in kept:
        meta_file = present[i] / EXPORT_META
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        entries.append(
            {
                "folder": folder_name(i),
                "iteration": i,
                "global_step": meta.get("global_step"),
                VAL_ACC: accuracy.get(i),
                "best": i == selection.best,
                "last": i == selection.last,
            }
        )
    manifest = {
        "best": folder_name(selection.best) if selection.best in kept else None,
        "last": folder_name(selection.last) if selection.last in kept else None,
        "metric": VAL_ACC,
        "pi0": {VAL_ACC: pi0},
        "exports": entries,
    }
    staging = hf_dir / f".{MANIFEST}.partial"
    staging.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(staging, hf_dir / MANIFEST)
    deleted = []
    for path in sorted(hf_dir.iterdir()):
        match = _EXPORT.match(path.name)
        if path.is_dir() and ((match and int(match.group(1)) not in selection.keep) or _LEFTOVER.match(path.name)):
            shutil.rmtree(path)
            deleted.append(path.name)
    return deleted


def export_iteration(
    policy: torch.nn.Module,
    tokenizer: Any,
    hf_dir: Path,
    options: ExportOptions,
    *,
    iteration: int,
    last: bool,
    global_step: int,
    seed: int,
    evals: Sequence[EvalResult],
    sampling: SamplingParams,
    card: Mapping[str, Any],
    write: bool,
) -> Path | None:
    """Export the policy after ``iteration`` when due, then thin the exports. Every rank calls this (the weights
    are gathered by all); only ``write`` (global rank 0) writes and deletes. Returns the folder, if written."""
    if not options.due(iteration, last):
        return None
    accuracy = {e.iteration: e.accuracy for e in evals if e.iteration > 0}
    meta = {"iteration": iteration, "global_step": global_step, "seed": seed, VAL_ACC: accuracy.get(iteration)}

    def fill(folder: Path) -> None:
        export_policy(policy, tokenizer, folder, meta, write=write)
        if write:
            generation_config(sampling, tokenizer).save_pretrained(folder)
            text = model_card(card, iteration=iteration, global_step=global_step, evals=evals, sampling=sampling)
            ModelCard(text).save(folder / "README.md")

    if not write:
        fill(hf_dir / f".{folder_name(iteration)}.partial")  # the gather only: nothing is written there
        return None
    folder = publish(hf_dir, iteration, fill)
    # the exports on disk count too: a former final export (a run extended with more iterations) or one made under
    # another export.every stays while it is the best or among the newest; under unchanged settings they are
    # exported(...) already, so a killed and resumed run keeps what an uninterrupted one keeps
    present = {int(m.group(1)) for p in hf_dir.iterdir() if p.is_dir() and (m := _EXPORT.match(p.name))}
    candidates = sorted(set(options.exported(iteration, last)) | {i for i in present if i <= iteration})
    selection = select(candidates, accuracy, options.keep_last)
    pi0 = next((e.accuracy for e in evals if e.iteration == 0), None)
    deleted = thin(hf_dir, selection, accuracy, pi0)
    best = f", best by {VAL_ACC} {folder_name(selection.best)}" if selection.best is not None else ""
    info(f"exported {folder}{best}" + (f"; deleted {', '.join(deleted)}" if deleted else ""))
    return folder
