"""Full (unsharded) policy weights for the generator and for HF exports, whatever the strategy.

Under FSDP2 the parameters are DTensors; ``get_model_state_dict(full_state_dict=True)`` all-gathers them
so every rank gets full tensors (a collective: every rank must call it). Otherwise the module's own
state dict is already full.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

__all__ = ["full_state_dict"]


def full_state_dict(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    if any(isinstance(p, DTensor) for p in policy.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True))
    return {name: t.detach() for name, t in policy.state_dict().items()}
