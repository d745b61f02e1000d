"""Full (unsharded) policy weights for the generator and for HF exports, whatever the strategy.

Under FSDP2 the parameters are DTensors and must be all-gathered: a collective, so every rank must call these
(and consume ``iter_full_tensors`` to the end, in the same order). Otherwise the module's own state dict is
already full.

- ``full_state_dict``: every full tensor at once, on rank 0's CPU (``get_model_state_dict``), for exports.
- ``export_policy``: the policy as a Hugging Face folder with ``dibs_export.json`` (iteration, seed), what
  ``python -m dibs.evaluate`` needs to repeat that iteration's evaluation exactly. ``dibs.lit.export`` decides
  which iterations are exported and kept, and adds the generation config and the model card.
- ``iter_full_tensors``: one full tensor at a time, for pushing weights into a generator in buckets, so a rank
  holds at most one bucket of gathered tensors next to its shard, not a whole second copy of the model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.distributed.tensor import DTensor

__all__ = ["EXPORT_META", "export_policy", "full_state_dict", "iter_full_tensors"]

EXPORT_META = "dibs_export.json"  # written into every HF export folder


def full_state_dict(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every full tensor, on the CPU of rank 0 (other ranks get an empty dict under FSDP2): for exports, which
    then never hold a second copy of the model on an accelerator."""
    if any(isinstance(p, DTensor) for p in policy.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {name: t.detach().cpu() for name, t in policy.state_dict().items()}


def iter_full_tensors(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) of each state-dict entry, one at a time (a DTensor is gathered on its own). A tied
    weight comes once, under its first name (``model.embed_tokens.weight``, not ``lm_head.weight``): vLLM's
    loaders skip the alias and fail when it arrives in a bucket without the original."""
    seen: set[int] = set()
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        yield name, full.detach()


def export_policy(policy: torch.nn.Module, tokenizer: Any, folder: Path, meta: dict[str, Any], *, write: bool) -> None:
    """Gather the policy's weights (every rank calls this) and, where ``write``, save model, tokenizer and meta."""
    weights = full_state_dict(policy)
    if write:
        policy.save_pretrained(folder, state_dict=weights)
        tokenizer.save_pretrained(folder)
        (folder / EXPORT_META).write_text(json.dumps(meta, indent=2) + "\n")
