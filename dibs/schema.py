"""The config schema: every setting with a type or a range, checked at start-up before any work.

``validate_config`` runs first in ``train.py`` and ``python -m dibs.evaluate``, on the resolved config, so a bad
value fails in the first second, before the warm start, naming the key, the value and what is allowed:

    config error: allocation.n_per_prompt=0: must be >= 1

Groups whose options carry their own fields (``trainer``, ``logger``, ``data.source``, a generator's
constructor) are checked for the fields the kit reads; other keys pass through (``+key=value`` adds them on
purpose). Relations between keys (``eval.pass_k`` against ``eval.samples``, a warm start with steps but no batch)
are checked here too. pydantic does the type and range checks.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dibs.core.losses import ALGORITHMS

__all__ = ["ConfigError", "validate_config"]

_NAMES_A_KEY = re.compile(r"^[a-z_]+=")  # a relation's message that starts with the key it is about


_TYPE_NAMES = frozenset(("int", "str", "float", "bool", "list[int]", "none", "tuple[float, float]", "list[str]"))


class ConfigError(ValueError):
    """A config the kit refuses; the message names every key at fault."""


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Sampling(_Closed):
    temperature: float = Field(gt=0)  # sampling only: a temperature of 0 is not a distribution to sample from
    top_p: float = Field(gt=0, le=1)
    top_k: int = Field(ge=0)  # 0: off
    max_new_tokens: int = Field(ge=1)


class Rollout(_Open):
    backend: Literal["hf", "vllm"]
    sampling: Sampling


class Allocation(_Open):
    """Ranges of the strategies' keys; a key a strategy does not have stays None. Each strategy's own dataclass
    (``dibs.core.sampling``) says which keys it needs, when train.py builds it before any work."""

    n_per_prompt: int | None = Field(default=None, ge=1)
    pilot_samples: int | None = Field(default=None, ge=1)  # GVM's N'
    alpha: float | None = Field(default=None, gt=0)
    beta: float | None = Field(default=None, gt=0)
    filter_threshold: float | None = Field(default=None, ge=0, le=1)
    filter_insufficient: float | None = Field(default=None, ge=0)
    rounding: Literal["largest_remainder", "low_p_first"] | None = None
    prior: tuple[float, float] | None = None
    reserve: float | None = Field(default=None, ge=0, le=1)
    min_per_prompt: int | None = Field(default=None, ge=0)
    max_per_prompt: int | None = Field(default=None, ge=1)
    align: int | None = Field(default=None, ge=1)
    grad_param: Literal["lm_head", "embed_tokens", "all", "none"] | None = None
    grad_reduction: Literal["sum", "mean"] | None = None
    refresh_every: int | None = Field(default=None, ge=1)
    per_round: int | None = Field(default=None, ge=1)
    solved_at: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _relations(self) -> Allocation:
        if self.prior is not None and min(self.prior) <= 0:
            raise ValueError(f"prior={list(self.prior)}: both Beta parameters must be > 0")
        if self.max_per_prompt is not None and self.max_per_prompt < (self.min_per_prompt or 0):
            raise ValueError(f"max_per_prompt={self.max_per_prompt} is below min_per_prompt={self.min_per_prompt}")
        return self


class Algo(_Open):
    loss: str
    loss_scope: Literal["update", "micro_batch"]

    @field_validator("loss")
    @classmethod
    def _registered(cls, value: str) -> str:
        if value not in ALGORITHMS:
            raise ValueError(f"{value!r} is not one of {sorted(ALGORITHMS)}")
        return value

    clip_low: float | None = Field(default=None, ge=0)  # None: a loss without a clipped ratio (RAFT)
    clip_high: float | None = Field(default=None, ge=0)
    clip_ratio_c: float | None = Field(default=None, gt=1)  # GRPO's dual clip
    kl_coef: float = Field(ge=0)
    loss_agg: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"]
    micro_batch_size: int | None = Field(ge=1)
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    warmup_updates: int = Field(ge=0)
    lr_schedule: Literal["constant", "cosine"]
    min_lr_ratio: float = Field(ge=0, le=1)
    grad_clip: float = Field(ge=0)
    betas: tuple[float, float]
    temperature: float = Field(gt=0)
    keep_rejected: bool
    recompute_old_logprobs: bool | Literal["auto"]
    filter_equal_groups: bool


class Eval(_Open):
    benchmarks: list[str] = Field(min_length=1)
    samples: int = Field(ge=1)
    pass_k: list[int] = Field(min_length=1)
    every: int = Field(ge=1)
    every_samples: int = Field(ge=0)
    before_training: bool
    reuse_pi0: bool = True
    max_prompt_tokens: int | None = Field(ge=1)  # null: no limit
    sampling: Sampling

    @model_validator(mode="after")
    def _pass_k(self) -> Eval:
        bad = [k for k in self.pass_k if not 1 <= k <= self.samples]
        if bad:
            raise ValueError(f"pass_k={self.pass_k}: each k must be between 1 and samples={self.samples} (got {bad})")
        return self


class Warmstart(_Closed):
    steps: int = Field(ge=0)
    target_accuracy: float = Field(ge=0, le=1)
    eval_every: int = Field(ge=0)
    eval_problems: int = Field(ge=0)
    eval_samples: int = Field(ge=0)
    batch_size: int = Field(ge=0)
    schedule: Literal["constant", "cosine"]
    lr: float = Field(ge=0)
    seed: int
    skip_pool: bool

    @model_validator(mode="after")
    def _an_sft_needs_its_settings(self) -> Warmstart:
        if self.steps > 0:
            missing = [f"{k}={getattr(self, k)}" for k in ("batch_size", "lr") if getattr(self, k) <= 0]
            if self.eval_every > 0:
                probe = ("eval_problems", "eval_samples")
                missing += [f"{k}={getattr(self, k)}" for k in probe if getattr(self, k) < 1]
            if missing:
                raise ValueError(
                    f"steps={self.steps} asks for an SFT warm start, which needs {', '.join(missing)} to be > 0 "
                    "(with warmstart=none, set warmstart.steps=0; a preset such as experiment=smoke sets steps)"
                )
        return self


class Model(_Open):  # None: a key this model group does not have
    path: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    vocab_size: int | None = Field(default=None, ge=259)  # a byte-level BPE holds 256 bytes and 3 special tokens


class Budget(_Closed):
    samples: int | None = Field(default=None, ge=1)
    tokens: int | None = Field(default=None, ge=1)
    updates: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _at_most_one(self) -> Budget:
        given = [k for k in ("samples", "tokens", "updates") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"set at most one budget, not {', '.join(given)}")
        return self


class Checkpointing(_Closed):
    every_updates: int = Field(ge=0)
    keep: int = Field(ge=1)
    trust: bool


class Export(_Closed):
    every: int = Field(ge=0)  # 0: only the final iteration
    keep_last: int | None = Field(ge=1)  # null: every export


class Reward(_Open):  # None: a key this reward does not have
    num_workers: int | None = Field(default=None, ge=1)
    timeout_s: int | None = Field(default=None, ge=1)  # whole seconds: SIGALRM takes no fraction
    hard_timeout_s: float | None = Field(default=None, gt=0)
    max_answer_chars: int | None = Field(default=None, ge=1)


class Trainer(_Open):
    devices: int | str | list[int]
    num_nodes: int = Field(default=1, ge=1)


class Config(_Open):
    seed: int
    iterations: int = Field(ge=1)
    prompts_per_iteration: int = Field(ge=1)
    pool_size: int | None = Field(ge=1)
    pool_sampling: Literal["random", "shards"]
    batch_size: int = Field(ge=1)
    updates_per_iteration: int = Field(ge=1)
    update_accounting: Literal["fixed", "reference", "per_sample"]
    samples_per_update: int = Field(ge=1)
    max_prompt_tokens: int = Field(ge=1)
    activation_checkpointing: bool
    threads: Any = "auto"  # auto or a number of torch threads (dibs.launch)

    @field_validator("threads")
    @classmethod
    def _threads(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError(f"{value!r} is neither auto nor a number of threads >= 1")

    cache_dir: str
    ckpt_path: str | None
    checkpoint: Checkpointing
    export: Export
    budget: Budget
    allocation: Allocation
    rollout: Rollout
    algo: Algo
    eval: Eval
    warmstart: Warmstart
    model: Model
    reward: Reward
    trainer: Trainer


def _describe(error: dict[str, Any], config: dict[str, Any]) -> str:
    # A field with several allowed types reports the type tried as an extra part of loc (trainer.devices.int).
    loc = [str(p) for p in error["loc"] if not (isinstance(p, str) and p in _TYPE_NAMES)]
    key = ".".join(loc)
    if error["type"] == "value_error":  # a relation between keys: the message names them
        message = error["msg"].removeprefix("Value error, ")
        if not key:
            return message
        return f"{key}.{message}" if _NAMES_A_KEY.match(message) else f"{key}: {message}"
    value: Any = config
    for part in error["loc"]:
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError):
            value = error.get("input")
            break
    allowed = error["msg"]
    if error["type"] == "extra_forbidden":
        allowed = "not a known key of this group"
    elif error["type"] == "missing":
        return f"{key}: missing (it has no default; set it)"
    return f"{key}={value!r}: {allowed[0].lower()}{allowed[1:]}"


def validate_config(config: dict[str, Any]) -> None:
    """Check a resolved config (plain dict); raise ``ConfigError`` naming every key at fault."""
    try:
        Config.model_validate(config)
    except ValidationError as error:
        lines = [_describe(e, config) for e in error.errors(include_url=False)]
        raise ConfigError("config error: " + "\n  ".join(lines)) from None
