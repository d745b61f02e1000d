import io

import pytest
import torch

from dibs.data.prompts import PromptTemplate
from dibs.lit.datamodule import EMDataModule, Trajectory, collate_trajectories


def make_dm(task, tokenizer, **kw):
    args = dict(template=PromptTemplate(), prompts_per_iteration=10, batch_size=4, updates_per_iteration=3, seed=1)
    args.update(kw)
    return EMDataModule(task.train, task.test, tokenizer, **args)


def traj(n_prompt, n_resp, adv=1.0):
    return Trajectory(
        torch.arange(1, n_prompt + 1),
        torch.arange(10, 10 + n_resp),
        -torch.arange(1, n_resp + 1, dtype=torch.float32),
        adv,
        adv,
    )


def test_collate_aligns_response_targets_and_old_logprobs():
    batch = collate_trajectories([traj(2, 3), traj(3, 1, adv=0.0)], pad_id=0)
    # row 0: ids [1, 2, 10, 11, 12]; targets are ids[1:], response targets at columns 1..3
    assert batch["input_ids"].tolist() == [[1, 2, 10, 11, 12], [1, 2, 3, 10, 0]]
    assert batch["response_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 1, 0]]
    assert batch["old_logprobs"].tolist() == [[0, -1, -2, -3], [0, 0, -1, 0]]
    assert batch["advantages"].tolist() == [1.0, 0.0] and batch["skip"] is False


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
    assert len(batches) == 3 and all(len(b["advantages"]) == 4 for b in batches)


def test_overlong_prompts_are_dropped_and_reported(task, tokenizer):
    dm = make_dm(task, tokenizer, max_prompt_tokens=40)
    assert dm.dropped and all("max_prompt_tokens=40" in m for m in dm.dropped)
    assert len(dm.train_problems) + len(dm.test_problems) + len(dm.dropped) == len(task.train) + len(task.test)


def test_state_round_trips_through_a_weights_only_checkpoint(task, tokenizer):
    dm = make_dm(task, tokenizer)
    dm.set_trajectories(4, [traj(2, 3), traj(3, 1, 0.0)], skip_updates=True)
    buffer = io.BytesIO()
    torch.save(dm.state_dict(), buffer)
    buffer.seek(0)
    restored = make_dm(task, tokenizer)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.iteration == 4 and restored.skip_updates
    assert [t.advantage for t in restored.trajectories] == [1.0, 0.0]
    assert torch.equal(restored.trajectories[0].response_ids, dm.trajectories[0].response_ids)


def test_empty_rollout_is_an_error_naming_the_iteration(task, tokenizer):
    with pytest.raises(ValueError, match="iteration 2: no trajectory"):
        make_dm(task, tokenizer).set_trajectories(2, [], skip_updates=False)
