"""The run's inputs: the data splits and the baseline (given, cached, or trained now)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from agents.config import RunConfig
from agents.progress import bars_wanted, train_bar
from rl_mtd.checkpoints import load_baseline, save_baseline
from rl_mtd.data import Cifar, DataSplits, load_cifar10, make_splits
from rl_mtd.errors import RlMtdError, os_error_message
from rl_mtd.io import CACHE_ENV, cache_dir
from rl_mtd.models import build_vgg
from rl_mtd.train import TrainConfig, train

if TYPE_CHECKING:
    from rl_mtd.proxy import Proxy

log = logging.getLogger("rl_mtd")

BASELINE_FALLBACK = "baseline.pt"
"""Where in the run directory a trained baseline goes that the cache had no room for; kept by
--overwrite, since the run's config.json names it."""


def load_data(cfg: RunConfig) -> tuple[DataSplits, Cifar]:
    """Load the dataset and split it; size caps above what the data holds mean "all of it"."""
    data = load_cifar10(cfg.data, progress=bars_wanted(cfg.progress))
    if cfg.proxy_size >= len(data.train):
        raise RlMtdError(
            f"--proxy-size {cfg.proxy_size} leaves no training images ({len(data.train)} in "
            f"{data.source}); pass a smaller --proxy-size"
        )
    train_size = _cap("train", cfg.train_size, len(data.train) - cfg.proxy_size)
    test_size = _cap("test", cfg.test_size, len(data.test))
    splits = make_splits(
        data, proxy_size=cfg.proxy_size, seed=cfg.seed, train_size=train_size, test_size=test_size
    )
    if len(splits.test) < FEW_TEST_IMAGES:
        # One standard error of an accuracy near 80% measured on n images.
        spread = 100 * (0.8 * 0.2 / len(splits.test)) ** 0.5
        log.warning(
            "the test split has %d images: a test accuracy on it moves by about +-%.1f points "
            "from the choice of images alone (--test-size; 10000 is all of CIFAR-10's)",
            len(splits.test),
            spread,
        )
    return splits, data


FEW_TEST_IMAGES = 2000
"""Below this many test images, the run says how uncertain its test accuracy is."""


def _cap(what: str, size: int | None, available: int) -> int | None:
    if size is not None and size > available:
        log.warning(
            "only %d %s images available; using all of them (asked for %d)", available, what, size
        )
        return None
    return size


def baseline_cache_path(cfg: RunConfig, data_key: str) -> Path:
    """Where a trained baseline for these settings is cached."""
    spec = json.dumps(
        [
            cfg.net,
            cfg.width,
            data_key,
            cfg.train_size,
            cfg.proxy_size,
            cfg.seed,
            cfg.baseline_epochs,
            cfg.lr,
            cfg.batch_size,
        ],
        sort_keys=True,
    )
    digest = hashlib.sha256(spec.encode()).hexdigest()[:16]
    return cache_dir() / "baselines" / f"{cfg.net}-w{cfg.width:g}-{digest}.pt"


def baseline_state_path(cached: Path) -> Path:
    """Where the baseline to be cached at ``cached`` saves its training as it goes, so that
    after Ctrl-C the same command goes on from there."""
    return cached.with_name(cached.stem + ".train-state.pt")


def note_other_baseline_states(cfg: RunConfig, data_key: str) -> list[Path]:
    """Say where baseline trainings of this net and width under other settings left their
    state in the cache (interrupted, or still running elsewhere): this run does not go on from
    them, and nothing else removes them. A note only: an unreadable file is passed over."""
    mine = baseline_state_path(baseline_cache_path(cfg, data_key))
    noted = []
    for path in sorted(mine.parent.glob(f"{cfg.net}-w{cfg.width:g}-*.train-state.pt")):
        if path == mine:
            continue
        try:
            size = path.stat().st_size
            # str: torch<2.4 memory-maps only a path given as a string
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            done = min(1.0, state["step"] / state["total"])
            settings = ", ".join(
                f"{k} {state['config'][k]:g}" for k in ("epochs", "lr", "batch_size")
            )
        except Exception:  # gone meanwhile, unreadable, or of another format: nothing to say
            continue
        log.info(
            "note: %s holds a baseline training of %s width %g under other settings (%s; %.0f%% "
            "done, %.0f MB), interrupted or still running elsewhere; this run does not use it: "
            "the command that started it goes on from it, or delete it",
            path,
            cfg.net,
            cfg.width,
            settings,
            100 * done,
            size / 2**20,
        )
        noted.append(path)
    return noted


