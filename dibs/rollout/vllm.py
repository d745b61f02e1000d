"""Sampling with a colocated vLLM engine (CUDA only); the only module that imports vllm, and only when a
``VLLMGenerator`` is built, so importing this module (and instantiating the Hydra partial) works without it.

Tested against vLLM 0.30-0.33 (``dibs.rollout.availability``). One request per prompt with
``SamplingParams(n=n_i)``; the engine reports log-probs with ``logprobs_mode="processed_logprobs"``, i.e. after
temperature (and top-k/top-p), because its default, ``raw_logprobs``, is the temperature-1 distribution. With
``top_p=1`` and ``top_k=0`` that is exactly the HF backend's and the trainer's log π at the sampling temperature;
with a nucleus the engine renormalises over it, which the trainer does not (the E-step's check of the sampler's
log-probs against the trainer's, ``logprob_check_threshold``, then measures the gap).

Weights go in through the engine's documented RL path: ``LLM.collective_rpc`` calls a method of a worker
extension (``worker_extension_cls``, the class below, which vLLM mixes into its worker) that hands each bucket
of full tensors to the model's own ``load_weights`` (vLLM shards them for tensor parallelism), as vLLM's
``examples/offline_inference/rlhf_utils.py`` does; then the prefix cache, which holds KV of the old weights,
is reset. Quantised engines, which need ``process_weights_after_loading`` after a reload, are not supported.

The engine is built lazily, on first use (``generate``, ``load_weights``, ``wake``): train.py builds the
generator before Lightning has started the processes and set each rank's CUDA device, so an engine built in
``__init__`` would land on GPU 0 on every rank. ``__init__`` only checks that vllm is importable and saves the
policy for the engine to load.

One engine per trainer rank, on that rank's device. In a single process vLLM's defaults hold. When
``torch.distributed`` is initialised with world size > 1 (and ``tensor_parallel_size=1``), the engine is built
with ``distributed_executor_backend="external_launcher"``, as TRL's colocate mode does, with ``RANK`` = the
trainer's rank and ``LOCAL_RANK`` = ``torch.cuda.current_device()`` in the environment while it is built (and
restored afterwards, so Lightning's own ``LOCAL_RANK`` is untouched). From the vLLM source (0.33; 0.30 alike):

- the default executors would put every rank's engine on GPU 0: ``UniProcExecutor._distributed_args`` gives
  rank 0 and local rank = the index in ``device_config.device`` (``"cuda"`` → 0)
  (v1/executor/uniproc_executor.py:75-85), and with the default ``VLLM_ENABLE_V1_MULTIPROCESSING=1`` the engine
  core runs in a child process of its own;
- ``ExecutorWithExternalLauncher`` runs the worker in this process and reads ``RANK`` and ``LOCAL_RANK``
  (uniproc_executor.py:186-197); for this backend ``get_local_gpu_index`` returns the local rank unchanged
  (config/parallel.py:842-856) and the worker takes ``cuda:<local rank>`` (v1/worker/gpu_worker.py:449-496);
- it reuses the trainer's process group (``init_distributed_environment`` skips ``init_process_group`` when
  one exists, distributed/parallel_state.py:1928) and lays the trainer's world out as
  ``ExternalDP x DP x PP x PCP x TP`` where "ExternalDP ... every dp rank can generate independently (in verl
  integration)" (parallel_state.py:2149-2160): with tensor_parallel_size=1 each rank is a TP group of one, an
  independent engine. So the engine's world need not equal the trainer's; external_launcher is not only for
  tensor parallelism across the trainer's ranks (that is ``tensor_parallel_size > 1``, which needs the ranks of
  a TP group to send the same prompts: refused here);
- ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` is required (asserted in ``ExecutorWithExternalLauncher._init_executor``,
  uniproc_executor.py:178-184) but vLLM sets it itself for this backend in ``ParallelConfig.__post_init__``
  (config/parallel.py:1050-1052), before ``LLMEngine.from_engine_args`` reads it (v1/engine/llm_engine.py:186):
  not set here.

Building the engine is then a collective over the trainer's world (vLLM's world and TP/PP/DP groups are
``new_group`` calls on it, and ``determine_available_memory`` all-reduces the free memory, MIN, over the world's
CPU group, uniproc_executor.py:199-207, so every rank gets the smallest KV cache): every rank must make its first
use at the same point, as the rollout callback's weight push (``wake`` then ``load_weights``) does.

Sleep: vLLM's executor only warns on a second ``sleep`` or on ``wake_up`` of an awake engine
(v1/executor/abstract.py:400-415); the state is tracked here so neither is sent, and ``generate`` /
``load_weights`` wake a sleeping engine first.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

from dibs.rollout.availability import require_vllm
from dibs.rollout.base import Completion, SamplingParams

__all__ = ["VLLMGenerator", "WeightLoaderExtension", "weight_buckets"]

NamedTensor = tuple[str, torch.Tensor]


class WeightLoaderExtension:
    """Mixed into vLLM's worker by the engine (``worker_extension_cls``); ``self`` is the worker."""

    def dibs_load_weights(self, weights: list[NamedTensor]) -> int:
        model = self.get_model()  # the worker's public accessor (vLLM >= 0.30)
        device = next(model.parameters()).device
        model.load_weights(weights=[(name, t.to(device)) for name, t in weights])
        return len(weights)


