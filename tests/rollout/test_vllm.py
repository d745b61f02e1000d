"""The vLLM backend on CPU, against tests/rollout/vllm_standin.py put in ``sys.modules["vllm"]`` (vLLM itself is
CUDA-only); the real engine runs in the gpu+vllm test at the end, skipped without both."""

import copy
import importlib.util
import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from dibs.core.logprobs import sequence_logprobs
from dibs.data.prompts import PromptTemplate, encode_prompts
from dibs.lit.weights import iter_full_tensors
from dibs.rollout import availability
from dibs.rollout import vllm as vllm_backend
from dibs.rollout.base import SamplingParams, check_logprob_gap
from dibs.rollout.vllm import VLLMGenerator, weight_buckets

STANDIN = Path(__file__).with_name("vllm_standin.py")
CONF = Path(__file__).resolve().parents[2] / "conf"


@pytest.fixture()
def standin(monkeypatch):
    """The stand-in as the ``vllm`` module, on a machine that (the availability check is told) has CUDA."""
    spec = importlib.util.spec_from_file_location("vllm", STANDIN)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "vllm", module)  # before running it: its dataclasses look themselves up there
    spec.loader.exec_module(module)
    monkeypatch.setattr(availability, "cuda_available", lambda: True)
    return module


@pytest.fixture()
def prompts(task, tokenizer):
    _, ids, _ = encode_prompts(task.test[:4], tokenizer, PromptTemplate(None, "", ""), max_prompt_tokens=256)
    return ids


GENERATOR = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf" / "rollout" / "vllm.yaml").generator
SETTINGS = {k: v for k, v in OmegaConf.to_container(GENERATOR).items() if not k.startswith("_")}


def make(model, tokenizer, **kwargs) -> VLLMGenerator:
    """The generator with conf/rollout/vllm.yaml's settings (in float32, from a temporary folder) and ``kwargs``."""
    return VLLMGenerator(model, tokenizer, **{**SETTINGS, "model_path": None, "dtype": "float32", **kwargs})


def logprob_gap(completions, trainer) -> float:
    """Mean |engine − trainer| log-prob per token over the completions (the E-step's check, on a few samples)."""
    diffs = [(c.logprobs - t).abs() for c, t in zip(completions, trainer, strict=True)]
    return float(torch.cat(diffs).mean()) if diffs else 0.0


def trainer_logprobs(model, prompt, completion, temperature):
    seq = torch.tensor([list(prompt) + completion.token_ids.tolist()])
    with torch.no_grad():
        logp = sequence_logprobs(lambda **kw: model(**kw).logits, seq, torch.ones_like(seq), temperature)  # [1, L-1]
    return logp[0, len(prompt) - 1 :]


def perturbed(model, scale=0.3):
    other = copy.deepcopy(model)
    rng = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=rng))
    return other


# ---------------------------------------------------------------- availability


def test_missing_vllm_names_the_extra_and_the_config_partial_does_not_import_it(monkeypatch, tiny_model, tokenizer):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    from dibs.conf import register_resolvers

    register_resolvers()
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    assert importlib.util.find_spec("vllm") is None  # CPU machines never install it
    with pytest.raises(ImportError, match=r"pip install -e \.\[vllm\]"):
        availability.require_vllm()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["rollout=vllm"])
    partial = instantiate(cfg.rollout.generator)  # what tests/test_configs.py does: no vllm import yet
    with pytest.raises(ImportError, match=r"pip install -e \.\[vllm\]"):
        partial(tiny_model, tokenizer)


@pytest.mark.parametrize(
    ("version", "ok"), [("0.29.2", False), ("0.30.0", True), ("0.33.1rc1", True), ("0.34.0", False)]
)
def test_version_window(standin, monkeypatch, version, ok):
    monkeypatch.setattr(standin, "__version__", version)
    if ok:
        assert availability.require_vllm() is standin
    else:
        with pytest.raises(ImportError, match=r"outside the tested window >=0\.30,<0\.34"):
            availability.require_vllm()


