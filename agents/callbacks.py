"""Search-time callbacks: per-episode TensorBoard logging and keeping the best policy on disk."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stable_baselines3.common.callbacks import BaseCallback

from rl_mtd.io import write_json_atomic


class SearchCallback(BaseCallback):
    """Logs every finished episode and writes ``policy.json`` the moment a new best appears.

    Keys: ``search/reward``, ``search/best_reward``, ``search/compression_ratio``,
    ``search/best_ratio``, ``search/macs_ratio``, ``search/episodes_per_minute``,
    ``search/wall_fraction``, ``proxy/accuracy``, ``proxy/best_accuracy``, ``proxy/seconds``,
    ``methods/<name>`` (layers per method in the episode). Hyperparameters go once to
    TensorBoard as a text table under ``hparams``.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        hparams: dict[str, Any] | None = None,
        state: dict[str, Any] | None = None,
        max_episodes: int | None = None,
        on_episode: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
        save: Callable[[], None] | None = None,
        save_every: int = 5,
    ):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.hparams = hparams or {}
        self.max_episodes = max_episodes
        self.on_episode = on_episode
        """Called with (episode entry, best entry) after every episode (the CLI's progress)."""
        self.save = save
        """Called every ``save_every`` episodes and at every new best (crash safety)."""
        self.save_every = save_every
        state = state or {}
        self.episodes: list[dict[str, Any]] = list(state.get("episodes", []))
        self.best: dict[str, Any] | None = state.get("best")
        self._walls: Counter[int] = Counter()
        self._steps: Counter[int] = Counter()
        self._t0 = time.perf_counter()
        self._n0 = len(self.episodes)

    def _on_training_start(self) -> None:
        if self.hparams:
            rows = "\n".join(f"|{k}|{v}|" for k, v in sorted(self.hparams.items()))
            self.logger.record(
                "hparams",
                f"|setting|value|\n|-|-|\n{rows}",
                exclude=("stdout", "log", "json", "csv"),
            )

    def _on_step(self) -> bool:
        for env_i, (info, done) in enumerate(zip(self.locals["infos"], self.locals["dones"])):
            self._steps[env_i] += 1
            self._walls[env_i] += int(info.get("wall", False))
            if done and "proxy" in info:
                self._episode_done(info, self._walls[env_i] / max(1, self._steps[env_i]))
                self._walls[env_i] = self._steps[env_i] = 0
        return self.max_episodes is None or len(self.episodes) < self.max_episodes

    def _episode_done(self, info: dict[str, Any], wall_fraction: float) -> None:
        proxy, reward = info["proxy"], float(info["reward"])
        entry = {
            "episode": len(self.episodes) + 1,
            "timestep": int(self.num_timesteps),
            "reward": reward,
            "accuracy": proxy["accuracy"],
            "ratio": proxy["compression_ratio"],
            "macs_ratio": proxy["macs_ratio"],
            "seconds": proxy["seconds"],
            "cached": proxy["cached"],
            "wall_fraction": wall_fraction,
            "methods": [layer["method"] for layer in info["policy"]["layers"]],
            # The whole choice, so any episode's policy can be rebuilt and studied afterwards.
            "ranks": [layer["rank"] for layer in info["policy"]["layers"]],
        }
        if "predicted_speedup" in info:
            entry["predicted_speedup"] = info["predicted_speedup"]
        self.episodes.append(entry)
        new_best = self.best is None or reward > self.best["reward"]
        if new_best:
            # Where it came from travels with it (the final check names its candidates by it).
            policy = {
                **info["policy"],
                "meta": {
                    "strategy": "ppo",
                    **info["policy"].get("meta", {}),
                    "reward": reward,
                    "proxy": proxy,
                    "episode": entry["episode"],
                },
            }
            self.best = {**entry, "policy": policy, "proxy": proxy}
            write_json_atomic(self.run_dir / "policy.json", policy)
        minutes = max(1e-9, (time.perf_counter() - self._t0) / 60)
        rec = self.logger.record
        rec("search/reward", reward)
        rec("search/best_reward", self.best["reward"])
        rec("search/compression_ratio", entry["ratio"])
        rec("search/best_ratio", self.best["ratio"])
        rec("search/macs_ratio", entry["macs_ratio"])
        if "predicted_speedup" in entry:
            rec("search/predicted_speedup", entry["predicted_speedup"])
        rec("search/wall_fraction", wall_fraction)
        rec("search/episodes_per_minute", (len(self.episodes) - self._n0) / minutes)
        rec("proxy/accuracy", entry["accuracy"])
        rec("proxy/best_accuracy", self.best["accuracy"])
        rec("proxy/seconds", entry["seconds"])
        for method, n in Counter(entry["methods"]).items():
            rec(f"methods/{method}", n)
        self.logger.dump(self.num_timesteps)
        with open(self.run_dir / "episodes.jsonl", "a") as fh:
            fh.write(json.dumps(entry) + "\n")
        if self.save is not None and (new_best or len(self.episodes) % self.save_every == 0):
            self.save()
        if self.on_episode is not None:
            self.on_episode(entry, self.best)

    def state(self) -> dict[str, Any]:
        """What ``--resume`` needs to continue: every episode so far and the best."""
        return {"episodes": self.episodes, "best": self.best}