def weight_buckets(named_tensors: Iterable[NamedTensor], max_bytes: int) -> Iterator[list[NamedTensor]]:
    """Consecutive groups of at most ``max_bytes`` each, in order, one at a time; a larger tensor is a bucket of
    its own."""
    bucket: list[NamedTensor] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > max_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def _trainer_world() -> tuple[int, int]:
    """(rank, world size) of the trainer's ``torch.distributed`` group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Set environment variables for the block, then restore what was there (or remove them)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class VLLMGenerator:
    """A vLLM engine on this process's GPU, next to the trainer; the trainer pushes weights with ``load_weights``.

    ``model`` is the policy train.py passes: unless ``model_path`` names a Hugging Face folder of the same
    architecture, the policy and tokenizer are saved to a temporary folder for the engine to load (the
    weights the engine starts from matter little: the trainer pushes its own before the first E-step). The
    engine itself is built on first use (see the module docstring)."""

    measures_head_grad_norms = False

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        model_path: str | None,
        gpu_memory_utilization: float,
        tensor_parallel_size: int,
        dtype: str,
        enable_sleep_mode: bool,
        weight_bucket_mb: float,
        max_model_len: int | None,
        seed: int,
        logprob_check_threshold: float,
    ) -> None:
        vllm = require_vllm()  # the one import of vllm: a missing or unusable one fails at start-up
        self._vllm = vllm
        self._sampling_cls = vllm.SamplingParams
        self._folder: tempfile.TemporaryDirectory | None = None
        if model_path is None:
            self._folder = tempfile.TemporaryDirectory(prefix="dibs-vllm-")
            model.save_pretrained(self._folder.name)
            tokenizer.save_pretrained(self._folder.name)
            model_path = self._folder.name
        self.tokenizer, self.eos_token_id = tokenizer, tokenizer.eos_token_id
        self.enable_sleep_mode = enable_sleep_mode
        self.tensor_parallel_size = tensor_parallel_size
        self.weight_bucket_bytes = int(weight_bucket_mb * 2**20)
        self.logprob_check_threshold = logprob_check_threshold  # read by the E-step's check (dibs.rollout.base)
        self._llm_kwargs: dict[str, Any] = dict(
            model=model_path,
            tokenizer=model_path,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            enable_sleep_mode=enable_sleep_mode,
            logprobs_mode="processed_logprobs",  # log π at the sampling temperature, as the trainer computes
            generation_config="vllm",  # a checkpoint's generation_config.json must not leak into sampling
            worker_extension_cls=f"{__name__}.WeightLoaderExtension",
        )
        self._llm: Any = None  # built by _engine() on first use
        self._asleep = False

    # ---- the engine -----------------------------------------------------------------------------
    def _engine(self) -> Any:
        """The engine, built on the first call: on this rank's current CUDA device, one per trainer rank."""
        if self._llm is None:
            # In-process engine core: collective_rpc then hands the worker real tensors. With the default
            # (a separate engine-core process), utility-call arguments go through msgpack and arrive as lists.
            kwargs, env = dict(self._llm_kwargs), {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
            rank, world = _trainer_world()
            if world > 1:
                if self.tensor_parallel_size != 1:
                    raise ValueError(
                        f"rollout.generator.tensor_parallel_size={self.tensor_parallel_size} with {world} trainer "
                        "processes: each rank runs its own engine on its own GPU, so only 1 is supported"
                    )
                kwargs["distributed_executor_backend"] = "external_launcher"  # see the module docstring
                env.update(RANK=str(rank), LOCAL_RANK=str(torch.cuda.current_device()))
            with _environment(**env):
                self._llm = self._vllm.LLM(**kwargs)
            self._asleep = False
        return self._llm

    def _awake_engine(self) -> Any:
        llm = self._engine()
        if self._asleep:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the M-step's freed activations stay cached by torch otherwise
            llm.wake_up()
            self._asleep = False
        return llm

    # ---- Generator ------------------------------------------------------------------------------
    def generate(
        self, prompts: Sequence[Sequence[int]], n_per_prompt: Sequence[int], sampling: SamplingParams
    ) -> list[list[Completion]]:
        if len(prompts) != len(n_per_prompt):
            raise ValueError(f"{len(prompts)} prompts but {len(n_per_prompt)} sample counts")
        asked = [i for i, n in enumerate(n_per_prompt) if int(n) > 0]  # vLLM rejects n = 0
        results: list[list[Completion]] = [[] for _ in prompts]
        if not asked:
            return results
        requests = [{"prompt_token_ids": [int(t) for t in prompts[i]]} for i in asked]  # a TokensPrompt
        params = [self.sampling_params(sampling, int(n_per_prompt[i])) for i in asked]
        outputs = self._awake_engine().generate(requests, params, use_tqdm=False)
        if len(outputs) != len(asked):
            raise RuntimeError(f"vLLM returned {len(outputs)} request outputs for {len(asked)} requests")
        for i, output in zip(asked, outputs):
            if len(output.outputs) != int(n_per_prompt[i]):
                raise RuntimeError(
                    f"vLLM returned {len(output.outputs)} completions for prompt {i}, asked for {n_per_prompt[i]}"
                )
            results[i] = [self._completion(c) for c in sorted(output.outputs, key=lambda c: c.index)]
        return results

    def sampling_params(self, sampling: SamplingParams, n: int) -> Any:
        """vLLM's SamplingParams for one request. The seed is drawn from torch's RNG, which the callback seeds
        per iteration and rank, so a run's samples do not depend on the engine's history (vLLM gives the
        request's k-th sample seed + k)."""
        return self._sampling_cls(
            n=n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,  # 0 disables top-k in vLLM too
            max_tokens=sampling.max_new_tokens,
            logprobs=0,  # the sampled token's log-prob only
            seed=int(torch.randint(0, 2**31 - 1, ())),
            skip_special_tokens=True,
        )

    def _completion(self, output: Any) -> Completion:
        if output.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM finished a completion with {output.finish_reason!r}")
        ids = torch.tensor(list(output.token_ids), dtype=torch.long)  # [T], with the EOS that stopped it
        if output.logprobs is None or len(output.logprobs) != len(ids):
            raise RuntimeError("vLLM returned no log-prob for some sampled tokens (was logprobs=0 dropped?)")
        logprobs = torch.tensor(
            [position[int(t)].logprob for position, t in zip(output.logprobs, ids)], dtype=torch.float32
        )  # [T]
        return Completion(ids, logprobs, output.text, output.finish_reason)

    def load_weights(self, weights: Iterable[NamedTensor]) -> None:
        """Push full (unsharded) tensors in buckets of at most ``weight_bucket_mb``, then drop the prefix cache."""
        llm = self._awake_engine()
        for bucket in weight_buckets(weights, self.weight_bucket_bytes):
            cpu = [(name, t.detach().to("cpu").contiguous()) for name, t in bucket]  # what the RPC serialises
            llm.collective_rpc("dibs_load_weights", args=(cpu,))
        llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def sleep(self) -> None:
        """Level 1 (weights to CPU, KV cache dropped) for an awake engine; nothing for an unbuilt one."""
        if self.enable_sleep_mode and self._llm is not None and not self._asleep:
            self._llm.sleep(level=1)
            self._asleep = True

    def wake(self) -> None:
        """Build the engine if needed, and wake it if it sleeps."""
        self._awake_engine()