def test_no_cuda_is_a_clear_error(standin, monkeypatch):
    monkeypatch.setattr(availability, "cuda_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        availability.require_vllm()


# ---------------------------------------------------------------- generation


def test_engine_settings_and_requests_per_prompt(standin, tiny_model, tokenizer, prompts):
    gen = make(tiny_model, tokenizer, enable_sleep_mode=False, max_model_len=512, seed=3)
    init = gen._engine().init_kwargs
    assert init["logprobs_mode"] == "processed_logprobs" and init["generation_config"] == "vllm"
    assert init["worker_extension_cls"] == "dibs.rollout.vllm.WeightLoaderExtension"
    assert (init["max_model_len"], init["seed"], init["enable_sleep_mode"]) == (512, 3, False)
    sampling = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, max_new_tokens=5)
    params = gen.sampling_params(sampling, n=3)
    assert (params.n, params.temperature, params.top_p, params.top_k, params.max_tokens) == (3, 0.8, 0.9, 20, 5)
    assert (params.logprobs, params.skip_special_tokens) == (0, True)
    out = gen.generate(prompts, [2, 0, 3, 1], sampling)
    assert [len(g) for g in out] == [2, 0, 3, 1]
    assert gen._engine().calls == [("generate", [2, 3, 1])]  # one request per prompt with n > 0, order kept
    assert gen.generate(prompts[:2], [0, 0], sampling) == [[], []] and len(gen._engine().calls) == 1


def test_completions_match_the_trainers_logprobs_at_the_sampling_temperature(standin, tiny_model, tokenizer, prompts):
    gen = make(tiny_model, tokenizer)
    torch.manual_seed(0)
    out = gen.generate(prompts, [2, 1, 0, 2], SamplingParams(temperature=1.3, max_new_tokens=12))
    eos = tokenizer.eos_token_id
    for prompt, group in zip(prompts, out):
        for c in group:
            assert c.token_ids.dtype == torch.int64 and c.logprobs.dtype == torch.float32
            assert len(c.token_ids) == len(c.logprobs) <= 12
            assert (c.finish_reason == "stop") == (c.token_ids[-1].item() == eos)
            assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)
            expected = trainer_logprobs(tiny_model, prompt, c, 1.3)
            torch.testing.assert_close(c.logprobs, expected, atol=1e-4, rtol=1e-4)
    torch.manual_seed(0)  # the callback's seeding decides the samples, not the engine's history
    again = gen.generate(prompts, [2, 1, 0, 2], SamplingParams(temperature=1.3, max_new_tokens=12))
    assert [[c.token_ids.tolist() for c in g] for g in again] == [[c.token_ids.tolist() for c in g] for g in out]


def test_result_mapping_keeps_eos_and_finish_reasons(standin, tiny_model, tokenizer):
    gen = make(tiny_model, tokenizer)
    eos = tokenizer.eos_token_id
    lp = standin.Logprob
    stopped = standin.CompletionOutput(
        0, "ab", [5, 6, eos], -0.6, [{5: lp(-0.1)}, {6: lp(-0.2)}, {eos: lp(-0.3)}], "stop"
    )
    c = gen._completion(stopped)
    assert c.token_ids.tolist() == [5, 6, eos] and c.finish_reason == "stop" and c.text == "ab"
    torch.testing.assert_close(c.logprobs, torch.tensor([-0.1, -0.2, -0.3]))
    cut = gen._completion(standin.CompletionOutput(0, "a", [5], -0.1, [{5: lp(-0.1)}], "length"))
    assert cut.token_ids.tolist() == [5] and cut.finish_reason == "length"
    with pytest.raises(RuntimeError, match="'abort'"):
        gen._completion(standin.CompletionOutput(0, "a", [5], -0.1, [{5: lp(-0.1)}], "abort"))
    with pytest.raises(RuntimeError, match="no log-prob"):
        gen._completion(standin.CompletionOutput(0, "a", [5], None, None, "length"))


def test_a_missing_completion_is_an_error(standin, tiny_model, tokenizer, prompts, monkeypatch):
    gen = make(tiny_model, tokenizer)
    real = gen._engine().generate

    def short(*args, **kwargs):
        outputs = real(*args, **kwargs)
        outputs[1].outputs.pop()
        return outputs

    monkeypatch.setattr(gen._engine(), "generate", short)
    with pytest.raises(RuntimeError, match="returned 1 completions for prompt 2, asked for 2"):
        gen.generate(prompts[:3], [1, 0, 2], SamplingParams(max_new_tokens=2))


# ---------------------------------------------------------------- weights


def test_buckets_keep_order_and_cap_bytes():
    t = {n: torch.zeros(k, dtype=torch.float32) for n, k in [("a", 10), ("b", 10), ("c", 30), ("d", 5), ("e", 20)]}
    # caps of 100 bytes: a+b = 80 (+c = 200 > 100) | c = 120 alone (over the cap) | d+e = 20 + 80 = 100
    buckets = list(weight_buckets(t.items(), max_bytes=100))
    assert [[n for n, _ in b] for b in buckets] == [["a", "b"], ["c"], ["d", "e"]]
    assert all(x is t[n] for b in buckets for n, x in b)  # the tensors themselves, no copies
    assert list(weight_buckets([], 100)) == []
    assert [[n for n, _ in b] for b in weight_buckets(t.items(), max_bytes=1)] == [[n] for n in t]