def get_baseline(
    cfg: RunConfig,
    splits: DataSplits,
    data_key: str,
    device: torch.device,
    given: nn.Module | None = None,
    keep_dir: Path | None = None,
) -> tuple[nn.Module, str]:
    """The baseline: ``--checkpoint`` (``given`` if it was loaded already), a cached one for
    these settings, or train one now; one trained that the cache has no room for is kept in
    ``keep_dir`` (the run directory) where given."""
    if cfg.checkpoint is not None:
        if given is None:
            given, _ = load_baseline(cfg.checkpoint, net=cfg.net, width=cfg.width)
        return given.to(device), str(cfg.checkpoint)
    kept = kept_baseline(cfg, keep_dir)
    if kept is not None:
        model, _ = load_baseline(kept, net=cfg.net, width=cfg.width)
        log.info("baseline: this run's own %s (the cache had no room for it)", kept)
        return model.to(device), str(kept)
    path = baseline_cache_path(cfg, data_key)
    if path.exists():
        try:
            model, _ = load_baseline(path, net=cfg.net, width=cfg.width)
            log.info("baseline: cached %s", path)
            return model.to(device), str(path)
        except RlMtdError as exc:
            log.warning("ignoring unusable cached baseline (%s); training a new one", exc)
    log.info(
        "baseline: training %s width %g for %g epochs on %d images",
        cfg.net,
        cfg.width,
        cfg.baseline_epochs,
        len(splits.train),
    )
    torch.manual_seed(cfg.seed)  # before building: the initial weights come from this seed
    model = build_vgg(cfg.net, width=cfg.width).to(device)
    tcfg = TrainConfig(
        epochs=cfg.baseline_epochs,
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        label_smoothing=0.1,
    )
    state_path = baseline_state_path(path)
    try:
        with train_bar("baseline", cfg.progress) as bar:
            train(
                model,
                splits.train,
                config=tcfg,
                val_split=splits.proxy,
                on_progress=bar,
                desc="baseline",
                state_path=state_path,
                state_key=path.name,
            )
    except KeyboardInterrupt:
        if state_path.exists():
            log.warning(
                "baseline training interrupted; its progress is saved (%s): the same command "
                "goes on from there",
                state_path,
            )
        raise
    meta = {"epochs": cfg.baseline_epochs, "data": data_key}
    try:
        save_baseline(path, model, net=cfg.net, width=cfg.width, meta=meta)
    except OSError as exc:
        if keep_dir is None:
            raise
        path = _keep_elsewhere(model, cfg, meta, keep_dir, exc)
    state_path.unlink(missing_ok=True)
    return model, str(path)


def kept_baseline(cfg: RunConfig, run_dir: Path | None) -> Path | None:
    """A resumed run's own baseline.pt (one the full cache could not keep), if it has one."""
    if cfg.resume is None or cfg.checkpoint is not None or run_dir is None:
        return None
    kept = run_dir / BASELINE_FALLBACK
    return kept if kept.is_file() else None


