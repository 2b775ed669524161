"""PPO construction with defaults that suit short, terminal-reward episodes, and agent files."""

from __future__ import annotations

import json
import logging
import math
import os
import zipfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import VecEnv

from rl_mtd.decompose import RANK_RULE
from rl_mtd.errors import RlMtdError
from rl_mtd.io import atomic_path
from rl_mtd.settle import check_settle_first, check_settle_points

log = logging.getLogger("rl_mtd")

AGENT_META = "rl_mtd.json"  # extra member of agent.zip; SB3 ignores non-.pth extras


@dataclass
class PPOConfig:
    """PPO hyperparameters. Rollouts are whole episodes: ``n_steps = episodes_per_rollout * L``."""

    episodes_per_rollout: int = 4
    """Episodes per environment per rollout."""
    n_epochs: int = 10
    batch_episodes: int = 2
    """Minibatch size in episodes."""
    learning_rate: float = 3e-3
    """10x SB3's default: searches last only 100-600 episodes, and at 3e-4 the policy barely
    leaves uniform in that time (benchmarks/ppo_surrogate.py, BENCHMARKS.md)."""
    gamma: float = 0.99
    """Near 1: the only reward arrives at the end of the episode."""
    gae_lambda: float = 0.95
    ent_coef: float = 0.01
    clip_range: float = 0.2
    net_arch: list[int] = field(default_factory=lambda: [64, 64])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_ppo(
    env: VecEnv,
    episode_length: int,
    *,
    config: PPOConfig | None = None,
    seed: int = 0,
    tensorboard_log: str | None = None,
    device: str = "cpu",
) -> PPO:
    """A PPO agent whose rollouts hold whole episodes of ``env``."""
    cfg = config or PPOConfig()
    n_steps = max(2, cfg.episodes_per_rollout * episode_length)
    batch = max(2, cfg.batch_episodes * episode_length)
    total = n_steps * env.num_envs
    while total % batch:  # SB3 warns on a truncated last minibatch
        batch -= 1
    return PPO(
        "MlpPolicy",
        env,
        n_steps=n_steps,
        batch_size=batch,
        n_epochs=cfg.n_epochs,
        learning_rate=cfg.learning_rate,
        gamma=cfg.gamma,
        gae_lambda=cfg.gae_lambda,
        ent_coef=cfg.ent_coef,
        clip_range=cfg.clip_range,
        policy_kwargs={"net_arch": list(cfg.net_arch)},
        seed=seed,
        tensorboard_log=tensorboard_log,
        device=device,
        verbose=0,
    )


def timestep_episodes(timesteps: int, n_layers: int, n_envs: int = 1) -> int:
    """Episodes a ``--timesteps`` search runs: ``make_ppo``'s agent collects whole rollouts of
    ``episodes_per_rollout`` episodes per environment and stops only after the one that reaches
    ``timesteps`` (``--timesteps 12`` on an 8-layer net runs 4 episodes, not 2)."""
    per_rollout = PPOConfig().episodes_per_rollout * n_envs
    return math.ceil(timesteps / (per_rollout * n_layers)) * per_rollout


def save_agent(model: PPO, path: str | os.PathLike, meta: dict[str, Any]) -> None:
    """Save the SB3 model plus what replay needs to check it fits (net, width, methods, levels)."""
    with atomic_path(path) as tmp:
        model.save(tmp)
        with zipfile.ZipFile(tmp, "a") as zf:
            zf.writestr(AGENT_META, json.dumps(meta, indent=2))


def read_agent_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The rl_mtd metadata inside an agent.zip, with a clear error for foreign or broken files."""
    path = Path(path)
    if not path.is_file():
        raise RlMtdError(f"agent file {path} does not exist")
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if AGENT_META not in names and "data" not in names:
                raise RlMtdError(
                    f"agent file {path} is damaged (it may be truncated) or not a "
                    "stable-baselines3 agent; replay the agent.zip of a run_agent.py run"
                )
            if AGENT_META not in names:
                raise RlMtdError(
                    f"{path} is not an rl_mtd agent (no {AGENT_META} inside); replay the "
                    "agent.zip of a run_agent.py run"
                )
            meta = json.loads(zf.read(AGENT_META))
            bad = zf.testzip()  # every member's checksum: a few ms, and no surprise later
            if bad is not None:
                raise zipfile.BadZipFile(f"{bad} inside fails its checksum")
    except (zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError, zlib.error) as exc:
        raise RlMtdError(f"agent file {path} is damaged ({exc}); it may be truncated") from None
    for key in ("net", "width", "methods", "levels"):
        if key not in meta:
            raise RlMtdError(f"agent file {path}: its metadata lacks {key!r}")
    if meta.get("observe", "layer") not in ("layer", "study"):
        raise RlMtdError(
            f"agent file {path}: its metadata names an unknown observation {meta['observe']!r} "
            "(layer or study); it was edited or written by another version, so re-run the search"
        )
    steps = meta.get("study_repair_steps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise RlMtdError(
            f"agent file {path}: its metadata's study_repair_steps {steps!r} is not a count of "
            "steps; it was edited or written by another version, so re-run the search"
        )
    if meta.get("rank_rule", 1) != RANK_RULE:
        log.warning(
            "agent file %s was trained when some of its actions meant other ranks (Tucker-2 on "
            "layers with few input channels, such as the first conv); there its choices now "
            "compress otherwise: search again for an agent of this version",
            path,
        )
    check_settle_first(
        meta.get("settle_first", []), f"agent file {path}: its metadata's settle_first"
    )
    check_settle_points(
        meta.get("settle_points") or (),
        f"agent file {path}: its metadata's settle_points",
    )
    if not isinstance(meta.get("study_settings", ""), str):
        raise RlMtdError(
            f"agent file {path}: its metadata's study_settings is not text; it was edited or "
            "written by another version, so re-run the search"
        )
    return meta


def load_agent(path: str | os.PathLike, device: str = "cpu") -> PPO:
    read_agent_meta(path)
    try:
        return PPO.load(path, device=device)
    except Exception as exc:  # SB3 raises many types for a broken zip
        # The first sentence only: torch's unpickling errors go on to suggest turning its
        # safety check off, which is no advice for a damaged file.
        first = str(exc).strip().split("\n")[0].split(". ")[0][:160]
        raise RlMtdError(
            f"agent file {path} is damaged or was not written by run_agent.py "
            f"({type(exc).__name__}: {first}); replay the agent.zip of a run_agent.py run, or "
            "its policy.json"
        ) from None
