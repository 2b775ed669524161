"""rl_mtd: compress CNNs with per-layer tensor decompositions chosen by a learning agent.

The library layer: models, data, decompositions, policies, the proxy, training and metrics.
It imports neither gymnasium nor stable-baselines3.
"""

from rl_mtd.errors import RlMtdError

__all__ = ["RlMtdError"]
__version__ = "0.1.0"
