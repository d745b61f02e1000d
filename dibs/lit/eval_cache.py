"""π0's evaluation, computed once: a run whose π0 evaluation was already made reads it back.

Every run of a grid starts from the same cached π0 and, for a given seed, draws the same evaluation samples
from it: its π0 evaluation is the same numbers each time, and on a small model it costs as much as an E-step.
The result is kept in ``<cache_dir>/evals/<key>.json``, where the key is a hash of everything the numbers
depend on:

- the weights the generator samples with (every tensor's name, dtype, shape and bytes);
- the evaluation: each benchmark's name, prompt ids, golds and levels; samples, pass@k, averages, sampling;
- the RNG seed of the evaluation, the generator's class and batching (its ``decoder`` and ``token_budget``,
  which decide how random numbers are drawn), the verifier's class and settings;
- the dibs, torch and transformers versions and the device type.

Only single-process runs use it (a distributed evaluation is a collective that every rank must join).
``eval.reuse_pi0=false`` always evaluates.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import transformers

from dibs import __version__
from dibs.lit.evaluation import EvalPlan, EvalResult

__all__ = ["eval_key", "load_eval", "save_eval"]


def eval_key(model: torch.nn.Module, plan: EvalPlan, *, generator: Any, verifier: Any, seed: int, device: str) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    settings = {
        "benchmarks": [
            {"name": b.name, "prompts": b.prompts, "golds": [p.gold for p in b.problems], "levels": b.levels}
            for b in plan.benchmarks
        ],
        "levels": [[p.level for p in b.problems] for b in plan.benchmarks],
        "samples": plan.samples,
        "pass_k": list(plan.pass_k),
        "averages": {k: list(v) for k, v in plan.averages.items()},
        "sampling": plan.sampling.__dict__,
        "seed": seed,
        "generator": [
            type(generator).__qualname__,
            getattr(generator, "decoder", None),
            getattr(generator, "token_budget", None),
        ],
        "verifier": [type(verifier).__qualname__, {k: v for k, v in vars(verifier).items() if not k.startswith("_")}],
        "versions": [__version__, torch.__version__, transformers.__version__],
        "device": device,
    }
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def load_eval(folder: Path, key: str) -> EvalResult | None:
    path = folder / f"{key}.json"
    if not path.is_file():
        return None
    try:
        return EvalResult(**json.loads(path.read_text()))
    except (ValueError, TypeError):  # a damaged file: evaluate again (and overwrite it)
        return None


def save_eval(folder: Path, key: str, result: EvalResult) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / f"{key}.json.tmp-{os.getpid()}"
    staging.write_text(json.dumps(result.__dict__, indent=1))
    staging.replace(folder / f"{key}.json")  # atomic: a killed run leaves no half-written result