def _keep_elsewhere(
    model: nn.Module, cfg: RunConfig, meta: dict[str, Any], keep_dir: Path, exc: OSError
) -> Path:
    """Where a baseline just trained goes when the cache has no room for it (a full disk): the
    run directory, rather than losing hours of training; the run goes on with it."""
    fallback = keep_dir / BASELINE_FALLBACK
    try:
        keep_dir.mkdir(parents=True, exist_ok=True)
        save_baseline(fallback, model, net=cfg.net, width=cfg.width, meta=meta)
    except OSError as again:
        raise RlMtdError(
            f"the trained baseline could be kept neither in the cache ({os_error_message(exc)}) "
            f"nor in {fallback} ({os_error_message(again)})"
        ) from None
    log.warning(
        "the cache could not keep the trained baseline (%s); kept as %s instead, which "
        "--checkpoint %s reuses in later runs",
        os_error_message(exc, CACHE_ENV),
        fallback,
        fallback,
    )
    return fallback


_LATENCY_MODELS: dict[tuple, Any] = {}


def latency_model(cfg: RunConfig, device: torch.device | str) -> Any:
    """The run's ``rl_mtd.latency.LatencyModel`` (None without ``--target-latency``): each conv
    layer of ``--net`` at ``--width`` timed alone on ``device`` at ``--latency-batch``, measured
    on demand and kept under the cache directory per machine, device, batch and thread count.

    Timing depends on the architecture, not the weights, so the model is built from a fresh
    network: the run can check a latency target before it trains a baseline, and every proxy
    (compare.py builds several) shares one model per net, width, batch and device.
    """
    if cfg.target_latency is None:
        return None
    from rl_mtd.latency import LatencyModel, cache_path, device_context

    device = torch.device(device)
    context = device_context(device)
    key = (cfg.net, float(cfg.width), cfg.latency_batch, str(device), context)
    if key not in _LATENCY_MODELS:
        log.info(
            "timing the conv layers at batch %d on %s for --target-latency",
            cfg.latency_batch,
            context,
        )
        lm = LatencyModel(
            build_vgg(cfg.net, width=cfg.width),
            batch_size=cfg.latency_batch,
            device=device,
            path=cache_path(cfg.net, cfg.width, cfg.latency_batch, device),
            context=context,
        )
        log.info("%s", lm.describe())
        _LATENCY_MODELS[key] = lm
    return _LATENCY_MODELS[key]


def forget_latency_models() -> None:
    """Drop the latency models memoised in this process (the next run reads the cache file or
    times afresh)."""
    _LATENCY_MODELS.clear()


MEMORISED_GAP = 0.05
"""A proxy accuracy this far above the test accuracy says the baseline saw the proxy images."""


def warn_about_baseline(baseline_acc: float, proxy: Proxy, checkpoint: bool = True) -> None:
    """Warn about a baseline whose numbers would mislead: one at chance, or one that scores
    far better on the proxy split (cut from CIFAR-10's training images) than on test, as a
    checkpoint trained on all 50,000 training images does (``checkpoint``: the baseline was
    given, not trained by this run)."""
    chance = 1.0 / proxy.num_classes
    if baseline_acc < 1.5 * chance:
        log.warning(
            "the baseline is at about chance (%.2f%%; guessing gives %.0f%%): its training "
            "diverged (lower --lr) or was far too short (--baseline-epochs), or --checkpoint is "
            "not a trained model; compressing it measures nothing",
            100 * baseline_acc,
            100 * chance,
        )
    elif proxy.baseline_acc - baseline_acc > MEMORISED_GAP:
        why = (
            "it was probably trained on the proxy's %d images (they are cut from CIFAR-10's "
            "training set by --seed), so the search ranks policies on images the network "
            "memorised; use a checkpoint trained without them (rl_mtd.data.make_splits gives "
            "the same split) or let run_agent.py train one"
            if checkpoint
            else "the proxy's %d images were held out from its training, so the test split "
            "differs from the training images (another --data for test?) or --proxy-size is "
            "too small to measure; the search's ranking may not carry over to test"
        )
        log.warning(
            "the baseline scores %.2f%% on the proxy split but %.2f%% on test: " + why,
            100 * proxy.baseline_acc,
            100 * baseline_acc,
            len(proxy.proxy_split),
        )
