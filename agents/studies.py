"""The sensitivity study as the search uses it: measured with its own proxy settings, cached on
disk per baseline, data and grid (``cached_study``), and turned into observation features
(``layer_scores``). ``agents.warmstart`` starts the search from the heuristic built on it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from rl_mtd.baselines import SENSITIVITY_LEVELS, SensitivityStudy
from rl_mtd.decompose import DECOMPOSED
from rl_mtd.io import cache_dir, write_json_atomic
from rl_mtd.proxy import Proxy

log = logging.getLogger("rl_mtd")


STUDY_SAVE_EVERY_S = 30.0
"""How often a running study is written to its cache file (it takes minutes on a CPU)."""

STUDY_KEY_VERSION = 3
"""Bump when a default of ``ProxyConfig`` (or its repair) changes what a study measures: keys
list only the settings that differ from the defaults; or when ``rank_for_ratio`` changes the
rank of a (method, level) entry (3: Tucker-2 on a layer with few input channels)."""


def _settings(config: Any) -> str:
    """A dataclass's settings for a cache key: the fields that differ from their defaults
    (nested dataclasses alike), so adding a field with a default keeps existing keys."""
    default = type(config)()
    out = {}
    for f in fields(config):
        value, base = getattr(config, f.name), getattr(default, f.name)
        if is_dataclass(value):
            value = _settings(value)
            if value == _settings(base):
                continue
        elif value == base:
            continue
        out[f.name] = value
    return repr(sorted(out.items()))


def study_proxy(proxy: Proxy, steps: int | None = None) -> Proxy:
    """What the sensitivity study scores with: a sibling of ``proxy`` (the same baseline, data,
    factor cache, fitted input moments and baseline accuracy) with ``steps`` repair steps per
    entry (None: ``proxy``'s own), its memo and evaluation count its own, so the study's
    evaluations are never counted as the search's."""
    sibling = copy.copy(proxy)
    if steps is not None:
        sibling.config = replace(proxy.config, repair_steps=steps)
    sibling._memo = {}
    sibling.evaluations = 0
    return sibling


def study_settings(proxy: Proxy) -> str:
    """What, besides the baseline, decides a study's numbers: the proxy's settings that differ
    from the defaults, and its split sizes (recorded in agent.zip for replays)."""
    return (
        f"{_settings(proxy.config)}, {len(proxy.train_split)} train and "
        f"{len(proxy.proxy_split)} proxy images"
    )


def layer_scores(
    observe: str, proxy: Proxy, study_steps: int | None = None, trained_on: Any = None
) -> np.ndarray | None:
    """The per-layer features ``--observe`` adds to the observation (None for ``layer``), from
    the study with ``study_steps`` repair steps per entry (None: the proxy's own).
    ``trained_on``: the ``study_settings`` an agent was trained with (a replay warns when this
    study is measured otherwise, so its observations differ)."""
    if observe != "study":
        return None
    sibling = study_proxy(proxy, study_steps)
    if trained_on is not None and trained_on != study_settings(sibling):
        log.warning(
            "the agent was trained on a sensitivity study measured with %s; this run measures "
            "it with %s, so the agent sees other observations than it learned from (replay "
            "with the same --seed, --preset and proxy flags for the same study)",
            trained_on,
            study_settings(sibling),
        )
    return cached_study(sibling).scores(proxy.baseline_acc)


def study_path(proxy: Proxy, study: SensitivityStudy) -> Path:
    """Where ``cached_study`` keeps the study: keyed by the baseline's kernels and the rest of
    its weights (BatchNorm, head: two checkpoints alike but for those shared a study), the
    proxy's settings, the proxy split's images and labels (so one checkpoint scored on another
    dataset, or another draw of the split, gets its own study), the split sizes, and the study's
    methods and levels."""
    images = hashlib.sha256(proxy.proxy_split.x.cpu().contiguous().numpy().tobytes())
    images.update(proxy.proxy_split.y.cpu().contiguous().numpy().tobytes())
    weights = hashlib.sha256()
    for name, tensor in proxy.model.state_dict().items():
        weights.update(name.encode())
        weights.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    key = hashlib.sha256(
        json.dumps(
            [
                STUDY_KEY_VERSION,
                proxy.wkeys,
                _settings(proxy.config),
                len(proxy.train_split),
                len(proxy.proxy_split),
                images.hexdigest()[:16],
                weights.hexdigest()[:16],
                study.methods,
                study.levels,
            ]
        ).encode()
    ).hexdigest()[:16]
    return cache_dir() / "studies" / f"{key}.json"


def cached_study(
    proxy: Proxy,
    on_progress: Callable[[int, int], None] | None = None,
    *,
    methods: Sequence[str] = DECOMPOSED,
    levels: Sequence[float] = SENSITIVITY_LEVELS,
) -> SensitivityStudy:
    """A sensitivity study whose results are kept on disk per baseline, proxy settings, methods
    and levels (default: the heuristic's own grid).

    ``study.seconds`` is what measuring it cost, also when it came from the cache, so a search
    that reuses it is still charged for it. ``on_progress(done, total)`` follows the entries
    measured (a progress bar: ``agents.progress.count_bar``).
    """
    study = SensitivityStudy(proxy, methods=methods, levels=levels)
    study.seconds = 0.0
    path = study_path(proxy, study)
    if path.exists():
        try:
            saved = json.loads(path.read_text())
            study.results = {(int(i), m, float(lv)): float(a) for i, m, lv, a in saved["rows"]}
            study.seconds = float(saved["seconds"])
            done, keys = len(study.results), len(study.keys())
            if done < keys:
                log.info(
                    "sensitivity study: %d of %d measured in %s; the rest now", done, keys, path
                )
            else:
                log.info("sensitivity study: cached %s", path)
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("ignoring unusable cached study %s (%s)", path, exc)
    t0 = time.perf_counter()
    seconds_before, last_save = study.seconds, [t0]

    total = len(study.keys())

    def save(every: float = STUDY_SAVE_EVERY_S) -> None:
        if on_progress is not None:
            on_progress(len(study.results), total)
        now = time.perf_counter()
        if now - last_save[0] < every:
            return
        last_save[0] = now
        study.seconds = seconds_before + now - t0
        rows = [[i, m, lv, a] for (i, m, lv), a in study.results.items()]
        try:
            write_json_atomic(path, {"rows": rows, "seconds": study.seconds})
        except OSError as exc:  # a full or read-only cache costs only time
            log.warning("could not cache the sensitivity study at %s (%s)", path, exc)

    measured_before = len(study.results)
    try:
        study.run(on_result=save)  # partial studies are saved too: Ctrl-C keeps what was measured
    except KeyboardInterrupt:
        if len(study.results) > measured_before:
            save(every=0.0)  # up to the last layer measured, not the last timed save
        raise
    if len(study.results) > measured_before or not path.exists():
        save(every=0.0)
    return study
