"""The policy: a tiny Qwen2 built from a config, or any local Hugging Face causal-LM checkpoint.

Nothing is downloaded: ``path`` must be a folder on disk (``save_pretrained`` layout) and loading runs with
``local_files_only``; a missing folder is a clear error naming the config key.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase, Qwen2Config

__all__ = ["build_tiny_qwen2", "require_model_folder", "load_pretrained", "count_parameters"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_tiny_qwen2(
    tokenizer: PreTrainedTokenizerBase,
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 256,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = True,
    seed: int = 0,
) -> PreTrainedModel:
    """A randomly initialised Qwen2 sized by the arguments, with the tokenizer's vocabulary and ids."""
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def require_model_folder(path: str | Path, key: str = "model.path") -> Path:
    """The folder of a local checkpoint, or a FileNotFoundError naming the config entry ``key``."""
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        what = "does not exist" if not folder.exists() else "has no config.json"
        raise FileNotFoundError(f"{key}={path!r}: model folder {what} (expected a save_pretrained folder)")
    return folder


def load_pretrained(path: str | Path, *, dtype: str = "float32", key: str = "model.path") -> PreTrainedModel:
    """Load a local checkpoint folder; ``key`` names the config entry in the error message."""
    folder = require_model_folder(path, key)
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype={dtype!r} is not one of {sorted(DTYPES)}")
    return AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype], local_files_only=True)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
