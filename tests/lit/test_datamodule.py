import io

import pytest
import torch

from dibs.data.prompts import PromptTemplate
from dibs.estep.samples import Trajectory
from dibs.lit.datamodule import EMDataModule, collate_trajectories


def make_dm(task, tokenizer, **kw):
    args = dict(
        template=PromptTemplate(None, "", ""), prompts_per_iteration=10, batch_size=4, updates_per_iteration=3, seed=1
    )
    args.update(pool_sampling="random", update_accounting="fixed", rows_per_prompt=1, max_prompt_tokens=512)
    args.update(samples_per_update=64)
    args.update(kw)
    return EMDataModule(task.train, tokenizer, **args)


def traj(n_prompt, n_resp, adv=1.0, group=0, ref=False):
    logprobs = -torch.arange(1, n_resp + 1, dtype=torch.float32)
    return Trajectory(
        torch.arange(1, n_prompt + 1),
        torch.arange(10, 10 + n_resp),
        logprobs,
        adv,
        adv,
        group,
        logprobs - 0.5,
        logprobs * 10 if ref else None,
    )


def test_collate_aligns_response_targets_and_old_logprobs():
    batch = collate_trajectories([traj(2, 3, group=7), traj(3, 1, adv=0.0, group=2)], pad_id=0)
    # row 0: ids [1, 2, 10, 11, 12]; targets are ids[1:], response targets at columns 1..3
    assert batch["input_ids"].tolist() == [[1, 2, 10, 11, 12], [1, 2, 3, 10, 0]]
    assert batch["response_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 1, 0]]
    assert batch["old_logprobs"].tolist() == [[0, -1, -2, -3], [0, 0, -1, 0]]
    assert batch["advantages"].tolist() == [1.0, 0.0] and batch["skip"] is False
    assert batch["group"].tolist() == [7, 2] and batch["row_mask"].tolist() == [1.0, 1.0]
    assert "ref_logprobs" not in batch  # no reference log-probs: no KL


def test_collate_places_reference_logprobs_like_the_old_ones():
    batch = collate_trajectories([traj(2, 3, ref=True), traj(3, 1, ref=True)], pad_id=0)
    assert batch["ref_logprobs"].tolist() == [[0, -10, -20, -30], [0, 0, -10, 0]]


def test_collate_of_nothing_is_one_placeholder_row_of_weight_zero():
    # a rank without a sample for this update still runs its forward and backward: pad ids, masks 0
    batch = collate_trajectories([], pad_id=5)
    assert batch["input_ids"].tolist() == [[5, 5]] and batch["attention_mask"].tolist() == [[1, 1]]
    assert batch["response_mask"].tolist() == [[0.0]] and batch["row_mask"].tolist() == [0.0]
    assert batch["ref_logprobs"].tolist() == [[0.0]]  # present, so a KL run's placeholder passes through too


def test_prompt_draw_is_shared_by_ranks_and_changes_per_iteration(task, tokenizer):
    dm = make_dm(task, tokenizer)
    whole = dm.iteration_prompts(0)
    shards = [dm.iteration_prompts(0, rank, 2) for rank in range(2)]
    assert sorted(shards[0] + shards[1]) == sorted(whole) and not set(shards[0]) & set(shards[1])
    assert dm.iteration_prompts(0) == whole  # deterministic
    assert dm.iteration_prompts(1) != whole  # re-sampled every iteration
    assert len(set(whole)) == 10


@pytest.mark.parametrize("num_trajectories", [1, 5, 40])
def test_loader_yields_a_fixed_number_of_updates_whatever_the_sample_count(task, tokenizer, num_trajectories):
    dm = make_dm(task, tokenizer)
    dm.set_trajectories(0, [traj(3, 2) for _ in range(num_trajectories)], skip_updates=False)
    batches = list(dm.train_dataloader())
    assert len(batches) == 3 and all(b["row_mask"].tolist() == [1.0] * 4 for b in batches)


def test_a_rank_without_training_samples_yields_placeholder_updates(task, tokenizer):
    dm = make_dm(task, tokenizer)
    dm.set_trajectories(2, [], skip_updates=False)  # e.g. RAFT with none of this rank's samples accepted
    batches = list(dm.train_dataloader())
    assert len(batches) == 3 and all(b["row_mask"].tolist() == [0.0] for b in batches)


def test_reference_accounting_is_one_pass_in_mini_batches_of_prompts_times_rows(task, tokenizer):
    # batch_size 2 prompts x rows_per_prompt 2 = 4 sequences per update: 10 samples → ceil(10 / 4) = 3 updates
    dm = make_dm(task, tokenizer, update_accounting="reference", batch_size=2, rows_per_prompt=2)
    dm.set_trajectories(0, [traj(3, 2, adv=float(k)) for k in range(10)], skip_updates=False)
    batches = list(dm.train_dataloader())
    assert dm.updates == 3 and [len(b["advantages"]) for b in batches] == [4, 3, 3]
    seen = sorted(a for b in batches for a in b["advantages"].tolist())
    assert seen == [float(k) for k in range(10)]  # every sample exactly once


def test_reference_accounting_over_ranks_runs_the_global_count_on_every_rank(task, tokenizer):
    # 2 ranks holding 25 samples in all: ceil(25 / (4 x 2)) = 4 updates on each rank; this rank's 2 samples
    # fill the first two, the last two are placeholders
    dm = make_dm(task, tokenizer, update_accounting="reference", batch_size=2, rows_per_prompt=2)
    dm.set_trajectories(0, [traj(3, 2), traj(3, 2)], skip_updates=False, total_samples=25, world_size=2)
    batches = list(dm.train_dataloader())
    assert dm.updates == 4 and [b["row_mask"].tolist() for b in batches] == [[1.0], [1.0], [0.0], [0.0]]


def test_per_sample_accounting_makes_one_update_per_k_generated_samples_over_the_run(task, tokenizer):
    # K = 10: iterations generating 25, 3, 40 and 2 samples (cumulative 25, 28, 68, 70) make 2, 0, 4 and 1
    # updates: floor(C_k / K) - floor(C_(k-1) / K), 7 = floor(70 / 10) in all, whatever each iteration drew
    dm = make_dm(task, tokenizer, update_accounting="per_sample", samples_per_update=10)
    made, total = [], 0
    for k, drawn in enumerate([25, 3, 40, 2]):
        dm.set_trajectories(k, [traj(3, 2) for _ in range(5)], skip_updates=False, generated=(total, total + drawn))
        total += drawn
        batches = list(dm.train_dataloader())
        made.append(0 if batches[0]["idle"] else len(batches))
        assert all(b["skip"] for b in batches) if made[-1] == 0 else not any(b["idle"] for b in batches)
    assert made == [2, 0, 4, 1] and sum(made) == 70 // 10  # the idle iteration yields one placeholder, no update


def test_per_sample_accounting_needs_a_positive_k(task, tokenizer):
    with pytest.raises(ValueError, match="samples_per_update=0 must be >= 1"):
        make_dm(task, tokenizer, update_accounting="per_sample", samples_per_update=0)


def test_unknown_update_accounting_is_an_error_naming_the_key(task, tokenizer):
    with pytest.raises(ValueError, match="update_accounting='verl' is not one of"):
        make_dm(task, tokenizer, update_accounting="verl")


def test_overlong_prompts_are_dropped_and_reported(task, tokenizer):
    dm = make_dm(task, tokenizer, max_prompt_tokens=40)
    assert dm.dropped and all("max_prompt_tokens=40" in m for m in dm.dropped)
    assert len(dm.train_problems) + len(dm.dropped) == len(task.train)


def test_state_round_trips_through_a_weights_only_checkpoint(task, tokenizer):
    dm = make_dm(task, tokenizer, update_accounting="reference")
    dm.set_trajectories(4, [traj(2, 3, ref=True), traj(3, 1, 0.0)], skip_updates=True)
    buffer = io.BytesIO()
    torch.save(dm.state_dict(), buffer)
    buffer.seek(0)
    restored = make_dm(task, tokenizer, update_accounting="reference")
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.iteration == 4 and restored.skip_updates and restored.updates == 1  # ceil(2 / 4)
    assert [t.advantage for t in restored.trajectories] == [1.0, 0.0]
    assert [t.group for t in restored.trajectories] == [0, 0]
    for name in ("response_ids", "old_logprobs", "sampler_logprobs", "ref_logprobs"):
        assert torch.equal(getattr(restored.trajectories[0], name), getattr(dm.trajectories[0], name))
    assert restored.trajectories[1].ref_logprobs is None


def test_loader_before_any_e_step_is_an_error(task, tokenizer):
    with pytest.raises(RuntimeError, match="before an E-step"):
        make_dm(task, tokenizer).train_dataloader()
