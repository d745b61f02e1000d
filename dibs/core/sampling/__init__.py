"""Sampling strategies: how an E-step spreads its samples over the iteration's prompts, round by round."""

from dibs.core.sampling.adaptive import ReinforceAda
from dibs.core.sampling.base import (
    GradSettings,
    Request,
    RoundTally,
    Strategy,
    StrategyBase,
    fit_to_budget,
    keep_all,
)
from dibs.core.sampling.filtering import DynamicSampling, PilotCommit
from dibs.core.sampling.gvm import GVM
from dibs.core.sampling.knapsack import Knapsack
from dibs.core.sampling.skipping import Greso
from dibs.core.sampling.uniform import Uniform, UntilSolved

__all__ = [
    "GVM",
    "DynamicSampling",
    "GradSettings",
    "Greso",
    "Knapsack",
    "PilotCommit",
    "ReinforceAda",
    "Request",
    "RoundTally",
    "Strategy",
    "StrategyBase",
    "Uniform",
    "UntilSolved",
    "fit_to_budget",
    "keep_all",
]
