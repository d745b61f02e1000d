"""The names of the scalars other modules read back (the grid report, the resume checks, the README's numbers):
held-out accuracy, cumulative costs and the allocation diagnostics, each named once here with what it means."""

from __future__ import annotations

__all__ = ["ALLOC_TAGS", "SAMPLING_TAGS", "COST", "COST_UNITS", "ITERATION", "ITERATION_TAGS", "VAL_ACC", "VAL_LEVEL"]

VAL_ACC = "val/acc"  # held-out Average@k (the mean over the benchmarks when several are evaluated)
VAL_LEVEL = "val/acc_level_"  # + a difficulty level: Average@k of the first benchmark's problems of that level
COST = "cost/"  # + a unit: cumulative cost at an evaluation, logged at the same step as val/acc
COST_UNITS = ("samples", "tokens", "updates", "wall_s")  # generated samples (pilots included), response tokens,
# optimiser updates, seconds of E-steps and M-steps
ITERATION = "iteration"  # the iteration (from 1) an E-step's scalars belong to
ITERATION_TAGS = ("rollout/accept_rate", "rollout/samples", "pilot/samples_cum")  # per E-step, read by reports
# Logged by an E-step whose strategy allocated samples from estimates (GVM): name -> what it is.
ALLOC_TAGS = {
    "alloc/zero_frac": "the fraction of an iteration's prompts that the allocation gives no sample",
    "alloc/gini": "the Gini coefficient of the per-prompt sample counts (0 = uniform, towards 1 = concentrated on "
    "few prompts)",
    "alloc/variance_vs_uniform": "the variance-bound objective of the chosen allocation divided by that of the "
    "uniform allocation at the same budget, both with the p_i and G_i the allocation used (< 1: the allocation "
    "expects a less noisy gradient than uniform)",
    "alloc/max_n": "the most samples one prompt got",
    "alloc/pilot_unsolved_frac": "the fraction of an iteration's prompts whose estimated acceptance rate is 0",
    "alloc/predicted_accept": "the acceptance rate of the allocated round's samples that the per-prompt estimates "
    "predict",
    "alloc/realised_accept": "the acceptance rate those samples actually had",
}
# Logged by every E-step, whatever its strategy: how the iteration's samples were spread over its prompts.
SAMPLING_TAGS = {
    "sampling/zero_sample_frac": "the fraction of an iteration's prompts that got no sample at all (skipped, never "
    "reached, or allocated none)",
    "sampling/samples_per_prompt": "the samples generated per prompt of the iteration, every round and pilot included",
    "sampling/max_per_prompt": "the most samples one prompt got",
    "rollout/equal_reward_frac": "the fraction of the training samples whose prompt's samples all got one reward "
    "(GRPO's advantage is 0 there)",
}
