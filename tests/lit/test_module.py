"""EMModule's M-step on the tests' tiny Qwen2 through a real Lightning fit: micro-batches, the KL reference,
and the old log-probs of the E-step's scoring pass."""

import copy
from dataclasses import replace
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from dibs.core.losses import AGG_MODES, ALGORITHMS
from dibs.estep.samples import Trajectory
from dibs.lit.datamodule import collate_trajectories
from dibs.lit.module import EMModule
from dibs.lit.scoring import score_trajectories


class GradRecorder(L.Callback):
    """The policy's gradients as the optimiser sees them, at every step."""

    def __init__(self):
        self.grads = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.policy.named_parameters()})


def fit(module, batches):
    """One optimiser update per batch; returns the recorder and the metrics of the last step."""
    recorder = GradRecorder()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return recorder, {k: float(v) for k, v in trainer.callback_metrics.items()}


def trajectories(pad_id, *, seed=0, rows=7, ref_shift=None):
    """Rows of varied prompt and response lengths, advantages of both signs, old log-probs around the tiny
    model's (ratios on both sides of the clip range) and reference log-probs."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(rows):
        prompt = torch.randint(3, 300, (2 + k % 3,), generator=g)
        response = torch.randint(3, 300, (1 + (5 * k) % 7,), generator=g)
        old = -6.0 + torch.randn(len(response), generator=g)  # [T] log(1/400) ≈ −6
        ref = old - 0.7 if ref_shift is None else old + ref_shift
        out.append(Trajectory(prompt, response, old, (-1.0) ** k * (0.5 + k / 4), float(k % 2), k // 2, old, ref))
    return out


ARGS = dict(lr=1e-2, grad_clip=0.0, warmup_updates=0, lr_schedule="constant")
CONF = Path(__file__).resolve().parents[2] / "conf"


def make(policy, loss="raftpp", **overrides):
    """EMModule with the settings of conf/optim/adamw.yaml and conf/algo/<loss>.yaml (their only home)."""
    settings = {}
    for path in (CONF / "optim" / "adamw.yaml", CONF / "algo" / f"{loss}.yaml"):
        settings.update(OmegaConf.to_container(OmegaConf.load(path)))
    for key in ("loss", "keep_rejected", "recompute_old_logprobs", "filter_equal_groups"):
        settings.pop(key)  # the E-step's, and the registry's name
    settings.update(temperature=1.0, total_updates=0, activation_checkpointing=False)
    return EMModule(policy, ALGORITHMS[loss], **{**settings, **overrides})


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("loss", ["raft", "raftpp", "grpo", "drgrpo"])
def test_micro_batches_give_the_same_update_as_the_whole_batch(tokenizer, tiny_model, loss, agg):
    # 7 rows cut 3 + 3 + 1: each micro-batch is normalised by the whole batch's tokens (or rows), so the
    # accumulated gradient the optimiser steps on, and the logged loss, equal those of one pass over all 7 rows.
    # (The gradient is compared, not the weights after AdamW: its first step, lr·g/(|g| + 1e-8), turns 1e-12
    # float noise on a near-zero gradient entry into a difference of up to lr.)
    batch = collate_trajectories(trajectories(tokenizer.pad_token_id), tokenizer.pad_token_id)
    args = dict(ARGS, loss=loss, loss_agg=agg, kl_coef=0.1, clip_low=0.2, clip_high=0.28)
    whole = make(copy.deepcopy(tiny_model), **args)
    micro = make(copy.deepcopy(tiny_model), **args, micro_batch_size=3)
    (g_whole, m_whole), (g_micro, m_micro) = fit(whole, [batch]), fit(micro, [batch])
    for name, grad in g_whole.grads[0].items():
        torch.testing.assert_close(g_micro.grads[0][name], grad, rtol=0, atol=1e-6)
    assert max(g.abs().max().item() for g in g_whole.grads[0].values()) > 1e-3  # a real gradient, not zeros
    assert m_micro["train/loss"] == pytest.approx(m_whole["train/loss"], abs=1e-6)
    # and both are the core loss of the whole batch, computed directly
    logp, _ = make(copy.deepcopy(tiny_model)).score(batch["input_ids"], batch["attention_mask"])
    options = dict(agg=agg, ref_logp=batch["ref_logprobs"], kl_coef=0.1)
    options.update({} if loss == "raft" else dict(clip_low=0.2, clip_high=0.28))
    options.update(clip_ratio_c=3.0) if loss in ("grpo", "drgrpo") else None
    direct = ALGORITHMS[loss].loss(logp, batch["old_logprobs"], batch["response_mask"], batch["advantages"], **options)
    assert m_whole["train/loss"] == pytest.approx(direct.loss.item(), abs=1e-6)
    for key in ("train/kl", "train/accepted_frac"):
        assert m_micro[key] == pytest.approx(m_whole[key], abs=1e-6)  # token-weighted over micro-batches
    assert m_whole["train/accepted_frac"] == pytest.approx(3 / 7)  # rewards k % 2 for k = 0..6


def test_micro_batch_scope_is_the_reference_actors_mean_of_micro_batch_token_means(tokenizer, tiny_model):
    # loss_scope=micro_batch: 7 rows cut 3 + 3 + 1, each micro-batch's loss normalised by its own tokens, then
    # averaged over the 3 micro-batches (verl's loss / gradient_accumulation in the reference's actor)
    batch = collate_trajectories(trajectories(tokenizer.pad_token_id), tokenizer.pad_token_id)
    logp, _ = make(copy.deepcopy(tiny_model)).score(batch["input_ids"], batch["attention_mask"])
    options = dict(clip_low=0.2, clip_high=0.2, agg="token-mean", kl_coef=0.0)
    keys = ("old_logprobs", "response_mask", "advantages")
    parts = [
        ALGORITHMS["raftpp"].loss(logp[r], *(batch[k][r] for k in keys), **options).loss.item()
        for r in (slice(0, 3), slice(3, 6), slice(6, 7))
    ]
    scoped = make(copy.deepcopy(tiny_model), **ARGS, loss_scope="micro_batch", micro_batch_size=3)
    whole = make(copy.deepcopy(tiny_model), **ARGS, micro_batch_size=3)
    (_, m_scoped), (_, m_whole) = fit(scoped, [batch]), fit(whole, [batch])
    assert m_scoped["train/loss"] == pytest.approx(sum(parts) / 3, abs=1e-6)
    direct = ALGORITHMS["raftpp"].loss(logp, *(batch[k] for k in keys), **options).loss.item()
    assert m_whole["train/loss"] == pytest.approx(direct, abs=1e-6)
    assert abs(m_scoped["train/loss"] - m_whole["train/loss"]) > 1e-4  # the two normalisations differ here


def test_zero_weight_rows_change_nothing(tokenizer, tiny_model):
    # a placeholder row (row_mask 0) appended to a batch neither adds gradient nor counts in the denominator
    items = trajectories(tokenizer.pad_token_id, rows=4)
    batch = collate_trajectories(items, tokenizer.pad_token_id)
    padded = collate_trajectories(items + [items[0]], tokenizer.pad_token_id)
    padded["row_mask"][-1] = 0.0
    padded["response_mask"][-1] = 0.0
    for agg in ("token-mean", "seq-mean-token-mean"):
        a = fit(make(copy.deepcopy(tiny_model), **ARGS, loss="grpo", loss_agg=agg), [batch])[0]
        b = fit(make(copy.deepcopy(tiny_model), **ARGS, loss="grpo", loss_agg=agg), [padded])[0]
        for name, grad in a.grads[0].items():
            torch.testing.assert_close(b.grads[0][name], grad, rtol=0, atol=1e-7)


def test_kl_reference_is_frozen_outside_the_optimizer_and_changes_the_gradient(tokenizer, tiny_model):
    module = make(copy.deepcopy(tiny_model), **ARGS, loss="grpo", kl_coef=0.5)
    initial = {n: p.detach().clone() for n, p in module.reference.named_parameters()}
    batch = collate_trajectories(trajectories(tokenizer.pad_token_id), tokenizer.pad_token_id)
    recorder, metrics = fit(module, [batch, batch])  # two updates: the policy moves away from the reference
    assert all(torch.equal(p, initial[n]) for n, p in module.reference.named_parameters())
    assert not any(p.requires_grad for p in module.reference.parameters()) and not module.reference.training
    optimised = {id(p) for group in module.optimizers().optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in module.policy.parameters()}
    assert not optimised & {id(p) for p in module.reference.parameters()}
    moved = max((p - q).abs().max().item() for p, q in zip(module.policy.parameters(), initial.values()))
    assert moved > 1e-3 and metrics["train/kl"] > 0
    # the same batch without the penalty: the gradient differs (reference log-probs are 0.7 below the old ones)
    plain = fit(make(copy.deepcopy(tiny_model), **ARGS, loss="grpo", kl_coef=0.0), [batch])[0]
    diff = max((plain.grads[0][n] - g).abs().max().item() for n, g in recorder.grads[0].items())
    assert diff > 1e-4


def test_kl_without_reference_logprobs_is_a_clear_error(tokenizer, tiny_model):
    items = [replace(t, ref_logprobs=None) for t in trajectories(tokenizer.pad_token_id)]
    batch = collate_trajectories(items, tokenizer.pad_token_id)
    with pytest.raises(RuntimeError, match="algo.kl_coef > 0 but the batch holds no reference log-probs"):
        fit(make(copy.deepcopy(tiny_model), **ARGS, loss="grpo", kl_coef=0.1), [batch])


def plain_trainer():
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)


@pytest.mark.parametrize("rows_per_forward", [1, 3])
def test_recomputed_old_logprobs_are_the_policys_own_and_the_first_ratio_is_one(
    tokenizer, tiny_model, rows_per_forward
):
    pad = tokenizer.pad_token_id
    items = trajectories(pad)
    module = make(copy.deepcopy(tiny_model), **ARGS, loss="raftpp", kl_coef=0.1)
    own = []
    for t in items:  # one row at a time: no padding anywhere
        ids = torch.cat([t.prompt_ids, t.response_ids])[None]
        logp, ref = module.score(ids, torch.ones_like(ids))
        own.append((logp[0, len(t.prompt_ids) - 1 :], ref[0, len(t.prompt_ids) - 1 :]))
    # the sampler's log-probs: the policy's, but 0.25 off on every token of row 0 and 1.5 off on one of row 1
    items = [replace(t, sampler_logprobs=o.clone()) for t, (o, _) in zip(items, own)]
    items[0].sampler_logprobs[:] -= 0.25
    items[1].sampler_logprobs[0] += 1.5
    scored, gap = score_trajectories(
        plain_trainer(), module, items, rows_per_forward=rows_per_forward, pad_id=pad, replace_old=True
    )
    for t, (logp, ref) in zip(scored, own):
        torch.testing.assert_close(t.old_logprobs, logp, rtol=0, atol=1e-5)
        torch.testing.assert_close(t.ref_logprobs, ref, rtol=0, atol=1e-5)  # π0 = the policy before training
    tokens = sum(len(t.response_ids) for t in items)
    assert gap["rollout/logprob_gap_max"] == pytest.approx(1.5, abs=1e-5)
    expected = (0.25 * len(items[0].response_ids) + 1.5) / tokens
    assert gap["rollout/logprob_gap_mean"] == pytest.approx(expected, abs=1e-5)
    # the first update's importance ratio is 1 on every token, so nothing is clipped
    _, metrics = fit(module, [collate_trajectories(scored, pad)])
    assert metrics["train/ratio"] == pytest.approx(1.0, abs=1e-5) and metrics["train/clipfrac"] == 0.0
    assert metrics["train/approx_kl"] == pytest.approx(0.0, abs=1e-5)


def test_without_recompute_the_sampler_logprobs_stay_the_old_ones(tokenizer, tiny_model):
    pad = tokenizer.pad_token_id
    items = trajectories(pad)
    module = make(copy.deepcopy(tiny_model), **ARGS, loss="grpo", kl_coef=0.1)  # the pass still runs for KL
    calls = []
    forward = module._forward
    module._forward = lambda *a: calls.append(1) or forward(*a)
    scored, gap = score_trajectories(plain_trainer(), module, items, rows_per_forward=4, pad_id=pad, replace_old=False)
    module._forward = forward
    assert calls == [] and gap == {}  # only the reference ran: no policy forward, no gap to report
    assert all(torch.equal(s.old_logprobs, t.sampler_logprobs) for s, t in zip(scored, items))
    assert all(not torch.equal(s.ref_logprobs, t.ref_logprobs) for s, t in zip(scored, items))  # filled in
    _, metrics = fit(module, [collate_trajectories(scored, pad)])
    assert abs(metrics["train/ratio"] - 1.0) > 0.05  # the made-up sampler log-probs are far from the policy's


def test_auto_takes_the_sampler_logprobs_only_where_they_are_the_trainers_computation(tokenizer, tiny_model):
    from dibs.lit.scoring import sampler_logprobs_are_trainers
    from dibs.rollout.hf import HFGenerator

    module = make(copy.deepcopy(tiny_model), **ARGS, loss="grpo", kl_coef=0.0)
    gen = HFGenerator(tiny_model, tokenizer, token_budget=100, show_progress=False)
    assert sampler_logprobs_are_trainers(gen, module, plain_trainer())
    bf16 = L.Trainer(accelerator="cpu", devices=1, logger=False, precision="bf16-mixed")
    assert not sampler_logprobs_are_trainers(gen, module, bf16)  # the trainer computes under autocast
    gen.model.to(torch.bfloat16)
    assert not sampler_logprobs_are_trainers(gen, module, plain_trainer())  # the sampler in another dtype
    other = type("Engine", (), {"model": gen.model})()  # a backend that does not declare it (vLLM)
    assert not sampler_logprobs_are_trainers(other, module, plain_trainer())


def test_no_reference_is_kept_without_kl(tiny_model):
    assert make(tiny_model, loss="grpo", kl_coef=0.0).reference is None


def test_a_loss_option_the_loss_needs_must_be_given(tiny_model):
    with pytest.raises(ValueError, match="algo.loss=grpo needs algo.clip_ratio_c"):
        make(tiny_model, loss="grpo", clip_ratio_c=None)


def test_activation_checkpointing_recomputes_and_leaves_the_gradient_unchanged(tokenizer, tiny_model, monkeypatch):
    import torch.utils.checkpoint
    import transformers.modeling_utils

    calls = []

    def counted(function, *args, **kwargs):  # every checkpointed decoder-layer forward goes through here
        calls.append(1)
        return torch.utils.checkpoint.checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counted)
    batch = collate_trajectories(trajectories(tokenizer.pad_token_id), tokenizer.pad_token_id)
    plain = make(copy.deepcopy(tiny_model), **ARGS, loss="grpo")
    g_plain, m_plain = fit(plain, [batch])
    assert calls == []
    checkpointed = make(copy.deepcopy(tiny_model), **ARGS, loss="grpo", activation_checkpointing=True)
    g_ckpt, m_ckpt = fit(checkpointed, [batch])
    assert len(calls) == 2  # one update, one forward: both decoder layers checkpointed
    for name, grad in g_plain.grads[0].items():
        torch.testing.assert_close(g_ckpt.grads[0][name], grad, rtol=0, atol=1e-6)
    assert m_ckpt["train/loss"] == pytest.approx(m_plain["train/loss"], abs=1e-7)