def test_weight_push_one_rpc_per_bucket_then_prefix_cache_reset(standin, tiny_model, tokenizer):
    gen = make(tiny_model, tokenizer, weight_bucket_mb=0.02)  # ~21 kB: the 51 kB embedding goes alone
    new = perturbed(tiny_model).state_dict()
    gen.load_weights(new.items())
    n_buckets = len(list(weight_buckets(new.items(), int(0.02 * 2**20))))
    assert 2 < n_buckets < len(new)
    assert gen._engine().calls == [("collective_rpc", "dibs_load_weights")] * n_buckets + [("reset_prefix_cache", None)]
    engine = gen._engine().worker.get_model().hf_model.state_dict()
    for name, tensor in new.items():
        torch.testing.assert_close(engine[name], tensor, rtol=0, atol=0)


def test_sleep_state_is_tracked_and_use_wakes_the_engine(standin, tiny_model, tokenizer, prompts):
    gen = make(tiny_model, tokenizer, enable_sleep_mode=True)
    gen.sleep()  # before the engine exists: nothing to put to sleep, and no engine built for it
    assert gen._llm is None
    gen.wake()  # builds it, awake
    engine = gen._engine()
    gen.sleep(), gen.sleep()  # the second is not sent (the stand-in, stricter than vLLM, would raise)
    gen.generate(prompts[:1], [1], SamplingParams(max_new_tokens=2))  # wakes it first
    gen.wake(), gen.wake()  # awake already: nothing sent
    gen.sleep()
    gen.load_weights(tiny_model.state_dict().items())  # wakes it first too
    names = [name for name, _ in engine.calls]
    assert names[:5] == ["sleep", "wake_up", "generate", "sleep", "wake_up"]
    assert set(names[5:]) == {"collective_rpc", "reset_prefix_cache"} and engine.calls[0] == ("sleep", 1)
    gen.sleep()
    with pytest.raises(RuntimeError, match="sleeping engine"):  # what waking on use prevents
        engine.generate([{"prompt_token_ids": list(prompts[0])}], standin.SamplingParams(max_tokens=2))
    off = make(tiny_model, tokenizer, enable_sleep_mode=False)
    off.sleep(), off.wake(), off.sleep()
    assert off._engine().calls == []


# ---------------------------------------------------------------- one engine per rank, built on first use


def test_the_engine_is_built_on_first_use_not_in_init(standin, tiny_model, tokenizer, prompts, monkeypatch):
    built, real = [], standin.LLM

    def counting(**kwargs):
        built.append(kwargs["model"])
        return real(**kwargs)

    monkeypatch.setattr(standin, "LLM", counting)
    gen = make(tiny_model, tokenizer)
    assert gen._llm is None and built == []
    assert (Path(gen._folder.name) / "config.json").exists()  # the policy is saved at construction
    gen.generate(prompts[:1], [1], SamplingParams(max_new_tokens=2))
    gen.generate(prompts[:1], [1], SamplingParams(max_new_tokens=2))
    assert built == [gen._folder.name]  # once
    for first_use in ("wake", "load_weights"):
        other = make(tiny_model, tokenizer)
        getattr(other, first_use)(*([] if first_use == "wake" else [tiny_model.state_dict().items()]))
        assert other._llm is not None
    assert len(built) == 3


def test_single_process_engine_keeps_vllms_defaults(standin, tiny_model, tokenizer, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    engine = make(tiny_model, tokenizer)._engine()
    assert engine.init_kwargs["distributed_executor_backend"] is None and engine.launcher_ranks is None
    assert "RANK" not in os.environ


def test_each_rank_builds_its_own_engine_on_its_device_with_the_external_launcher(
    standin, tiny_model, tokenizer, monkeypatch
):
    monkeypatch.setattr(vllm_backend, "_trainer_world", lambda: (3, 4))  # rank 3 of 4
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)  # e.g. devices=[6, 1, ...]: not the rank
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "3")  # Lightning's, which must survive
    gen = make(tiny_model, tokenizer)
    assert gen._llm is None  # nothing read at construction: the process may not be on its device yet
    engine = gen._engine()
    assert engine.init_kwargs["distributed_executor_backend"] == "external_launcher"
    assert engine.init_kwargs["tensor_parallel_size"] == 1
    assert engine.launcher_ranks == (3, 1)  # RANK = the trainer's rank, LOCAL_RANK = the current CUDA device
    assert "RANK" not in os.environ and os.environ["LOCAL_RANK"] == "3"  # restored
    wide = make(tiny_model, tokenizer, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="tensor_parallel_size=2 with 4 trainer processes"):
        wide.wake()


# ---------------------------------------------------------------- self-check


