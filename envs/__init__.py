"""Gymnasium side: the mixed-decomposition environment and its registration."""

import gymnasium as gym

from envs.mixed_decomposition import EnvConfig, MixedDecompositionEnv
from rl_mtd.budget import DEFAULT_LEVELS

ENV_ID = "rl_mtd/MixedDecomposition-v0"

if ENV_ID not in gym.registry:
    gym.register(id=ENV_ID, entry_point="envs.mixed_decomposition:MixedDecompositionEnv")

__all__ = ["DEFAULT_LEVELS", "ENV_ID", "EnvConfig", "MixedDecompositionEnv"]