def test_the_gap_check_raises_above_its_threshold_and_on_nan():
    check_logprob_gap(0.34, threshold=0.34)
    with pytest.raises(RuntimeError, match=r"logprob_check_threshold=0.3: stale weights\?"):
        check_logprob_gap(0.34, threshold=0.3)
    with pytest.raises(RuntimeError, match="stale weights"):
        check_logprob_gap(float("nan"), threshold=0.3)


def self_check(gen, policy, prompts, temperature=1.3):
    torch.manual_seed(0)
    out = gen.generate(prompts, [1] * len(prompts), SamplingParams(temperature=temperature, max_new_tokens=8))
    samples = [(p, c) for p, g in zip(prompts, out) for c in g][:3]
    gap = logprob_gap([c for _, c in samples], [trainer_logprobs(policy, p, c, temperature) for p, c in samples])
    check_logprob_gap(gap, gen.logprob_check_threshold)
    return gap


def test_self_check_passes_with_fresh_weights_and_fails_with_stale_ones(standin, tiny_model, tokenizer, prompts):
    gen = make(tiny_model, tokenizer, logprob_check_threshold=0.05)
    assert self_check(gen, tiny_model, prompts) < 1e-4
    trained = perturbed(tiny_model)
    gen.load_weights(iter_full_tensors(trained))
    assert self_check(gen, trained, prompts) < 1e-4
    gen._engine().worker.get_model().ignore_updates = True  # the bug: pushes that never reach the engine's weights
    gen.load_weights(iter_full_tensors(perturbed(trained)))
    with pytest.raises(RuntimeError, match=r"rollout\.generator\.logprob_check_threshold=0\.05: stale weights\?"):
        self_check(gen, perturbed(trained), prompts)


def test_self_check_catches_temperature_1_logprobs(standin, tiny_model, tokenizer, prompts):
    policy = perturbed(tiny_model)  # sharper than the near-uniform initialisation, so temperature matters
    gen = make(policy, tokenizer)
    assert self_check(gen, policy, prompts, temperature=0.5) < 1e-4
    gen._engine().logprobs_mode = "raw_logprobs"  # vLLM's default: what the engine reports without our setting
    with pytest.raises(RuntimeError, match="stale weights"):  # a gap of ~1 nat per token here
        self_check(gen, policy, prompts, temperature=0.5)


# ---------------------------------------------------------------- FSDP2: one parameter at a time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_module() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3, bias=False))


def _fsdp_rank(rank: int, port: int, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        module = _tiny_module()
        mesh = init_device_mesh("cpu", (2,))
        for layer in (module[0], module[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(module, mesh=mesh)
        local = {name: list(p.to_local().shape) for name, p in module.state_dict().items()}
        full = {name: t.tolist() for name, t in iter_full_tensors(module)}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"local": local, "full": full}))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_iter_full_tensors_gathers_fsdp2_shards(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # spawn (see tests/lit/test_metrics_distributed.py): the children import this module as tests.rollout.test_vllm
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[__name__.count(".")]))
    mp.start_processes(_fsdp_rank, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    expected = {name: t.tolist() for name, t in _tiny_module().state_dict().items()}
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    # really sharded: dim 0 split ceil-first, 5 rows → 3 + 2 and 3 rows → 2 + 1
    assert [r["local"]["0.weight"] for r in results] == [[3, 6], [2, 6]]
    assert [r["local"]["2.weight"] for r in results] == [[2, 5], [1, 5]]
    for result in results:
        assert list(result["full"]) == list(expected)
        for name, value in expected.items():
            torch.testing.assert_close(torch.tensor(result["full"][name]), torch.tensor(value), rtol=0, atol=0)


# ---------------------------------------------------------------- the real engine


@pytest.mark.gpu
@pytest.mark.vllm
def test_real_engine_generates_and_takes_weights(tiny_model, tokenizer, prompts):
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    gen = make(tiny_model, tokenizer, gpu_memory_utilization=0.2, max_model_len=1024)
    sampling = SamplingParams(temperature=1.3, max_new_tokens=8)
    torch.manual_seed(0)
    out = gen.generate(prompts, [2, 0, 1, 1], sampling)
    assert [len(g) for g in out] == [2, 0, 1, 1]
    samples = [(p, c) for p, g in zip(prompts, out) for c in g]
    gap = logprob_gap([c for _, c in samples], [trainer_logprobs(tiny_model, p, c, 1.3) for p, c in samples])
    assert gap < 1e-3
    trained = perturbed(tiny_model)
    gen.sleep(), gen.wake()
    gen.load_weights(iter_full_tensors(trained))
    assert self_check(gen, trained, prompts) < 1e-3
