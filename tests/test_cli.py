"""End-to-end tests of the command line: a smoke run, replays, and clear errors for bad input."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from agents.cli import main
from agents.config import RunConfig
from agents.presets import PRESETS
from agents.replay import HOW_MADE
from rl_mtd.checkpoints import save_baseline
from rl_mtd.data import MEAN, load_cifar10, make_splits
from rl_mtd.decompose import METHODS
from rl_mtd.errors import RlMtdError
from rl_mtd.evaluation import evaluate
from rl_mtd.io import CACHE_ENV, DATA_ENV
from rl_mtd.metrics import count_params
from rl_mtd.models import build_vgg
from rl_mtd.policy import Policy, load_compressed
from rl_mtd.train import train

NET, WIDTH = "vgg11", 0.125
TARGET = 8.0
# Every run shares these, so one cached baseline (keyed by these settings) serves them all.
COMMON = [
    "--net",
    NET,
    "--width",
    str(WIDTH),
    "--preset",
    "smoke",
    "--no-progress",
    "--quiet",
    "--data",
    "synthetic:600,200",
    "--proxy-size",
    "200",
    "--train-size",
    "400",
    "--test-size",
    "200",
    "--baseline-epochs",
    "1",
    "--finetune-epochs",
    "0.2",
    "--seed",
    "0",
]
# Strong levels keep CP-ALS cheap on a CPU.
SEARCH = ["--episodes", "3", "--levels", "16,32,64,128", "--target-ratio", str(TARGET)]

RUN_FILES = (
    "config.json",
    "policy.json",
    "agent.zip",
    "compressed.pt",
    "report.json",
    "report.md",
    "reward_curve.png",
    "layers.png",
)
REPORT_FIELDS = (
    "net",
    "width",
    "dataset",
    "device",
    "seed",
    "target_ratio",
    "baseline_acc",
    "proxy_acc",
    "finetuned_acc",
    "accuracy_drop",
    "params_original",
    "params_compressed",
    "compression_ratio",
    "macs_original",
    "macs_compressed",
    "search_seconds",
    "finetune_seconds",
    "layers",
)
LAYER_FIELDS = ("name", "method", "rank", "params", "macs")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("short_cp_fits")  # they check the command line


@pytest.fixture(scope="session")
def cli_cache(tmp_path_factory) -> Path:
    """One cache directory for every CLI test, so the baseline is trained once."""
    return tmp_path_factory.mktemp("rl_mtd_cache")


@pytest.fixture(autouse=True)
def _isolated_cache(cli_cache, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(cli_cache))
    monkeypatch.delenv(DATA_ENV, raising=False)


@pytest.fixture(scope="session")
def smoke_run(cli_cache, tmp_path_factory) -> Path:
    """One full smoke run (search, fine-tune, report) shared by the tests that read its output."""
    out = tmp_path_factory.mktemp("runs") / "smoke"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(cli_cache))
        mp.delenv(DATA_ENV, raising=False)
        rc = main([*COMMON, *SEARCH, "--out", str(out)])
    assert rc == 0, f"smoke run failed with exit code {rc}"
    return out


def read_json(path: Path):
    return json.loads(path.read_text())


def fail(argv, capsys, *phrases, code=2) -> str:
    """Run main(argv), expect a clean failure; returns stderr."""
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == code, (rc, captured.err)
    assert "error:" in captured.err
    for phrase in phrases:
        assert phrase in captured.err, (phrase, captured.err)
    assert "Traceback" not in captured.out + captured.err
    return captured.err


def layer_choices(layers):
    return [(layer["name"], layer["method"], layer["rank"]) for layer in layers]


# ----------------------------------------------------------------------------- the smoke run


@pytest.mark.parametrize(
    "bn, steps, label",
    [
        (50, 40, "proxy split after BN re-estimate and 40 repair steps |"),
        (50, 0, "proxy split after BN re-estimate |"),
        (0, 0, "proxy split, as decomposed |"),
    ],
)
def test_report_md_says_what_the_proxy_did_before_scoring(bn, steps, label, smoke_run, tmp_path):
    from agents.report import write_markdown

    report = read_json(smoke_run / "report.json")
    report.update(proxy_bn_batches=bn, proxy_repair_steps=steps)
    write_markdown(tmp_path / "report.md", report)
    assert label in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("noisy", [False, True])
def test_report_md_latency_rows_compare_the_models_run_the_same_way(noisy, smoke_run, tmp_path):
    """Each row's ratio is of its own two numbers: here the inference form of the compressed
    model is slower than the original's (0.3 vs 0.2 ms) though faster than the eager original."""
    from agents.report import write_markdown

    report = read_json(smoke_run / "report.json")
    lat = report["latency_b1"]
    lat.update(
        original_ms=0.4,
        compressed_ms=0.1,
        original_inference_ms=0.2,
        compressed_inference_ms=0.3,
        inference_speedup=0.4 / 0.3,
        noisy=noisy,
        spread=0.9,
    )
    write_markdown(tmp_path / "report.md", report)
    md = (tmp_path / "report.md").read_text().splitlines()
    rows = {
        kind: next(x for x in md if "batch 1," in x and f", {kind} (" in x)
        for kind in ("eager", "inference form")
    }
    if noisy:  # a loaded machine: the ratio is withheld, not misreported
        assert all("not a measurement" in row for row in rows.values())
    else:
        assert rows["eager"].endswith("| 4.00x |")
        assert rows["inference form"].endswith("| 0.67x (1.33x against the eager original) |")


@pytest.mark.slow
def test_smoke_run_writes_every_file(smoke_run):
    for name in RUN_FILES:
        path = smoke_run / name
        assert path.is_file(), f"{name} missing"
        assert path.stat().st_size > 0, f"{name} is empty"
    for png in ("reward_curve.png", "layers.png"):
        assert (smoke_run / png).read_bytes()[:8] == PNG_MAGIC
    assert NET in (smoke_run / "report.md").read_text()
    config = read_json(smoke_run / "config.json")
    assert config["repair_steps"] == PRESETS["smoke"]["repair_steps"] > 0  # the proxy repairs
    # No temp files from the atomic writes are left behind.
    assert not [p.name for p in smoke_run.iterdir() if ".tmp" in p.name]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted((smoke_run / "tb").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard events file under tb/"
    found = {}
    for file in events:
        acc = EventAccumulator(str(file))
        acc.Reload()
        if "search/reward" in acc.Tags()["scalars"]:
            found[file] = acc.Scalars("search/reward")
    assert found, "no events file holds the scalar search/reward"
    rewards = [e.value for scalars in found.values() for e in scalars]
    report = read_json(smoke_run / "report.json")
    assert len(rewards) == report["episodes"] == 3
    assert all(math.isfinite(r) for r in rewards)
    # The report says on how many images each accuracy was measured (synthetic:600,200).
    assert (report["train_images"], report["proxy_images"], report["test_images"]) == (
        400,
        200,
        200,
    )
    md = (smoke_run / "report.md").read_text()
    assert "| baseline, test split (200 images) |" in md
    assert "| baseline, proxy split (200 images) |" in md
    drop = f"| drop (baseline - fine-tuned, test) | {100 * report['accuracy_drop']:.2f} points |"
    assert drop in md
    # Two speed-ups of the inference form: against the eager original and against its own.
    lat = report["latency_b1"]
    assert lat["inference_speedup"] == lat["original_ms"] / lat["compressed_inference_ms"]
    assert lat["inference_form_speedup"] == (
        lat["original_inference_ms"] / lat["compressed_inference_ms"]
    )


@pytest.mark.slow
def test_smoke_run_report(smoke_run):
    report = read_json(smoke_run / "report.json")
    missing = [k for k in REPORT_FIELDS if k not in report]
    assert not missing, missing
    assert report["net"] == NET and report["width"] == WIDTH and report["seed"] == 0
    assert report["target_ratio"] == TARGET
    assert report["device"] == "cpu"
    assert "synthetic" in report["dataset"]
    for key in ("baseline_acc", "proxy_acc", "finetuned_acc"):
        assert 0 <= report[key] <= 1
    assert report["accuracy_drop"] == pytest.approx(
        report["baseline_acc"] - report["finetuned_acc"]
    )
    assert report["search_seconds"] > 0 and report["finetune_seconds"] > 0
    assert report["params_original"] == count_params(build_vgg(NET, width=WIDTH))
    assert report["params_compressed"] < report["params_original"]
    assert report["macs_compressed"] < report["macs_original"]
    assert report["compression_ratio"] == pytest.approx(
        report["params_original"] / report["params_compressed"], rel=1e-12
    )
    assert report["compression_ratio"] >= TARGET

    layers = report["layers"]
    assert len(layers) == 8
    for layer in layers:
        missing = [k for k in LAYER_FIELDS if k not in layer]
        assert not missing, (layer, missing)
        assert layer["method"] in METHODS
        assert (layer["rank"] is None) == (layer["method"] == "keep")
        assert layer["params"] > 0 and layer["macs"] > 0

    # The report's layers are the saved policy's.
    policy = Policy.load(smoke_run / "policy.json")
    assert layer_choices(layers) == layer_choices(policy.to_dict()["layers"])

    # compressed.pt rebuilds (fresh net + apply_policy + state_dict) into the reported model.
    model, saved_policy = load_compressed(smoke_run / "compressed.pt")
    assert layer_choices(saved_policy.to_dict()["layers"]) == layer_choices(layers)
    assert count_params(model) == report["params_compressed"]
    assert report["compression_ratio"] == pytest.approx(
        report["params_original"] / count_params(model), rel=1e-12
    )
    # ... with the fine-tuned weights: same test accuracy on the same test subset.
    splits = make_splits(
        load_cifar10("synthetic:600,200"), proxy_size=200, seed=0, train_size=400, test_size=200
    )
    assert evaluate(model.eval(), splits.test) == pytest.approx(report["finetuned_acc"], abs=1e-9)

    config = read_json(smoke_run / "config.json")
    assert config["net"] == NET and config["target_ratio"] == TARGET
    assert config["levels"] == [16.0, 32.0, 64.0, 128.0]
    assert config["episodes"] == 3 and config["train_size"] == 400
    assert Path(config["baseline_path"]).is_file()


# ----------------------------------------------------------------------------- replay


@pytest.mark.slow
def test_replay_policy_reproduces_layers(smoke_run, tmp_path):
    baseline = read_json(smoke_run / "config.json")["baseline_path"]
    original = read_json(smoke_run / "report.json")
    out = tmp_path / "replay"
    rc = main(
        [
            *COMMON,
            "--replay",
            str(smoke_run / "policy.json"),
            "--checkpoint",
            baseline,
            "--target-ratio",
            "4",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    report = read_json(out / "report.json")
    # Judged by the budget it was searched under (its meta), not this run's --target-ratio 4.
    assert report["target_ratio"] == original["target_ratio"] == TARGET
    assert layer_choices(report["layers"]) == layer_choices(original["layers"])
    replayed = Policy.load(out / "policy.json")
    assert layer_choices(replayed.to_dict()["layers"]) == layer_choices(original["layers"])
    # Its search's scores were of the other run's checkpoint: not carried into this run's file.
    searched = Policy.load(smoke_run / "policy.json").meta
    assert {"reward", "proxy"} <= set(searched)
    assert not {"reward", "proxy", "episode"} & set(replayed.meta)
    assert set(replayed.meta) <= {*HOW_MADE, "replayed_from"}
    assert replayed.meta["replayed_from"] == str(smoke_run / "policy.json")
    assert replayed.meta["target_ratio"] == searched["target_ratio"]
    assert report["params_compressed"] == original["params_compressed"]
    assert report["compression_ratio"] == original["compression_ratio"]
    assert report["search_seconds"] == 0
    assert report["episodes"] == 0 and report["episodes_planned"] is None  # it searched nothing
    assert (
        original["episodes_planned"] == original["episodes"] and not original["search_interrupted"]
    )
    assert not (out / "agent.zip").exists()


@pytest.mark.slow
def test_replay_agent_gives_valid_policy(smoke_run, tmp_path):
    baseline = read_json(smoke_run / "config.json")["baseline_path"]
    out = tmp_path / "replay-agent"
    rc = main(
        [
            *COMMON,
            "--replay",
            str(smoke_run / "agent.zip"),
            "--checkpoint",
            baseline,
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    policy = Policy.load(out / "policy.json")  # validates every field
    assert policy.net == NET and policy.width == WIDTH and len(policy.layers) == 8
    report = read_json(out / "report.json")
    assert layer_choices(report["layers"]) == layer_choices(policy.to_dict()["layers"])
    # The agent replays in its own env (levels and target from agent.zip), behind the wall.
    assert report["compression_ratio"] >= TARGET
    model, _ = load_compressed(out / "compressed.pt")
    assert count_params(model) == report["params_compressed"]


# ----------------------------------------------------------------------------- bad input


def test_unknown_net_suggests_a_name(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["--net", "vgg17"])
    assert excinfo.value.code == 2
    captured = capsys.readouterr()
    assert "did you mean" in captured.err
    assert "vgg17" in captured.err
    assert "Traceback" not in captured.out + captured.err


def test_a_value_that_starts_with_a_dash_gets_a_hint(capsys):
    """argparse reads "-2,4" as a flag; the message says how to pass it."""
    with pytest.raises(SystemExit) as excinfo:
        main([*COMMON, "--levels", "-2,4"])
    assert excinfo.value.code == 2
    assert "--levels=-VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*COMMON, "--levels"])  # a missing value is not a dash problem
    assert "expected one argument" in (err := capsys.readouterr().err) and "=-VALUE" not in err
    assert main([*COMMON, "--levels=-2,4"]) == 2  # now read as a value, and refused as one
    assert "levels must be" in capsys.readouterr().err


def test_unknown_method_suggests_a_name(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main([*COMMON, "--methods", "keep,tuker2"])
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert "did you mean 'tucker2'" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "extra, phrase",
    [
        (["--width", "0"], "--width must be a positive number"),
        (["--n-envs", "0"], "--n-envs must be a whole number >= 1"),
        (["--repair-steps", "-1"], "--repair-steps must be a whole number >= 0"),
        (["--study-repair-steps", "-2"], "--study-repair-steps must be a whole number >= 0"),
        (["--study-repair-steps", "2"], "add --warm-start sensitivity or --observe study"),
        (
            ["--study-repair-steps", "2", "--replay", "p.json"],
            "a replay measures the one its agent was trained with",
        ),
        (["--levels", "0.5,2"], "levels must be"),
        (["--levels", "8,2"], "increasing order"),
        (["--methods", "keep"], "'keep' alone"),
        (["--tradeoff", "--target-ratio", "8"], "--tradeoff excludes --target-ratio"),
        (["--tradeoff", "--target-macs", "4"], "--tradeoff excludes"),
        (["--target-macs", "0.5"], "--target-macs must be a finite reduction factor > 1"),
        (["--episodes", "-3"], "--episodes must be a whole number >= 1"),
        (["--timesteps", "0"], "--timesteps must be a whole number >= 1"),
        (["--baseline-epochs", "0"], "--baseline-epochs must be a positive number"),
        (["--finetune-epochs", "-1"], "--finetune-epochs must be a positive number"),
        (["--proxy-size", "0"], "--proxy-size must be a whole number >= 1"),
        (["--train-size", "0"], "--train-size must be a whole number >= 1"),
        (["--batch-size", "0"], "--batch-size must be a whole number >= 1"),
        (["--bn-batches", "-1"], "--bn-batches must be a whole number >= 0"),
        (["--lr", "-0.1"], "--lr must be a positive number"),
        (["--finetune-lr", "nan"], "--finetune-lr must be a positive number"),
        (["--finetune-weight-decay", "-1"], "--finetune-weight-decay must be a number >= 0"),
        (["--finetune-label-smoothing", "1"], "--finetune-label-smoothing must be in [0, 1)"),
        (["--kd", "1.5"], "--kd must be in [0, 1]"),
        (["--feature-kd", "-1"], "--feature-kd must be a number >= 0"),
        (["--feature-kd", "inf"], "--feature-kd must be a number >= 0"),
        (["--stages", "0"], "--stages must be a whole number >= 1"),
        (["--warm-start-prob", "1"], "--warm-start-prob must be between 0 and 1"),
        (["--tradeoff", "--warm-start", "sensitivity"], "in trade-off mode use --warm-start none"),
        (["--stages", "2", "--fit", "data"], "use it with --fit weights"),
        (["--latency-repeats", "0"], "--latency-repeats must be a whole number >= 1"),
        (["--target-latency", "1"], "--target-latency must be a finite reduction factor > 1"),
        (["--target-latency", "2", "--latency-batch", "0"], "--latency-batch must be a whole"),
        (["--target-latency", "2", "--n-envs", "2"], "use it with --n-envs 1"),
        (["--tradeoff", "--target-latency", "2"], "--tradeoff excludes"),
        (["--seed", "-1"], "--seed must be a whole number >= 0"),
        (["--seed", str(2**32)], "--seed must be below 2**32"),
        (["--train-size", "5"], "smaller than one batch of 128"),
        (["--device", "gpu"], "choose one of auto, cpu, cuda or cuda:N"),
        (["--device", "cuda:x"], "choose one of auto, cpu, cuda or cuda:N"),
    ],
)
def test_invalid_settings(extra, phrase, tmp_path, capsys):
    out = tmp_path / "out"
    fail([*COMMON, *extra, "--out", str(out)], capsys, phrase)
    assert not out.exists()


@pytest.mark.parametrize("gpus", [0, 2])
def test_a_cuda_device_that_is_not_there_is_refused(gpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    out = tmp_path / "out"
    phrase = "only 2 CUDA GPU(s) are visible" if gpus else "--device cuda:2 was asked for but no"
    fail([*COMMON, "--device", "cuda:2", "--out", str(out)], capsys, phrase)
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--preset", "cpu"], ("sensitivity", "study", True)),
        (["--preset", "paper"], ("sensitivity", "study", True)),
        (["--preset", "smoke"], ("none", "layer", False)),
        (["--preset", "paper", "--tradeoff"], ("none", "study", True)),
        (
            ["--preset", "paper", "--warm-start", "none", "--no-imitate-best"],
            ("none", "study", False),
        ),
        (["--preset", "smoke", "--imitate-best", "--observe", "study"], ("none", "study", True)),
    ],
)
def test_presets_choose_how_to_search_and_flags_override(argv, expected):
    """The cpu and paper presets search from the heuristic (measured best); smoke stays plain;
    trade-off mode drops the preset's warm start (the heuristic needs a budget)."""
    from agents.cli import config_from_args
    from agents.cli_args import build_parser

    cfg = config_from_args(build_parser().parse_args(argv), argv).validate()
    assert (cfg.warm_start, cfg.observe, cfg.imitate_best) == expected


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--preset", "cpu"], 3),
        (["--preset", "paper"], 3),
        (["--preset", "smoke"], 0),
        (["--preset", "paper", "--final-check", "0"], 0),
        (["--preset", "cpu", "--final-check", "5"], 5),
        (["--preset", "paper", "--tradeoff"], 0),  # candidates of other sizes: no check
        (["--preset", "cpu", "--episodes", "1"], 2),  # one episode and the heuristic
        (["--preset", "cpu", "--episodes", "1", "--warm-start", "none"], 1),
        (["--preset", "cpu", "--timesteps", "8"], 3),
    ],
)
def test_the_presets_final_check_yields_where_it_cannot_apply(argv, expected):
    """cpu and paper end with an anchored check of 3 (BENCHMARKS.md); a preset's check shrinks
    to what a run can give instead of refusing it, while a typed one is taken as typed."""
    from agents.cli import config_from_args
    from agents.cli_args import build_parser

    cfg = config_from_args(build_parser().parse_args(argv), argv).validate()
    assert cfg.final_check == expected


def test_the_presets_final_check_is_off_for_a_replay_but_a_typed_one_is_refused(tmp_path):
    from agents.cli import config_from_args
    from agents.cli_args import build_parser

    policy = tmp_path / "policy.json"
    policy.write_text("{}")
    argv = ["--preset", "paper", "--replay", str(policy)]
    assert config_from_args(build_parser().parse_args(argv), argv).validate().final_check == 0
    argv += ["--final-check", "3"]
    with pytest.raises(RlMtdError, match="--final-check chooses among a search's best"):
        config_from_args(build_parser().parse_args(argv), argv).validate()
    argv = ["--preset", "cpu", "--tradeoff", "--final-check", "3"]
    with pytest.raises(RlMtdError, match="in --tradeoff mode they differ in size"):
        config_from_args(build_parser().parse_args(argv), argv).validate()


def test_checkpoint_of_another_net(tmp_path, capsys):
    ckpt = tmp_path / "vgg16.pt"
    save_baseline(ckpt, build_vgg("vgg16", width=WIDTH), net="vgg16", width=WIDTH)
    before = ckpt.read_bytes()
    out = tmp_path / "out"
    fail([*COMMON, "--checkpoint", str(ckpt), "--out", str(out)], capsys, "vgg16", f"not a {NET}")
    assert not out.exists()
    assert ckpt.read_bytes() == before


@pytest.mark.parametrize("kept", [0.5, 0.05])
def test_truncated_checkpoint(kept, tmp_path, capsys):
    """Cut anywhere (a short head makes torch's zip reader raise EINVAL, an OSError): the
    message says truncated, not an OS error text."""
    good = tmp_path / "good.pt"
    save_baseline(good, build_vgg(NET, width=WIDTH), net=NET, width=WIDTH)
    blob = good.read_bytes()[: int(len(good.read_bytes()) * kept)]
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(blob)
    out = tmp_path / "out"
    err = fail([*COMMON, "--checkpoint", str(bad), "--out", str(out)], capsys, "cannot be read")
    assert "truncated" in err and str(bad) in err
    assert "Invalid argument" not in err and "weights_only" not in err
    assert not out.exists()
    assert bad.read_bytes() == blob


@pytest.mark.parametrize("kind", ["whole model", "another net"])
def test_a_bad_checkpoint_stops_the_run_before_the_data_is_loaded(
    kind, tmp_path, capsys, monkeypatch
):
    import agents.pipeline

    def no_data(cfg):
        raise AssertionError("the data was loaded before the checkpoint was checked")

    monkeypatch.setattr(agents.pipeline, "load_data", no_data)
    ckpt = tmp_path / "model.pt"
    if kind == "whole model":
        torch.save(build_vgg(NET, width=WIDTH), ckpt)
        phrase = "torch.save(model.state_dict(), path)"
    else:
        save_baseline(ckpt, build_vgg("vgg13", width=WIDTH), net="vgg13", width=WIDTH)
        phrase = "pass --net vgg13"
    out = tmp_path / "out"
    err = fail([*COMMON, "--checkpoint", str(ckpt), "--out", str(out)], capsys, phrase)
    assert "\x1b" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize(
    "refusal",
    [
        "Weights only load failed. ... WeightsUnpickler error: Unsupported global: GLOBAL x.VGG",
        "Weights only load failed. ... WeightsUnpickler error: Unsupported class x.VGG",  # <2.4
    ],
)
def test_a_pickled_model_is_named_as_such_whichever_torch_words_it(refusal, tmp_path, monkeypatch):
    import pickle

    from rl_mtd.checkpoints import read_checkpoint
    from rl_mtd.errors import RlMtdError

    def refuse(*args, **kwargs):
        raise pickle.UnpicklingError(refusal)

    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"pickled")
    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(RlMtdError, match=r"torch\.save\(model\.state_dict\(\), path\)"):
        read_checkpoint(ckpt)


@pytest.mark.parametrize("text", ["", "hello", "not a checkpoint\n" * 100])
def test_text_file_as_checkpoint(text, tmp_path, capsys):
    bad = tmp_path / "notes.pt"
    bad.write_text(text)
    out = tmp_path / "out"
    said = "an empty file" if not text else "a text file"
    err = fail([*COMMON, "--checkpoint", str(bad), "--out", str(out)], capsys, said, "torch.save")
    assert "torch.load:" not in err, "not torch's words (a text file gave 'KeyError: 101')"
    assert len(err.strip().splitlines()) == 1, "one line, no traceback"
    assert "weights_only" not in err, "not torch's advice to unpickle the file"
    assert not out.exists()


@pytest.mark.parametrize("content", [{"net": NET, "compression_ratio": 8.0}, {"argv": []}])
def test_replay_of_a_json_that_is_not_a_policy(content, tmp_path, capsys):
    other = tmp_path / "report.json"
    other.write_text(json.dumps(content))
    out = tmp_path / "out"
    fail(
        [*COMMON, "--replay", str(other), "--out", str(out)],
        capsys,
        "is not an rl_mtd policy file",
        "policy.json or agent.zip",
    )
    assert not out.exists()


def test_missing_checkpoint(tmp_path, capsys):
    out = tmp_path / "out"
    fail(
        [*COMMON, "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(out)],
        capsys,
        "does not exist",
    )
    assert not out.exists()


def test_corrupt_policy_replay(tmp_path, capsys):
    policy = Policy.keep_all(build_vgg(NET, width=WIDTH), net=NET, width=WIDTH)
    good = tmp_path / "good.json"
    policy.save(good)
    text = good.read_text()
    bad = tmp_path / "policy.json"
    bad.write_text(text[: len(text) // 2])
    out = tmp_path / "out"
    fail([*COMMON, "--replay", str(bad), "--out", str(out)], capsys, "not valid JSON", str(bad))
    assert not out.exists()
    assert bad.read_text() == text[: len(text) // 2]


@pytest.mark.parametrize("ratio, phrase", [("8x", "'8x'"), (1e6, "beyond what any decomposition")])
def test_policy_with_a_hand_edited_budget(ratio, phrase, tmp_path, capsys):
    policy = Policy.keep_all(build_vgg(NET, width=WIDTH), net=NET, width=WIDTH)
    policy.meta.update(target_ratio=ratio, target_macs=None)
    path = tmp_path / "policy.json"
    policy.save(path)
    out = tmp_path / "out"
    err = fail(
        [*COMMON, "--replay", str(path), "--out", str(out)],
        capsys,
        "records a budget this run cannot use",
        str(path),
    )
    assert phrase in err and not out.exists()


def test_a_policy_without_a_budget_is_not_blamed_for_the_command_line_s(tmp_path, capsys):
    policy = Policy.keep_all(build_vgg(NET, width=WIDTH), net=NET, width=WIDTH)
    path = tmp_path / "policy.json"
    policy.save(path)
    out = tmp_path / "out"
    args = ["--replay", str(path), "--target-ratio", "1000", "--out", str(out)]
    err = fail([*COMMON, *args], capsys, "beyond what any decomposition can reach")
    assert "records a budget" not in err and not out.exists()


def test_a_replay_is_judged_by_its_own_budget_not_the_command_line_s(smoke_run, tmp_path):
    """--target-ratio beside --replay of a file that records its budget gives way to the file
    (it used to be checked, and refused when out of reach, before the file's budget replaced it)."""
    out = tmp_path / "out"
    policy = smoke_run / "policy.json"
    assert (
        main([*COMMON, "--replay", str(policy), "--target-ratio", "1000", "--out", str(out)]) == 0
    )
    assert (
        read_json(out / "report.json")["target_ratio"] == read_json(policy)["meta"]["target_ratio"]
    )


def test_missing_data(tmp_path, capsys):
    out = tmp_path / "out"
    args = [*COMMON, "--data", "/nonexistent", "--out", str(out)]  # the later --data wins
    fail(args, capsys, "/nonexistent", "does not exist")
    assert not out.exists()


def test_target_ratio_below_one(tmp_path, capsys):
    out = tmp_path / "out"
    fail([*COMMON, "--target-ratio", "0.5", "--out", str(out)], capsys, "--target-ratio", "> 1")
    assert not out.exists()


def test_target_ratio_out_of_reach(tmp_path, capsys, cli_cache):
    out = tmp_path / "out"
    err = fail(
        [*COMMON, "--target-ratio", "100000", "--out", str(out)], capsys, "100000", "at most"
    )
    assert "--target-ratio" in err or "--levels" in err
    assert not out.exists()
    # The baseline this needed was trained (or found) once in the shared cache, not per run.
    assert len(list((cli_cache / "baselines").glob("*.pt"))) == 1


def test_existing_out_without_overwrite(tmp_path, capsys):
    out = tmp_path / "existing"
    out.mkdir()
    marker = out / "marker.txt"
    marker.write_text("keep me\n")
    mtime = marker.stat().st_mtime_ns
    err = fail([*COMMON, *SEARCH, "--out", str(out)], capsys, "already exists", "--overwrite")
    assert "--resume" not in err, "no run there to resume"
    assert [p.name for p in out.iterdir()] == ["marker.txt"]
    assert marker.read_text() == "keep me\n"
    assert marker.stat().st_mtime_ns == mtime


def test_existing_out_of_a_run_suggests_resume_and_an_empty_one_is_used(tmp_path):
    out = tmp_path / "made-beforehand"
    out.mkdir()
    assert RunConfig(out=str(out)).validate().out == str(out)  # nothing there to lose
    (out / "config.json").write_text('{"net": "vgg11", "width": 0.125}')
    with pytest.raises(RlMtdError, match="already exists") as err:
        RunConfig(out=str(out)).validate()
    assert f"--resume {out}" in str(err.value)
    assert RunConfig(out=str(out), overwrite=True).validate().overwrite


def test_overwrite_refuses_a_folder_of_the_users_that_holds_a_runs_file_names(tmp_path):
    """--overwrite clears a run's files by name: in a folder that holds no run (its config.json
    is not a run's) it cleared the user's own report.md and tb/ and replaced their config.json.
    Now refused, naming the files; a folder without such names is still written into."""
    out = tmp_path / "project"
    (out / "tb").mkdir(parents=True)
    (out / "tb" / "mine.txt").write_text("keep\n")
    (out / "report.md").write_text("my notes\n")
    (out / "config.json").write_text('{"my": 1}')
    with pytest.raises(RlMtdError, match="already exists") as err:
        RunConfig(out=str(out)).validate()
    assert "--resume" not in str(err.value), "no run there to resume"
    with pytest.raises(RlMtdError, match="no run_agent.py run") as err:
        RunConfig(out=str(out), overwrite=True).validate()
    assert "config.json, report.md, tb" in str(err.value)
    for name in ("config.json", "report.md", "tb"):
        (out / name).rename(out / f"my-{name}")
    assert RunConfig(out=str(out), overwrite=True).validate().overwrite


@pytest.mark.slow
def test_existing_out_with_overwrite(smoke_run, tmp_path):
    """The refusal above is about --overwrite: with it, the same directory is written into."""
    out = tmp_path / "existing"
    out.mkdir()
    (out / "marker.txt").write_text("keep me\n")
    baseline = read_json(smoke_run / "config.json")["baseline_path"]
    rc = main(
        [
            *COMMON,
            "--replay",
            str(smoke_run / "policy.json"),
            "--checkpoint",
            baseline,
            "--out",
            str(out),
            "--overwrite",
        ]
    )
    assert rc == 0
    assert (out / "report.json").is_file()
    assert (out / "marker.txt").read_text() == "keep me\n"


def test_policy_of_another_net(tmp_path, capsys):
    policy_file = tmp_path / "vgg11-policy.json"
    Policy.keep_all(build_vgg(NET, width=WIDTH), net=NET, width=WIDTH).save(policy_file)
    before = policy_file.read_text()
    out = tmp_path / "out"
    fail(
        [*COMMON, "--net", "vgg16", "--replay", str(policy_file), "--out", str(out)],
        capsys,
        "made for vgg11",
        "vgg16",
    )
    assert not out.exists()
    assert policy_file.read_text() == before


def test_agent_of_another_net(smoke_run, tmp_path, capsys):
    agent = tmp_path / "agent.zip"
    shutil.copy(smoke_run / "agent.zip", agent)
    out = tmp_path / "out"
    fail(
        [*COMMON, "--net", "vgg16", "--replay", str(agent), "--out", str(out)],
        capsys,
        "made for vgg11",
        "vgg16",
    )
    assert not out.exists()


def test_a_policy_for_another_number_of_classes_is_refused(smoke_run, tmp_path, capsys):
    """A policy.json edited to 100 classes was applied, and its compressed.pt could not be
    loaded (the classifier's shape differs from the policy's)."""
    policy = read_json(smoke_run / "policy.json")
    policy["num_classes"] = 100
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policy))
    out = tmp_path / "out"
    fail([*COMMON, "--replay", str(path), "--out", str(out)], capsys, "100 classes", "has 10")
    assert not out.exists()


def test_truncated_agent(smoke_run, tmp_path, capsys):
    blob = (smoke_run / "agent.zip").read_bytes()
    agent = tmp_path / "agent.zip"
    agent.write_bytes(blob[: len(blob) // 2])
    out = tmp_path / "out"
    err = fail([*COMMON, "--replay", str(agent), "--out", str(out)], capsys, str(agent))
    # A half agent.zip can open as the torch archive stored inside it, hence the second phrase.
    assert "damaged" in err or "not an rl_mtd agent" in err
    assert not out.exists()


@pytest.mark.parametrize("damage", ["garbage", "missing"])
def test_an_agent_with_damaged_weights_is_refused_before_overwrite_clears(
    smoke_run, tmp_path, capsys, damage
):
    """An agent.zip whose checksums hold but whose policy.pth is garbage (or gone) passed the
    metadata check, and --overwrite had cleared the earlier run before the load failed with
    torch's advice to turn its safety check off. Now: refused first, the old run intact."""
    import zipfile

    agent = tmp_path / "agent.zip"
    with zipfile.ZipFile(smoke_run / "agent.zip") as src, zipfile.ZipFile(agent, "w") as dst:
        for item in src.infolist():
            if item.filename == "policy.pth":
                if damage == "garbage":
                    dst.writestr(item, b"g" * 64)
            else:
                dst.writestr(item, src.read(item))
    out = tmp_path / "earlier"
    shutil.copytree(smoke_run, out)
    before = sorted(p.name for p in out.iterdir())
    argv = [*COMMON, "--replay", str(agent), "--out", str(out), "--overwrite"]
    for extra in (["--dry-run"], []):
        err = fail([*argv, *extra], capsys, str(agent), "damaged", "agent.zip of a run_agent.py")
        assert "weights_only" not in err and "arbitrary code" not in err
    assert sorted(p.name for p in out.iterdir()) == before, "the earlier run is intact"


# ----------------------------------------------------------------------------- resume, n-envs


@pytest.mark.slow
def test_resume_continues_the_search(tmp_path, caplog):
    started = tmp_path / "resumable"
    assert main([*COMMON, *SEARCH, "--out", str(started)]) == 0
    first = read_json(started / "search_state.json")
    assert len(first["episodes"]) == 3
    out = tmp_path / "moved"  # a run moved (or copied) elsewhere resumes where it now is
    shutil.move(started, out)
    with caplog.at_level("INFO"):
        assert main(["--resume", str(out), "--episodes", "5", "--no-progress", "--quiet"]) == 0
    assert "search: 2 episodes x 8 layers (of 5; 3 done)" in caplog.text, "the plan: what is left"
    assert not started.exists(), "the resumed search must not write to the run's old place"
    events = list((out / "tb").rglob("events.out.tfevents.*"))
    assert len(events) == 2, "the resumed search logs to TensorBoard beside the first one"
    state = read_json(out / "search_state.json")
    assert len(state["episodes"]) == 5, "resume must add episodes to the ones already run"
    assert state["episodes"][:3] == first["episodes"]
    assert state["best"]["reward"] >= first["best"]["reward"]
    report = read_json(out / "report.json")
    assert report["episodes"] == 5
    assert [i["episodes"] for i in report["invocations"]] == [3, 2], "each invocation's episodes"
    assert report["invocations"][1]["argv"][:2] == ["--resume", str(out)]
    assert read_json(out / "config.json")["argv"][0] == "--net", "the first command line is kept"
    assert report["proxy_evaluations"] == sum(i["proxy_evaluations"] for i in report["invocations"])


def test_resume_without_its_agent_goes_on_with_a_new_one_and_says_so(smoke_run, tmp_path, caplog):
    """agent.zip deleted: the search went on with a fresh agent without a word. Now it warns;
    the episodes done and the best policy so far are kept."""
    run = tmp_path / "no-agent"
    shutil.copytree(smoke_run, run)
    (run / "agent.zip").unlink()
    first = read_json(run / "search_state.json")
    with caplog.at_level("WARNING"):
        assert main(["--resume", str(run), "--episodes", "5", "--no-progress", "--quiet"]) == 0
    assert "agent.zip is missing: the search goes on with a new agent" in caplog.text
    assert "the 3 episodes done and the best policy so far are kept" in caplog.text
    state = read_json(run / "search_state.json")
    assert state["episodes"][:3] == first["episodes"] and len(state["episodes"]) == 5
    assert state["best"]["reward"] >= first["best"]["reward"]
    assert (run / "agent.zip").is_file()


def test_resume_of_a_directory_without_a_run_is_refused(tmp_path, capsys):
    fail(["--resume", str(tmp_path)], capsys, "no config.json there")


def test_resume_of_a_missing_directory_says_so(tmp_path, capsys):
    fail(["--resume", str(tmp_path / "nope")], capsys, "no such directory")


def test_resume_refuses_a_config_edited_to_another_net(smoke_run, tmp_path, capsys):
    """A hand-edited config.json naming another net would search on with the old agent and
    mix episodes of two networks; refused before any work, the run left as it was."""
    run = tmp_path / "edited"
    shutil.copytree(smoke_run, run)
    config = read_json(run / "config.json")
    (run / "config.json").write_text(json.dumps({**config, "net": "vgg13"}))
    before = _digest(run)
    fail(["--resume", str(run)], capsys, "config.json names vgg13", f"searched {NET}")
    assert _digest(run) == before


def test_resume_of_a_config_edited_to_a_bad_value_names_the_file(smoke_run, tmp_path, capsys):
    run = tmp_path / "edited"
    shutil.copytree(smoke_run, run)
    config = read_json(run / "config.json")
    (run / "config.json").write_text(json.dumps({**config, "kd": 5}))
    before = _digest(run)
    fail(["--resume", str(run)], capsys, f"{run / 'config.json'} holds a setting", "--kd", "kd")
    assert _digest(run) == before


def test_a_file_the_config_names_that_is_gone_is_named_not_called_an_edit(
    smoke_run, tmp_path, capsys, monkeypatch
):
    """A run started with a relative --checkpoint, resumed from another directory: the error
    blamed a hand edit of config.json. New runs record absolute paths; an old run's relative
    path that is not found from here is named with where it was read from and what to do."""
    run = tmp_path / "moved"
    shutil.copytree(smoke_run, run)
    config = read_json(run / "config.json")
    (run / "config.json").write_text(json.dumps({**config, "checkpoint": "ck/baseline.pt"}))
    monkeypatch.chdir(tmp_path)
    before = _digest(run)
    err = fail(["--resume", str(run)], capsys, "--checkpoint ck/baseline.pt", str(tmp_path))
    assert "directory the run was started in" in err and "edit" not in err
    assert _digest(run) == before


def test_a_new_runs_config_records_absolute_paths(tmp_path, monkeypatch):
    """So that --resume finds the data and the checkpoint from any directory."""
    from agents.run_dir import write_run_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ck.pt").write_bytes(b"")
    (tmp_path / "images").mkdir()
    (tmp_path / "cifar10").mkdir()  # a folder named like torchvision's keyword
    for data, recorded in [
        ("synthetic:600,200", "synthetic:600,200"),
        ("images", str(tmp_path / "images")),
        ("cifar10", "cifar10"),
    ]:
        cfg = RunConfig(data=data, checkpoint="ck.pt", replay=None)
        write_run_config(tmp_path, cfg, "cpu", "ck.pt")
        saved = read_json(tmp_path / "config.json")
        assert saved["checkpoint"] == str(tmp_path / "ck.pt")
        assert saved["data"] == recorded and saved["replay"] is None


@pytest.mark.parametrize("flag", ["--episodes", "--timesteps"])
def test_a_bad_search_length_on_resume_is_the_command_lines_not_the_configs(
    flag, smoke_run, tmp_path, capsys
):
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    err = fail(["--resume", str(run), flag, "0"], capsys, f"{flag} 0", "whole number >= 1")
    assert "config.json" not in err


def test_a_replayed_policy_short_of_its_budget_is_reported(smoke_run, tmp_path, caplog):
    """A policy edited to compress less than the budget it records: the run goes on with it,
    warns, and report.json / report.md say the budget is not met."""
    edited = read_json(smoke_run / "policy.json")
    for layer in edited["layers"]:
        layer["method"], layer["rank"] = "keep", None
        layer.pop("ratio", None)
    path = tmp_path / "short.json"
    path.write_text(json.dumps(edited))
    out = tmp_path / "out"
    with caplog.at_level("WARNING"):
        assert main([*COMMON, "--replay", str(path), "--out", str(out)]) == 0
    assert "does not meet this run's budget" in caplog.text and "--target-ratio 8" in caplog.text
    report = read_json(out / "report.json")
    assert report["budget_met"] is False and report["compression_ratio"] < TARGET
    assert "does not meet this budget" in (out / "report.md").read_text()
    assert read_json(smoke_run / "report.json")["budget_met"] is True


@pytest.mark.parametrize(("saved", "hint"), [(0.25, "pass --width 0.25"), (0.3, None)])
def test_a_bare_state_dict_of_another_width_gets_a_hint_that_fits(saved, hint, tmp_path, capsys):
    """The width hint is checked against a net built at that width: 0.3 gives first-conv
    channels (19) that suggest 0.296875, whose later layers would not fit either."""
    path = tmp_path / "bare.pt"
    torch.save(build_vgg(NET, width=saved).state_dict(), path)
    err = fail([*COMMON, "--checkpoint", str(path), "--out", str(tmp_path / "o")], capsys, "width")
    assert (hint in err) if hint else ("pass --width" not in err)


def test_a_tilde_in_out_is_the_home_directory(tmp_path, monkeypatch, capsys):
    """ "--out=~/runs/a" reaches the program unexpanded (bash expands only a leading ~ word):
    the run writes where the check looked, under $HOME."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    rc = main([*COMMON, "--out=~/runs/a", "--dry-run"])
    assert rc == 0, capsys.readouterr().err
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "runs").write_text("a file where the run's parent should be")
    fail([*COMMON, "--out=~/runs/a"], capsys, str(tmp_path / "home" / "runs"), code=2)
    assert not (tmp_path / "~").exists()


@pytest.mark.parametrize(
    ("flag", "value", "phrase"),
    [
        ("--width", "1e6", "outside"),
        ("--width", "0.001", "outside"),
        ("--replay", "DIR", "is a directory"),
        ("--checkpoint", "DIR", "is a directory"),
        ("--out", "FILE", "is a file"),
    ],
)
def test_clear_errors_for_odd_paths_and_widths(flag, value, phrase, tmp_path, capsys):
    if value == "DIR":
        value = str(tmp_path)
    elif value == "FILE":
        (tmp_path / "report.md").write_text("x")
        value = str(tmp_path / "report.md")
    fail([*COMMON, flag, value], capsys, flag, phrase)


@pytest.mark.parametrize(
    ("state", "more", "finished"),
    [
        ({"finished": True}, {}, True),
        ({"finished": False}, {}, False),  # Ctrl-C in the search: --resume finishes it
        ({"finished": True}, {"search_more": True, "episodes": 9}, False),
        ({"finished": True}, {"search_more": True, "episodes": 3}, True),  # a total reached
        ({"finished": True}, {"search_more": True, "timesteps": 16}, False),  # more timesteps
        ({"finished": True}, {"timesteps": 16}, True),  # the saved --timesteps run ended
        ({}, {"episodes": 3}, True),  # a state from before the flag: every episode was run
        ({}, {"episodes": 9}, False),
    ],
)
def test_when_a_resumed_search_has_nothing_left(state, more, finished):
    from agents.config import RunConfig
    from agents.search_state import search_finished

    cfg = RunConfig(**{"episodes": 3, **more})
    saved = {"episodes": [{}] * 3, "best": {"policy": {}}, **state}
    assert search_finished(cfg, saved) is finished


def test_resume_of_a_complete_run_is_refused_and_says_what_to_do(smoke_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    before = _digest(run)
    fail(["--resume", str(run)], capsys, "that run is complete", "--episodes above 3")
    assert _digest(run) == before


@pytest.mark.parametrize(
    "extra",
    [
        ["--finetune-epochs", "3"],
        ["--net", "vgg13"],
        ["--preset", "cpu"],
        ["--overwrite"],
        ["--seed", "0"],  # the default value: typed, so refused all the same
        ["--preset=paper"],
        ["--no-imitate-best"],
        ["--finetune-e", "3"],  # an abbreviation argparse accepts
    ],
)
def test_resume_refuses_flags_it_would_ignore(extra, smoke_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    before = _digest(run)
    with pytest.raises(SystemExit) as exit_:
        main(["--resume", str(run), "--episodes", "9", *extra])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # below argparse's usage text
    assert extra[0].split("=")[0] in err and "would be ignored" in err and "--episodes" not in err
    assert _digest(run) == before


def test_dry_run_prints_the_plan_and_writes_nothing(smoke_run, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    before = _digest(run)
    fresh = tmp_path / "fresh"
    with caplog.at_level("INFO"):
        argv = [*COMMON, *SEARCH, "--dry-run"]
        assert main([*argv, "--out", str(run), "--overwrite"]) == 0
        assert main([*argv, "--out", str(fresh)]) == 0
        assert main(["--resume", str(run), "--episodes", "5", "--dry-run", "--quiet"]) == 0
    assert caplog.text.count("estimated total") == 3 and "dry run: stopped" in caplog.text
    assert "(of 5; 3 done)" in caplog.text, "a resumed run's plan counts what is left"
    assert _digest(run) == before, "--overwrite --dry-run must not clear the earlier run"
    assert not fresh.exists()


def test_ctrl_c_in_the_fine_tune_keeps_the_policy_and_says_how_to_go_on(
    tmp_path, capsys, caplog, monkeypatch
):
    import agents.pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    real = agents.pipeline.compress_and_finetune
    monkeypatch.setattr(agents.pipeline, "compress_and_finetune", interrupted)
    out = tmp_path / "run"
    with caplog.at_level("WARNING"):
        assert main([*COMMON, *SEARCH, "--out", str(out)]) == 130
    kept = out / "policy.json"
    assert "interrupted" in capsys.readouterr().err
    # It stopped before the fine-tune's first save: --resume (not a replay into a new
    # directory, which it suggested) fine-tunes the policy again without searching.
    assert f"--resume {out} fine-tunes the policy again" in caplog.text
    net = build_vgg(NET, width=WIDTH)
    ratio = count_params(net) / Policy.load(kept).predicted_params(net)
    assert ratio >= TARGET * 0.98, "the search's best policy is kept"
    monkeypatch.setattr(agents.pipeline, "compress_and_finetune", real)
    episodes = read_json(out / "search_state.json")["episodes"]
    assert main(["--resume", str(out), "--no-progress", "--quiet"]) == 0
    assert read_json(out / "report.json")["episodes"] == len(episodes) == 3
    assert read_json(out / "report.json")["compression_ratio"] >= TARGET * 0.98


def test_an_interrupted_fine_tune_is_not_resumed_onto_another_baseline():
    """The saved fine-tune state is keyed by the policy and the baseline's kernels: after the
    baseline was retrained, --resume starts the fine-tune afresh instead of going on with
    weights decomposed from the old one."""
    from agents.finetune import finetune_state_key
    from rl_mtd.proxy import Proxy

    splits = make_splits(load_cifar10("synthetic:200,50"), proxy_size=50, seed=0)
    keys = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        model = build_vgg(NET, width=WIDTH)
        proxy = Proxy(model, train_split=splits.train, proxy_split=splits.proxy, device="cpu")
        policy = Policy.keep_all(model, net=NET, width=WIDTH)
        keys.append(finetune_state_key(policy, proxy))
    assert keys[0] == keys[1] != keys[2]


def test_resume_goes_on_with_an_interrupted_fine_tune(tmp_path, caplog, monkeypatch):
    """Ctrl-C in the fine-tune, then --resume: no new search, the fine-tune goes on from its
    last save and ends where an uninterrupted fine-tune of the same policy ends."""
    import agents.finetune

    argv = [*COMMON, *SEARCH, "--finetune-epochs", "2"]
    out = tmp_path / "run"
    real_bar = agents.finetune.train_bar

    @contextlib.contextmanager
    def stopping_bar(desc, enabled):
        def on_progress(p):
            if p.step == 4:
                raise KeyboardInterrupt

        with real_bar(desc, enabled):
            yield on_progress if desc == "fine-tune" else None

    monkeypatch.setattr(agents.finetune, "train_bar", stopping_bar)
    with caplog.at_level("INFO"):
        assert main([*argv, "--out", str(out)]) == 130
    assert (out / "finetune_state.pt").exists() and f"--resume {out}" in caplog.text
    assert not (out / "report.json").exists()
    monkeypatch.setattr(agents.finetune, "train_bar", real_bar)
    caplog.clear()
    with caplog.at_level("INFO"):
        assert main(["--resume", str(out), "--no-progress", "--quiet"]) == 0
    assert "search: finished (3 episodes)" in caplog.text, "the plan: nothing left to search"
    assert "fine-tune 2 epochs going on from " in caplog.text, "and the share of it done"
    assert "going on from step 4" in caplog.text
    assert not (out / "finetune_state.pt").exists(), "removed once the fine-tune ends"
    report = read_json(out / "report.json")
    assert report["episodes"] == 3, "the finished search is not run again"
    searched = read_json(out / "search_state.json")["invocations"][0]["proxy_evaluations"]
    # the search's evaluations still count; re-scoring its best in this process is not search
    assert report["proxy_evaluations"] == searched > 0
    assert report["proxy_evaluations"] == sum(i["proxy_evaluations"] for i in report["invocations"])
    assert [i["argv"][0] for i in report["invocations"]] == ["--net", "--resume"]
    ref = tmp_path / "uninterrupted"
    replay = [*COMMON, "--finetune-epochs", "2", "--replay", str(out / "policy.json")]
    assert main([*replay, "--out", str(ref)]) == 0
    assert read_json(ref / "report.json")["finetuned_acc"] == report["finetuned_acc"]
    resumed, whole = load_compressed(out / "compressed.pt"), load_compressed(ref / "compressed.pt")
    for (name, a), b in zip(
        resumed[0].state_dict().items(), whole[0].state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_two_envs_in_subprocesses(tmp_path):
    out = tmp_path / "two-envs"
    assert main([*COMMON, *SEARCH, "--n-envs", "2", "--out", str(out)]) == 0
    report = read_json(out / "report.json")
    assert report["episodes"] >= 3
    assert report["compression_ratio"] >= TARGET
    # Each worker scores with its own proxy: its fresh evaluations are counted all the same.
    episodes = read_json(out / "search_state.json")["episodes"]
    fresh = sum(1 for e in episodes if not e["cached"])
    assert fresh >= 2 and report["proxy_evaluations"] >= fresh  # the main process alone: 1


def test_env_workers_share_the_cpu_threads(tmp_path, monkeypatch):
    """Each --n-envs worker takes its share of torch's threads on a CPU (a fresh worker took one
    per core: two of them on two cores ran the search above about 6x slower). The workers are
    built in this process here, so the thread count each leaves behind can be read."""
    from stable_baselines3.common import vec_env

    seen = []

    def in_process(fns):
        envs = []
        for fn in fns:
            torch.set_num_threads(2)  # a fresh worker's default here: one per core
            envs.append(fn())
            seen.append(torch.get_num_threads())
        return vec_env.DummyVecEnv([lambda e=e: e for e in envs])

    monkeypatch.setattr(vec_env, "SubprocVecEnv", in_process)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the parent's: each of the 2 workers gets 1
    try:
        args = [*COMMON, *SEARCH, "--episodes", "2", "--n-envs", "2"]
        assert main([*args, "--out", str(tmp_path / "run")]) == 0
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 1]


def test_new_baseline_depends_on_the_seed_only(tmp_path, monkeypatch):
    """A baseline trained for a run is the same whatever drew from torch's RNG before (it was
    built before seeding, so its initial weights - and accuracy - varied from run to run)."""
    from agents.config import RunConfig
    from agents.inputs import get_baseline, load_data

    cfg = RunConfig(
        net=NET,
        width=WIDTH,
        data="synthetic:300,100",
        proxy_size=100,
        baseline_epochs=0.5,
        progress=False,
        seed=3,
    )
    splits, data = load_data(cfg)
    states = []
    for i, noise in enumerate((1, 1000)):
        monkeypatch.setenv(CACHE_ENV, str(tmp_path / f"cache{i}"))  # train, not load
        torch.manual_seed(1234 + noise)
        torch.rand(noise)
        model, _ = get_baseline(cfg, splits, data.key, torch.device("cpu"))
        states.append(model.state_dict())
    for k, v in states[0].items():
        assert torch.equal(v, states[1][k]), k


@pytest.mark.parametrize(("test_size", "warned"), [(200, True), (None, False)])
def test_a_small_test_split_is_said_to_be_uncertain(test_size, warned, caplog):
    from agents.config import RunConfig
    from agents.inputs import load_data

    cfg = RunConfig(data="synthetic:300,2500", proxy_size=100, test_size=test_size)
    with caplog.at_level("WARNING"):
        splits, _ = load_data(cfg)
    assert len(splits.test) == (test_size or 2500)
    assert (
        "the test split has 200 images: a test accuracy on it moves by about +-2.8" in caplog.text
    ) is warned


def test_an_interrupted_baseline_training_goes_on_where_it_stopped(tmp_path, monkeypatch, caplog):
    """Ctrl-C while the baseline trains keeps its progress beside the cache entry; the same
    call goes on from there and ends with the weights an uninterrupted training gives."""
    import agents.inputs
    from agents.config import RunConfig
    from agents.inputs import baseline_cache_path, baseline_state_path, get_baseline, load_data

    cfg = RunConfig(
        net=NET,
        width=WIDTH,
        data="synthetic:300,100",
        proxy_size=100,
        baseline_epochs=2,
        batch_size=50,
        progress=False,
        seed=5,
    )
    splits, data = load_data(cfg)
    cpu = torch.device("cpu")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "whole"))
    whole, _ = get_baseline(cfg, splits, data.key, cpu)

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "stopped"))
    real_bar = agents.inputs.train_bar

    @contextlib.contextmanager
    def stopping_bar(desc, enabled):
        def on_progress(p):
            if p.step == 5:  # past the first save (the end of epoch 1: step 4)
                raise KeyboardInterrupt

        with real_bar(desc, enabled):
            yield on_progress

    monkeypatch.setattr(agents.inputs, "train_bar", stopping_bar)
    state = baseline_state_path(baseline_cache_path(cfg, data.key))
    with caplog.at_level("INFO"), pytest.raises(KeyboardInterrupt):
        get_baseline(cfg, splits, data.key, cpu)
    assert state.exists() and "the same command goes on" in caplog.text
    assert not baseline_cache_path(cfg, data.key).exists(), "no half-trained baseline cached"
    # A run under other settings is told the state is there and unused; this one is not.
    from agents.inputs import note_other_baseline_states

    other_width = state.with_name(state.name.replace(f"-w{WIDTH:g}-", f"-w{WIDTH:g}5-"))
    other_width.write_bytes(state.read_bytes())  # another width's training: not this net's
    junk = state.with_name(state.name.replace(".train-state", "-x.train-state"))
    junk.write_text("not a state file")  # unreadable: passed over, not a crash
    caplog.clear()
    with caplog.at_level("INFO"):
        assert note_other_baseline_states(
            dataclasses.replace(cfg, baseline_epochs=3), data.key
        ) == [state]
        assert note_other_baseline_states(cfg, data.key) == []
    assert caplog.text.count("holds a baseline training") == 1
    assert "epochs 2" in caplog.text and "% done" in caplog.text
    monkeypatch.setattr(agents.inputs, "train_bar", real_bar)
    caplog.clear()
    with caplog.at_level("INFO"):
        resumed, _ = get_baseline(cfg, splits, data.key, cpu)
    assert "going on from step 4" in caplog.text
    assert not state.exists(), "removed once the baseline is cached"
    for (name, a), b in zip(resumed.state_dict().items(), whole.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def _digest(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_bad_input_leaves_an_earlier_run_byte_identical(smoke_run, tmp_path, capsys):
    """Every refusal comes before the run directory is touched, even with --overwrite."""
    run = tmp_path / "earlier"
    shutil.copytree(smoke_run, run)
    before = _digest(run)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"net": NET}))
    battery = [
        ["--net", "vgg17"],
        ["--width", "0"],
        ["--episodes", "-3"],
        ["--target-ratio", "0.5"],
        ["--target-ratio", "1e6"],
        ["--levels", "8,2"],
        ["--checkpoint", str(text)],
        ["--checkpoint", str(tmp_path / "missing.pt")],
        ["--replay", str(report)],
        ["--data", str(tmp_path / "no-such-data")],
        ["--seed", "-1"],
        ["--replay", str(run / "agent.zip")],  # files that --overwrite would clear
        ["--replay", str(run / "policy.json")],
    ]
    for extra in battery:
        search = [] if extra[0] == "--replay" else SEARCH  # a replay takes no search flags
        argv = [*COMMON, *search, *extra, "--out", str(run), "--overwrite"]
        with pytest.raises(SystemExit) if extra[1] == "vgg17" else contextlib.nullcontext():
            assert main(argv) != 0, extra
        capsys.readouterr()
        assert _digest(run) == before, f"{extra} changed the earlier run"


def test_replay_with_the_data_aware_fit(smoke_run, tmp_path):
    out = tmp_path / "datafit"
    policy = smoke_run / "policy.json"
    assert main([*COMMON, "--replay", str(policy), "--fit", "data", "--out", str(out)]) == 0
    report = read_json(out / "report.json")
    assert report["fit"] == "data"
    assert layer_choices(report["layers"]) == layer_choices(
        read_json(smoke_run / "report.json")["layers"]
    )
    assert math.isfinite(report["finetuned_acc"])


@pytest.mark.parametrize("kind", ["torchscript", "onnx"])
def test_export_writes_a_model_that_runs_without_rl_mtd(kind, smoke_run, tmp_path):
    if kind == "onnx":
        pytest.importorskip("onnx", reason="ONNX export needs the optional 'export' extra")
    out = tmp_path / f"export-{kind}"
    argv = [
        *COMMON,
        "--replay",
        str(smoke_run / "policy.json"),
        "--export",
        kind,
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    info = read_json(out / "report.json")["export"]
    assert (out / info["path"]).is_file() and info["format"] == kind
    if "max_abs_diff" in info:
        assert info["max_abs_diff"] < 1e-3
    model, _ = load_compressed(out / "compressed.pt")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model.eval()(x)
    assert info["input"]["mean"] == list(MEAN) and info["input"]["scale"] == 1 / 255
    if kind == "torchscript":
        got = torch.jit.load(str(out / info["path"]))(x)
        assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    else:  # padded for ONNX Runtime's blocked kernels, and the report says so
        assert info["pad_channels"] in (8, 16)
        assert f"padded to multiples of {info['pad_channels']}" in (out / "report.md").read_text()


@pytest.mark.slow
def test_the_warm_start_keeps_to_the_methods_the_search_may_use(tmp_path):
    """--methods keep,tucker2 with a warm start: the heuristic's policy, the search's first best
    (and the one it returns where nothing beats it), had CP layers."""
    out = tmp_path / "run"
    # its own study (1 repair step): the next test counts the evaluations of a cold one
    argv = [*COMMON, *SEARCH, "--warm-start", "sensitivity", "--methods", "keep,tucker2"]
    argv += ["--study-repair-steps", "1"]
    assert main([*argv, "--out", str(out)]) == 0
    start = read_json(out / "search_state.json")["invocations"][0]["warm_start"]["policy"]
    assert {layer["method"] for layer in start["layers"]} <= {"keep", "tucker2"}
    assert "tucker2" in {layer["method"] for layer in start["layers"]}
    assert start["meta"]["methods"] == ["tucker2"] and start["meta"]["levels"] == [16, 32, 64]
    assert {layer["method"] for layer in read_json(out / "policy.json")["layers"]} <= {
        "keep",
        "tucker2",
    }


@pytest.mark.slow
def test_warm_start_begins_at_the_heuristic_and_caches_its_study(tmp_path, caplog):
    runs = []
    # the second run also checks its best against the heuristic's by short fine-tunes; cloned
    # less surely, so its episodes leave the heuristic's policy (an episode that replays the
    # heuristic's actions gives its very policy: no second candidate to check)
    extra = {
        "first": [],
        "second": ["--final-check", "2", "--final-check-epochs", "0.1", "--warm-start-prob", "0.3"],
    }
    for name in ("first", "second"):
        out = tmp_path / name
        argv = [*COMMON, *SEARCH, "--warm-start", "sensitivity", *extra[name]]
        assert main([*argv, "--out", str(out)]) == 0
        runs.append(read_json(out / "search_state.json"))
    first, second = runs
    # config.json records the study's steps as resolved (smoke: its 2 repair steps, under 50)
    assert read_json(tmp_path / "first" / "config.json")["study_repair_steps"] == 2
    assert first["invocations"][0]["warm_start"]["study_evaluations"] > 0
    assert second["invocations"][0]["warm_start"]["study_evaluations"] == 0, "study cached"
    # Every episode settles in the heuristic's order, and the agent (for a replay) records it.
    from agents.ppo import read_agent_meta

    for name, state in zip(("first", "second"), runs):
        order = state["invocations"][0]["warm_start"]["policy"]["meta"]["settle_first"]
        assert read_agent_meta(tmp_path / name / "agent.zip")["settle_first"] == order
    # The heuristic's policy is the first best: the search ends at or above it.
    heuristic = Policy.from_dict(read_json(tmp_path / "first" / "policy.json"))
    assert heuristic.net == NET
    assert first["best"]["reward"] >= min(e["reward"] for e in first["episodes"])
    assert all(e["ratio"] >= TARGET for e in first["episodes"])
    # The search's start is kept (its reward with it) and is a candidate of the final check.
    start = Policy.from_dict(second["invocations"][0]["warm_start"]["policy"])
    assert second["invocations"][0]["warm_start"]["reward"] <= second["best"]["reward"]
    check = read_json(tmp_path / "second" / "report.json")["final_check"]
    assert check is not None, "the search and its start give two candidates to check"
    checked = [Policy.from_dict(c["policy"]).choices() for c in check["candidates"]]
    assert start.choices() in checked and len(checked) == 2
    row = next(
        line
        for line in (tmp_path / "second" / "report.md").read_text().splitlines()
        if "the heuristic's policy" in line
    )
    assert row.startswith(f"| {checked.index(start.choices()) + 1} |"), "its row is named"
    # The start is the check's anchor, and the other candidate's lead over it is measured on
    # the same images (the margin decides by it).
    assert check["anchor"] == checked.index(start.choices()) and check["margin"] == 2.0
    # Resumed without its agent: a new one, cloned from the heuristic again (the study cached),
    # and the search's best so far stands.
    run = tmp_path / "first"
    (run / "agent.zip").unlink()
    with caplog.at_level("WARNING"):
        assert main(["--resume", str(run), "--episodes", "4", "--no-progress", "--quiet"]) == 0
    assert "goes on with a new agent cloned from the heuristic again" in caplog.text
    resumed = read_json(run / "search_state.json")
    assert resumed["episodes"][:3] == first["episodes"] and len(resumed["episodes"]) == 4
    assert resumed["best"]["reward"] >= first["best"]["reward"]
    assert "warm_start" not in resumed["invocations"][1], "the start was the first invocation's"
    order = first["invocations"][0]["warm_start"]["policy"]["meta"]["settle_first"]
    assert read_agent_meta(run / "agent.zip")["settle_first"] == order
    other = check["candidates"][1 - check["anchor"]]
    assert check["margin_applied"] and "vs_anchor" not in check["candidates"][check["anchor"]]
    assert "lead over the start (paired s.e.)" in (tmp_path / "second" / "report.md").read_text()
    assert other["vs_anchor"]["gap"] == pytest.approx(
        other["held_out_acc"] - check["candidates"][check["anchor"]]["held_out_acc"], abs=1e-9
    )
    if check["chosen"] != check["anchor"]:
        assert other["vs_anchor"]["gap"] > 2.0 * other["vs_anchor"]["se"]
    best = Policy.from_dict(second["best"]["policy"])
    if best.choices() != start.choices():  # the search moved away: its start is put second
        assert checked == [best.choices(), start.choices()]


@pytest.mark.slow
def test_parameter_and_macs_budgets_both_reached(tmp_path):
    """Issue 11: --target-ratio 8 --target-macs 4; report.json states both targets and shows
    both reached by the fine-tuned model."""
    out = tmp_path / "both"
    argv = [*COMMON, "--episodes", "3", "--levels", "4,8,16,32,64", "--target-ratio", "8"]
    assert main([*argv, "--target-macs", "4", "--out", str(out)]) == 0
    report = read_json(out / "report.json")
    assert report["target_ratio"] == 8 and report["target_macs"] == 4
    assert report["compression_ratio"] >= 8 and report["macs_ratio"] >= 4
    assert report["macs_original"] / report["macs_compressed"] == pytest.approx(
        report["macs_ratio"]
    )
    episodes = [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]
    assert episodes and all(e["ratio"] >= 8 and e["macs_ratio"] >= 4 for e in episodes)
    # Each episode records its whole choice: the best one's is the saved policy.
    best = max(episodes, key=lambda e: e["reward"])
    saved = read_json(out / "policy.json")["layers"]
    assert (best["methods"], best["ranks"]) == (
        [layer["method"] for layer in saved],
        [layer["rank"] for layer in saved],
    )


@pytest.mark.slow
def test_staged_replay_with_feature_distillation(smoke_run, tmp_path, caplog, monkeypatch):
    """--stages 2 --feature-kd 1: two compression stages, each fine-tuned, ending at the
    policy's own ranks; the saved model is the policy's."""
    import agents.finetune

    out = tmp_path / "staged"
    policy = smoke_run / "policy.json"
    configs = []

    def recording_train(*args, config, **kwargs):
        configs.append(config)
        return train(*args, config=config, **kwargs)

    monkeypatch.setattr(agents.finetune, "train", recording_train)
    with caplog.at_level("INFO", logger="rl_mtd"):
        assert (
            main(
                [
                    *COMMON,
                    "--replay",
                    str(policy),
                    "--stages",
                    "2",
                    "--feature-kd",
                    "1",
                    "--finetune-weight-decay",
                    "0.0002",
                    "--finetune-label-smoothing",
                    "0.05",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
    stages = [r.getMessage() for r in caplog.records if "compression stage" in r.getMessage()]
    assert len(stages) == 2 and "stage 2 of 2" in stages[1]
    report = read_json(out / "report.json")
    assert report["compression_ratio"] >= TARGET
    model, saved = load_compressed(out / "compressed.pt")
    assert count_params(model) == report["params_compressed"]
    assert [c.rank for c in saved.layers] == [c.rank for c in Policy.load(policy).layers]
    assert read_json(out / "config.json")["stages"] == 2
    assert report["finetune_recipe"]["stages"] == 2 and report["finetune_recipe"]["feature_kd"] == 1
    assert report["finetune_recipe"]["finetune_weight_decay"] == 0.0002
    assert len(configs) == 2, "one fine-tune per stage"
    assert all(c.weight_decay == 0.0002 and c.label_smoothing == 0.05 for c in configs)


@pytest.mark.slow
def test_observe_study_shows_the_study_and_replays(tmp_path, monkeypatch):
    """--observe study: the agent's observation carries the study's 12 scores per layer, the
    agent.zip says so, and replaying it on the checkpoint builds the same environment. With
    --study-repair-steps 0 the study (not the search) scores without repair, the agent.zip
    records that, and the replay measures the same study."""
    import agents.studies as studies
    from agents.ppo import load_agent, read_agent_meta

    studied = []  # the repair steps of every study asked for
    cached_study = studies.cached_study

    def recording(proxy, *args, **kwargs):
        studied.append(proxy.config.repair_steps)
        return cached_study(proxy, *args, **kwargs)

    monkeypatch.setattr(studies, "cached_study", recording)
    out = tmp_path / "run"
    argv = [*COMMON, *SEARCH, "--observe", "study", "--study-repair-steps", "0"]
    assert main([*argv, "--out", str(out)]) == 0
    meta = read_agent_meta(out / "agent.zip")
    assert meta["observe"] == "study" and meta["study_repair_steps"] == 0
    assert load_agent(out / "agent.zip").observation_space.shape == (14 + 2 * 6,)
    config = read_json(out / "config.json")
    assert config["observe"] == "study" and config["study_repair_steps"] == 0
    assert config["repair_steps"] > 0, "the search itself still repairs"
    assert studied == [0]
    state = read_json(out / "search_state.json")
    invocation = state["invocations"][0]
    assert invocation["study_seconds"] > 0, "the study's cost is charged"
    assert invocation["study_evaluations"] > 0
    assert state["seconds"] >= invocation["study_seconds"]
    baseline = config["baseline_path"]
    replay = tmp_path / "replay"
    args = ["--replay", str(out / "agent.zip"), "--checkpoint", baseline, "--out", str(replay)]
    assert main([*COMMON, *args]) == 0
    assert studied == [0, 0], "the replay observes the study the agent was trained on"
    assert read_json(replay / "report.json")["compression_ratio"] >= TARGET


@pytest.mark.parametrize("steps", [-3, "200", 2.5])
def test_an_agent_naming_a_bad_study_is_refused_clearly(steps, tmp_path):
    import gymnasium as gym
    from stable_baselines3.common.vec_env import DummyVecEnv

    from agents.ppo import make_ppo, read_agent_meta, save_agent
    from rl_mtd.errors import RlMtdError

    agent = make_ppo(DummyVecEnv([lambda: gym.make("CartPole-v1")]), 8)
    path = tmp_path / "agent.zip"
    meta = {"net": NET, "width": WIDTH, "methods": [], "levels": [], "observe": "study"}
    save_agent(agent, path, {**meta, "study_repair_steps": 40})
    assert read_agent_meta(path)["study_repair_steps"] == 40
    save_agent(agent, path, {**meta, "study_repair_steps": steps})
    with pytest.raises(RlMtdError, match="study_repair_steps .* is not a count of steps"):
        read_agent_meta(path)


@pytest.mark.parametrize("first", [[-1], "12", [1.5], [True], {"0": 1}])
def test_an_agent_naming_a_bad_settle_order_is_refused_clearly(first, tmp_path):
    import gymnasium as gym
    from stable_baselines3.common.vec_env import DummyVecEnv

    from agents.ppo import make_ppo, read_agent_meta, save_agent
    from rl_mtd.errors import RlMtdError

    agent = make_ppo(DummyVecEnv([lambda: gym.make("CartPole-v1")]), 8)
    path = tmp_path / "agent.zip"
    meta = {"net": NET, "width": WIDTH, "methods": [], "levels": []}
    save_agent(agent, path, {**meta, "settle_first": [3, 0]})
    assert read_agent_meta(path)["settle_first"] == [3, 0]
    save_agent(agent, path, {**meta, "settle_first": first})
    with pytest.raises(RlMtdError, match="settle_first .* is not a list of layer indices"):
        read_agent_meta(path)


def test_an_agent_whose_settle_order_names_layers_the_net_lacks_is_refused_on_loading(tmp_path):
    """Refused when read (before --overwrite clears a run or a replay's episode), not after."""
    import gymnasium as gym
    from stable_baselines3.common.vec_env import DummyVecEnv

    from agents.ppo import make_ppo, save_agent
    from agents.replay import load_replay
    from rl_mtd.decompose import conv_layers
    from rl_mtd.errors import RlMtdError

    n = len(conv_layers(build_vgg(NET, width=WIDTH)))
    agent = make_ppo(DummyVecEnv([lambda: gym.make("CartPole-v1")]), 8)
    path = tmp_path / "agent.zip"
    meta = {"net": NET, "width": WIDTH, "methods": [], "levels": []}
    cfg = RunConfig(net=NET, width=WIDTH, replay=str(path))
    save_agent(agent, path, {**meta, "settle_first": [n - 1, 0]})
    assert load_replay(cfg).meta["settle_first"] == [n - 1, 0]
    save_agent(agent, path, {**meta, "settle_first": [1, n]})
    with pytest.raises(RlMtdError, match=rf"settle_first names layers \[{n}\]"):
        load_replay(cfg)


def test_an_agent_of_an_older_rank_rule_is_named_on_loading(tmp_path, caplog):
    """Its actions meant other ranks for Tucker-2 on the first conv: a replay or resume says so."""
    import gymnasium as gym
    from stable_baselines3.common.vec_env import DummyVecEnv

    from agents.ppo import make_ppo, read_agent_meta, save_agent
    from rl_mtd.decompose import RANK_RULE

    agent = make_ppo(DummyVecEnv([lambda: gym.make("CartPole-v1")]), 8)
    meta = {"net": NET, "width": WIDTH, "methods": [], "levels": []}
    for name, extra, warned in (("old", {}, True), ("new", {"rank_rule": RANK_RULE}, False)):
        caplog.clear()
        save_agent(agent, tmp_path / f"{name}.zip", {**meta, **extra})
        with caplog.at_level("WARNING"):
            read_agent_meta(tmp_path / f"{name}.zip")
        assert ("meant other ranks" in caplog.text) is warned


def test_behaviour_cloning_raises_the_heuristic_actions_probability():
    import gymnasium as gym
    import numpy as np
    from stable_baselines3.common.vec_env import DummyVecEnv

    from agents.ppo import make_ppo
    from agents.warmstart import BC_TARGET_PROB, behaviour_clone

    class Choices(gym.Env):  # the environment's shape: 14 features, 21 actions
        observation_space = gym.spaces.Box(0.0, 1.0, (14,), dtype=np.float32)
        action_space = gym.spaces.Discrete(21)

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            return self.observation_space.sample(), {}

        def step(self, action):
            return self.observation_space.sample(), 0.0, True, False, {}

    agent = make_ppo(DummyVecEnv([Choices]), 8)
    obs = np.random.default_rng(0).random((8, 14)).astype(np.float32)
    actions = np.array([3, 17, 17, 0, 9, 20, 3, 11])

    def mean_prob() -> float:
        dist = agent.policy.get_distribution(torch.as_tensor(obs))
        return float(dist.log_prob(torch.as_tensor(actions)).exp().mean())

    before = mean_prob()
    prob = behaviour_clone(agent, obs, actions, target_prob=0.5)  # --warm-start-prob 0.5
    assert prob == pytest.approx(mean_prob(), abs=0.05)
    assert prob >= 0.5 > before, (before, prob)
    surer = behaviour_clone(agent, obs, actions)  # the default
    assert surer >= BC_TARGET_PROB and mean_prob() >= BC_TARGET_PROB - 0.05, (surer, mean_prob())


def test_study_cache_key_names_only_changed_settings():
    """The study's cache key lists the proxy settings that differ from the defaults, so a new
    setting with a default keeps every cached study valid, while a changed one misses."""
    from dataclasses import replace

    from agents.studies import _settings
    from rl_mtd.proxy import ProxyConfig

    base = ProxyConfig()
    assert _settings(base) == repr([])
    assert _settings(replace(base, repair_steps=200)) == repr([("repair_steps", 200)])
    nested = replace(base, repair=replace(base.repair, lr=0.02))
    assert "0.02" in _settings(nested) and _settings(nested) != _settings(base)


@pytest.mark.slow
def test_imitate_best_clones_after_new_bests(tmp_path):
    """--imitate-best in a real search: the first episode is always a new best, so the
    rollouts after it start with a clone; the run records how many."""
    out = tmp_path / "sil"
    argv = [*COMMON, "--episodes", "9", "--levels", "16,32,64,128", "--target-ratio", str(TARGET)]
    assert main([*argv, "--imitate-best", "--out", str(out)]) == 0
    assert read_json(out / "config.json")["imitate_best"] is True
    state = read_json(out / "search_state.json")
    assert len(state["episodes"]) == 9
    assert 1 <= state["invocations"][0]["imitations"] <= 2  # 3 rollouts of 4 episodes
    assert 1 <= state["imitated"] <= state["best"]["episode"]  # what --resume carries on from


@pytest.mark.slow
def test_latency_budget_reached_and_reported(tmp_path, monkeypatch):
    """--target-latency 2 --latency-batch 4: the budget holds the latency model's prediction,
    report.json and report.md state target and prediction and time batch 4, and a second run
    reads the per-layer timings back from the cache instead of timing again."""
    from conftest import FakeTimer

    import rl_mtd.latency
    from agents.inputs import forget_latency_models

    timers: list[FakeTimer] = []

    def fake_timer(*_args, **_kwargs):
        timers.append(FakeTimer())
        return timers[-1]

    monkeypatch.setattr(rl_mtd.latency, "measured_timer", fake_timer)
    # This test is about the cache, not the busy-machine guard (tests/test_latency.py): the
    # timings are cached however busy the machine running the tests is.
    monkeypatch.setattr(rl_mtd.latency, "BUSY_LIMIT", float("inf"))
    argv = [*COMMON, "--episodes", "3", "--levels", "4,8,16,32,64", "--target-latency", "2"]
    for name in ("first", "second"):
        forget_latency_models()  # as a new process would: the second run reads the cache file
        out = tmp_path / name
        assert main([*argv, "--latency-batch", "4", "--out", str(out)]) == 0
    report = read_json(out / "report.json")
    assert report["target_latency"] == 2 and report["latency_batch"] == 4
    assert report["target_ratio"] is None and report["mode"] == "budget"
    assert report["predicted_latency"]["speedup"] >= 2 * (1 - 1e-9)
    assert report["latency_b4"]["original_ms"] > 0
    assert "Target speed-up 2x at batch 4" in (out / "report.md").read_text()
    assert timers[0].calls > 0 and timers[-1].calls == 0, "the second run timed nothing"
    charged = report["invocations"][0]["latency_model_seconds"]
    assert charged > 0, "the cached timing's cost is charged to the search, as the study's is"
    assert report["search_seconds"] >= charged
    episodes = [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]
    assert episodes and all(e["predicted_speedup"] >= 2 * (1 - 1e-9) for e in episodes)
    assert read_json(out / "policy.json")["meta"]["target_latency"] == 2
    # Replays bring the budget they were searched under: the agent's environment holds it and
    # both reports predict the speed-up on this device, from the cached timings.
    baseline = read_json(out / "config.json")["baseline_path"]
    for name, file in (("agent", "agent.zip"), ("policy", "policy.json")):
        forget_latency_models()
        replay = tmp_path / f"replay-{name}"
        args = ["--replay", str(out / file), "--checkpoint", baseline, "--out", str(replay)]
        assert main([*COMMON, *args]) == 0
        report = read_json(replay / "report.json")
        assert report["target_latency"] == 2 and report["latency_batch"] == 4
        assert report["predicted_latency"]["speedup"] >= 2 * (1 - 1e-9)
    assert timers[-1].calls == 0, "the replays timed nothing"


def test_an_unreachable_latency_target_stops_before_the_baseline_is_trained(
    tmp_path, monkeypatch, capsys
):
    """The layers are timed on a fresh network of the architecture (timing does not depend on
    the weights), so a speed-up beyond reach is refused before any training or data loading."""
    from conftest import FakeTimer

    import agents.inputs
    import rl_mtd.latency

    monkeypatch.setattr(rl_mtd.latency, "measured_timer", lambda *a, **k: FakeTimer())

    def no_training(*_args, **_kwargs):
        raise AssertionError("the baseline was trained before the target was checked")

    monkeypatch.setattr(agents.inputs, "train", no_training)
    monkeypatch.setattr(agents.inputs, "load_cifar10", no_training)
    out = tmp_path / "run"
    args = ["--baseline-epochs", "3", "--target-latency", "1000", "--out", str(out)]
    err = fail([*COMMON, *args], capsys, "target speed-up 1000 is beyond what these levels")
    assert "--target-latency" in err and not out.exists()


def test_final_check_fine_tunes_the_best_candidates_and_applies_the_winner(tmp_path, caplog):
    out = tmp_path / "checked"
    argv = [*COMMON, *SEARCH, "--final-check", "2", "--final-check-epochs", "0.2"]
    with caplog.at_level("INFO"):
        assert main([*argv, "--out", str(out)]) == 0
    assert "then the final check: the 2 best policies fine-tuned 0.2 epochs" in caplog.text
    report = read_json(out / "report.json")
    check = report["final_check"]
    episodes = read_json(out / "search_state.json")["episodes"]
    distinct = {json.dumps([e["methods"], e["ranks"]]) for e in episodes}
    assert len(distinct) >= 2, "the test needs a search with two policies to choose between"
    assert len(check["candidates"]) == 2
    chosen = check["candidates"][check["chosen"]]
    assert chosen["held_out_acc"] == max(c["held_out_acc"] for c in check["candidates"])
    assert (
        Policy.load(out / "policy.json").choices() == Policy.from_dict(chosen["policy"]).choices()
    )
    applied = [(layer["method"], layer["rank"]) for layer in report["layers"]]
    assert applied == [(c["method"], c["rank"]) for c in chosen["policy"]["layers"]]
    assert report["search_seconds"] >= check["seconds"] > 0, "the check is search time"
    assert "Final check" in (out / "report.md").read_text()
    # Each candidate is named by where it came from: the search's best by its episode too.
    best_episode = read_json(out / "search_state.json")["best"]["episode"]
    assert f"| 1 | episode {best_episode} |" in (out / "report.md").read_text()

    # Resumed after the check was cut short: the candidates done are not fine-tuned again.
    saved = read_json(out / "final_check.json")
    (out / "report.json").unlink()
    saved["candidates"] = saved["candidates"][:1]
    (out / "final_check.json").write_text(json.dumps(saved))
    caplog.clear()
    with caplog.at_level("INFO"):
        assert main(["--resume", str(out), "--no-progress", "--quiet"]) == 0
    assert caplog.text.count("final check: candidate") == 2 * (len(check["candidates"]) - 1)
    resumed = read_json(out / "report.json")["final_check"]
    assert resumed["candidates"][0] == check["candidates"][0]


def test_final_check_with_a_replay_or_without_a_budget_is_refused(smoke_run, tmp_path, capsys):
    argv = [*COMMON, "--replay", str(smoke_run / "policy.json"), "--final-check", "3"]
    fail([*argv, "--out", str(tmp_path / "r")], capsys, "--final-check", "--replay")
    argv = [*COMMON, "--episodes", "3", "--tradeoff", "--final-check", "3"]
    fail([*argv, "--out", str(tmp_path / "t")], capsys, "--final-check", "--tradeoff")


@pytest.mark.parametrize(
    "meta, settings, expected",
    [
        ({"study_repair_steps": 0}, {"warm_start": "sensitivity"}, 0),  # the agent's own study
        ({}, {"observe": "study"}, 200),  # written before agents recorded it: the search's steps
        ({}, {"warm_start": "sensitivity"}, 200),
        (None, {"warm_start": "sensitivity"}, 200),  # interrupted before the agent was saved
        ({}, {}, None),  # no study at all: nothing to pin
    ],
)
def test_resume_keeps_the_study_of_a_run_started_before_the_default(
    tmp_path, meta, settings, expected
):
    """A run whose config.json left the study's repair steps to the default (written before
    STUDY_REPAIR_STEPS; today's runs record the resolved steps) resumes with the study it
    began with: its agent's recorded steps, else the search's own, then the default."""
    import zipfile

    from agents.config import RunConfig
    from agents.ppo import AGENT_META
    from agents.resume import resume_config

    run = tmp_path / "run"
    run.mkdir()
    cfg = RunConfig(net="vgg11", repair_steps=200, **settings)
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    if meta is not None:
        with zipfile.ZipFile(run / "agent.zip", "w") as zf:
            zf.writestr("data", "{}")
            base = {"net": "vgg11", "width": 1.0, "methods": [], "levels": []}
            zf.writestr(AGENT_META, json.dumps({**base, **meta}))
    resumed = resume_config(run, argv=[])
    assert resumed.study_repair_steps == expected
    assert resumed.study_steps == (50 if expected is None else expected)
    resumed.validate()


# ----------------------------------------------------------------------------- bad input, round 2


@pytest.mark.parametrize(
    "extra, named",
    [
        (["--episodes", "3"], "--episodes"),
        (["--episodes=3"], "--episodes"),
        (["--epi", "3"], "--episodes"),  # an abbreviation argparse accepts, named in full
        (["--warm-start", "sensitivity"], "--warm-start"),
        (["--no-imitate-best"], "--no-imitate-best"),
    ],
)
def test_replay_refuses_search_flags_it_would_ignore(extra, named, smoke_run, tmp_path, capsys):
    out = tmp_path / "r"
    argv = [*COMMON, "--replay", str(smoke_run / "policy.json"), *extra, "--out", str(out)]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # below argparse's usage text
    assert "searches nothing" in err and f"so {named} would be ignored" in err
    assert not out.exists()


def test_a_replay_is_judged_by_its_policy_not_by_levels(smoke_run, tmp_path, capsys, caplog):
    """A replay applies the policy's own ranks: --levels and --methods are refused as search
    flags, a budget the policy meets passes, and one it misses stops the run only where no
    decomposition reaches it, without advice to add levels (it would change nothing)."""
    policy = Policy.load(smoke_run / "policy.json")
    ratio = policy.meta["proxy"]["compression_ratio"]
    bare = tmp_path / "bare.json"
    dataclasses.replace(policy, meta={}).save(bare)
    argv = [*COMMON, "--replay", str(bare), "--dry-run"]
    for flag, value in (("--levels", "2,4"), ("--methods", "keep,cp")):
        with pytest.raises(SystemExit) as exit_:
            main([*argv, flag, value, "--out", str(tmp_path / "r")])
        assert exit_.value.code == 2
        assert f"searches nothing, so {flag} would be ignored" in capsys.readouterr().err
    err = fail([*argv, "--target-ratio", "1e5", "--out", str(tmp_path / "r")], capsys, "at most")
    assert "beyond what any decomposition can reach" in err and "--levels" not in err
    with caplog.at_level("INFO"):
        for target in (0.99 * ratio, 2 * ratio):  # met; missed but within reach (a warning)
            out = tmp_path / f"r{target:g}"
            assert main([*argv, "--target-ratio", f"{target:g}", "--out", str(out)]) == 0
    assert caplog.text.count("dry run: stopped") == 2


@pytest.mark.parametrize("kind", ["another net", "100 classes", "policy file"])
def test_a_foreign_file_as_checkpoint_leads_with_the_fix(kind, tmp_path, capsys):
    """A bare state_dict of another VGG or of another class count, or a policy.json given as
    --checkpoint: one line naming the fix, no list of missing keys, no torch advice to unpickle."""
    if kind == "another net":
        ckpt = tmp_path / "vgg13.pt"
        torch.save(build_vgg("vgg13", width=WIDTH).state_dict(), ckpt)
        phrase = "pass --net vgg13"
    elif kind == "100 classes":
        ckpt = tmp_path / "c100.pt"
        torch.save(build_vgg(NET, width=WIDTH, num_classes=100).state_dict(), ckpt)
        phrase = "has 100 outputs, but the data has 10 classes"
    else:
        ckpt = tmp_path / "policy.json"
        Policy.keep_all(build_vgg(NET, width=WIDTH), net=NET, width=WIDTH).save(ckpt)
        phrase = "those are replayed, not loaded as weights"
    out = tmp_path / "out"
    err = fail([*COMMON, "--checkpoint", str(ckpt), "--out", str(out)], capsys, phrase)
    assert len(err.strip().splitlines()) == 1
    assert "Missing key" not in err and "weights_only" not in err
    assert not out.exists()


def test_a_compressed_checkpoint_as_replay_is_named(smoke_run, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [*COMMON, "--replay", str(smoke_run / "compressed.pt"), "--out", str(out)]
    fail(argv, capsys, "is a binary file", "not a policy", "load_compressed")
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--data", "--out", "--checkpoint", "--replay", "--resume"])
def test_an_empty_path_is_refused_not_read_as_the_current_directory(flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*COMMON, "--out", str(tmp_path / "out"), flag, ""])
    assert exit_.value.code == 2
    assert f"{flag} is empty" in capsys.readouterr().err


def test_final_check_beyond_the_episodes_is_refused(tmp_path, capsys):
    argv = [*COMMON, *SEARCH, "--final-check", "4", "--out", str(tmp_path / "out")]
    fail(argv, capsys, "--final-check 4", "search of 3 episodes gives (at most 3)", "3 or less")
    assert not (tmp_path / "out").exists()
    # A warm start's policy is one candidate more.
    warm = dict(episodes=3, target_ratio=8.0, warm_start="sensitivity")
    RunConfig.with_preset("smoke", **warm, final_check=4).validate()
    with pytest.raises(RlMtdError, match="at most 4"):
        RunConfig.with_preset("smoke", **warm, final_check=5).validate()
    for bad in ("-1", "nan"):
        argv = [*COMMON, *SEARCH, "--final-check", "2", "--final-check-margin", bad]
        fail([*argv, "--out", str(tmp_path / "m")], capsys, "--final-check-margin", ">= 0")
    assert not (tmp_path / "m").exists()


def test_resume_with_fewer_episodes_than_done_is_refused(smoke_run, tmp_path, capsys):
    """An unfinished run (no report yet) with 3 episodes done: --episodes 2 cannot be honoured,
    and is refused rather than read as "search no more"."""
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    (run / "report.json").unlink()
    before = _digest(run)
    fail(["--resume", str(run), "--episodes", "2"], capsys, "has done 3 already", "above 3")
    assert _digest(run) == before


def test_a_damaged_search_state_says_what_is_left(smoke_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    (run / "search_state.json").write_text('{"episodes": [')
    fail(["--resume", str(run), "--episodes", "5"], capsys, "damaged", "--replay it", "NEW_DIR")


def test_a_damaged_agent_is_found_before_any_work_and_says_what_is_left(
    smoke_run, tmp_path, capsys, monkeypatch
):
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    blob = bytearray((run / "agent.zip").read_bytes())
    monkeypatch.setattr(
        "agents.pipeline.load_data", lambda *_: pytest.fail("loaded data before the check")
    )
    for damage in ("cut", "flipped"):  # a truncated file; bytes changed inside a member
        if damage == "cut":
            (run / "agent.zip").write_bytes(blob[: len(blob) // 3])
        else:
            middle = len(blob) // 2
            changed = blob[:middle] + bytes(b ^ 0xFF for b in blob[middle : middle + 64])
            (run / "agent.zip").write_bytes(changed + blob[middle + 64 :])
        err = fail(["--resume", str(run), "--episodes", "5"], capsys, "damaged", "--replay it")
        assert "NEW_DIR" in err and err.count("replay") == 1, err


def test_a_read_only_run_to_resume_is_named_by_resume_not_out(
    smoke_run, tmp_path, capsys, monkeypatch
):
    """--resume refuses --out, so the advice for a run directory it cannot write names
    --resume (root ignores permissions: the read-only file system is simulated)."""
    import errno

    def read_only(directory):
        raise OSError(errno.EROFS, "Read-only file system", str(directory))

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    monkeypatch.setattr("agents.prechecks.check_writable", read_only)
    err = fail(["--resume", str(run), "--episodes", "5"], capsys, f"--resume {run} cannot be")
    assert "Read-only file system; make it writable, or copy the run" in err
    assert "--out" not in err and str(run) + " at" not in err


def test_overwrite_leaves_no_result_of_the_earlier_run(smoke_run, tmp_path, monkeypatch):
    """--overwrite, then the new run stops in its search: none of the earlier run's results
    (its policy, report, plots, model, agent) stand beside the new run's config.json."""
    import agents.pipeline
    import agents.run_dir

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    (run / "notes.txt").write_text("mine\n")
    monkeypatch.setattr(agents.pipeline, "search", interrupted)
    assert main([*COMMON, *SEARCH, "--out", str(run), "--overwrite"]) == 130
    stale = (*agents.run_dir.STALE_SEARCH_FILES, *agents.run_dir.STALE_OUTPUTS)
    assert {"policy.json", "layers.png", "report.json"} <= set(stale)
    assert [name for name in stale if (run / name).exists()] == []
    assert read_json(run / "config.json")["overwrite"] is True
    assert (run / "notes.txt").read_text() == "mine\n", "files of the user's stay"


@pytest.mark.parametrize(
    "test_acc, proxy_acc, phrase",
    [
        (0.11, 0.12, "at about chance"),
        (0.80, 0.99, "probably trained on the proxy's 2000 images"),
        (0.80, 0.83, None),  # sampling noise of a 2,000-image split: no warning
    ],
)
def test_a_misleading_baseline_is_named(test_acc, proxy_acc, phrase, caplog):
    """A checkpoint trained on all 50,000 training images has seen the proxy split: the search
    would rank policies on memorised images, so the run says so."""
    from types import SimpleNamespace

    from agents.inputs import warn_about_baseline

    proxy = SimpleNamespace(num_classes=10, baseline_acc=proxy_acc, proxy_split=[None] * 2000)
    with caplog.at_level("WARNING"):
        warn_about_baseline(test_acc, proxy)
    if phrase is None:
        assert not caplog.records
    else:
        assert phrase in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        warn_about_baseline(test_acc, proxy, checkpoint=False)  # a baseline this run trained
    assert "probably trained on the proxy" not in caplog.text


def test_ctrl_c_in_the_warm_start_study_says_how_to_go_on(tmp_path, monkeypatch, caplog):
    """The study is minutes of a CPU run: Ctrl-C there names the command that measures only
    the rest, as every other interrupt point does."""
    import agents.studies

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(agents.studies, "cached_study", interrupted)
    out = tmp_path / "run"
    argv = [*COMMON, *SEARCH, "--warm-start", "sensitivity", "--out", str(out)]
    with caplog.at_level("WARNING"):
        assert main(argv) == 130
    assert f"run_agent.py --resume {out} measures only what it has not cached" in caplog.text
    assert (out / "config.json").exists()  # what --resume reads


def test_ctrl_c_before_the_first_episode_says_how_to_resume(tmp_path, monkeypatch, caplog, capsys):
    """Ctrl-C before any episode finished was reported as a user error (exit 2, "nothing to
    apply") with no word of --resume, which works: now exit 130 and the way on. The resumed
    search does not charge the warm start's study and start again (the first invocation's save
    before its first episode charged them)."""
    from stable_baselines3 import PPO

    real_learn = PPO.learn

    def ctrl_c(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(PPO, "learn", ctrl_c)  # after the warm start, before any episode
    out = tmp_path / "run"
    with caplog.at_level("WARNING"):
        # the warm start of test_warm_start_begins_at_the_heuristic_and_caches_its_study: its
        # study is cached in the CLI tests' shared cache by then, so this costs no study
        argv = [*COMMON, *SEARCH, "--warm-start", "sensitivity", "--out", str(out)]
        assert main(argv) == 130
    assert f"--resume {out}" in caplog.text and "error:" not in capsys.readouterr().err
    first = read_json(out / "search_state.json")
    assert first["invocations"][0]["study_seconds"] > 0
    monkeypatch.setattr(PPO, "learn", real_learn)
    assert main(["--resume", str(out), "--no-progress", "--quiet"]) == 0
    assert read_json(out / "report.json")["episodes"] == 3
    state = read_json(out / "search_state.json")
    assert state["invocations"][1]["study_seconds"] == 0, "charged once, by the first"
    assert state["seconds"] < first["seconds"] + sum(e["seconds"] for e in state["episodes"]) + 60


def test_a_report_after_an_interrupted_search_says_so(tmp_path, monkeypatch, caplog):
    """Ctrl-C in the search, answered 'report the best so far': report.json and report.md say
    the search was cut short and at which episode of how many, and --resume, which searches on,
    says it will replace that report."""
    import agents.progress

    @contextlib.contextmanager
    def ctrl_c_at_episode_2(cfg, enabled):
        def on_episode(entry, best):
            if entry["episode"] == 2:
                raise KeyboardInterrupt

        yield on_episode

    real_bar = agents.progress.search_bar
    monkeypatch.setattr(agents.progress, "search_bar", ctrl_c_at_episode_2)
    out = tmp_path / "run"
    argv = [*COMMON, *SEARCH, "--on-interrupt", "report", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["search_interrupted"] is True
    assert report["episodes"] == 2 and report["episodes_planned"] == 3
    assert "2 of 3 episodes: **the search was interrupted**" in (out / "report.md").read_text()

    monkeypatch.setattr(agents.progress, "search_bar", real_bar)
    with caplog.at_level("INFO"):
        assert main(["--resume", str(out), "--no-progress"]) == 0
    assert "holds an earlier report of this run; this run replaces it" in caplog.text
    report = json.loads((out / "report.json").read_text())
    assert report["search_interrupted"] is False and report["episodes"] == 3


def test_the_plan_counts_the_episodes_a_timesteps_search_really_runs(tmp_path, caplog):
    """PPO runs whole rollouts (4 episodes per env): --timesteps 12 on VGG11's 8 layers is 4
    episodes, and the plan said 2."""
    from agents.ppo import timestep_episodes

    out = tmp_path / "run"
    argv = [*COMMON, *SEARCH, "--timesteps", "12", "--out", str(out)]
    with caplog.at_level("INFO"):
        assert main(argv) == 0
    ran = read_json(out / "report.json")["episodes"]
    assert ran == timestep_episodes(12, 8) == 4
    assert (
        f"search: {ran} episodes x 8 layers (--timesteps 12 in whole PPO rollouts)" in caplog.text
    )


# ----------------------------------------------------------------------------- resume: damage


def _no_work(monkeypatch):
    """Fail the test if the run gets as far as loading the data."""
    monkeypatch.setattr(
        "agents.pipeline.load_data", lambda *_: pytest.fail("loaded data before the check")
    )


@pytest.mark.parametrize("content", [{"mine": 1}, [1, 2], {"net": NET}])
def test_resume_of_a_config_json_that_is_not_a_run_s_is_refused(
    content, tmp_path, capsys, monkeypatch
):
    """Every RunConfig field has a default, so a foreign config.json went on as a default run
    (vgg16, the paper preset, CIFAR-10 downloaded)."""
    _no_work(monkeypatch)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(content))
    err = fail(["--resume", str(tmp_path)], capsys, str(config), "not a run_agent.py run config")
    assert "width" in err


@pytest.mark.parametrize(
    "edit",
    [
        {"best": {"policy": "x"}},
        {"best": "x"},
        {"best": {"policy": {"format": 1}, "reward": 1.0}},
        {"episodes": [1, 2, 3]},
        {"invocations": "x"},
        {"invocations": ["x"]},
        {"seconds": "x"},
    ],
)
def test_a_search_state_of_the_wrong_types_says_what_is_left(
    edit, smoke_run, tmp_path, capsys, monkeypatch
):
    """A hand-edited search_state.json raised AttributeError or TypeError wherever it was read."""
    _no_work(monkeypatch)
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    state = read_json(run / "search_state.json")
    if isinstance(edit.get("best"), dict):
        edit = {"best": {**state["best"], **edit["best"]}}
    (run / "search_state.json").write_text(json.dumps({**state, **edit}))
    _resume_refused(run, capsys, "is not a search state written by run_agent.py", "NEW_DIR")


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_resume_writes_a_lost_policy_json_again(damage, smoke_run, tmp_path, caplog):
    """policy.json is written at a new best only: one deleted or cut short since stayed so
    after a resumed run that found no better policy."""
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    (run / "report.json").unlink()  # the fine-tune was interrupted before its first save
    policy = run / "policy.json"
    if damage == "missing":
        policy.unlink()
    else:
        policy.write_bytes(policy.read_bytes()[:40])
    with caplog.at_level("WARNING"):
        assert main(["--resume", str(run), "--no-progress", "--quiet"]) == 0
    assert f"{policy} was {'missing' if damage == 'missing' else 'damaged'}" in caplog.text
    assert read_json(policy) == read_json(run / "search_state.json")["best"]["policy"]
    assert read_json(policy) == read_json(smoke_run / "policy.json"), "as the search wrote it"


def test_a_lost_warm_start_policy_is_written_again_as_the_search_wrote_it(tmp_path):
    from agents.run_dir import restore_policy

    net = build_vgg(NET, width=WIDTH)
    policy = Policy.keep_all(net, net=NET, width=WIDTH).to_dict()
    state = {"best": {"reward": 0.5, "strategy": "sensitivity", "policy": policy}}
    restore_policy(tmp_path, state)
    assert read_json(tmp_path / "policy.json")["meta"]["warm_start"] is True
    chosen = {**policy, "meta": {"final_check": {"chosen": 1, "of": 2}}}
    (tmp_path / "policy.json").write_text(json.dumps(chosen))
    restore_policy(tmp_path, state)
    assert read_json(tmp_path / "policy.json") == chosen, "a readable policy.json is kept"


def test_a_lost_search_state_is_refused_rather_than_started_over(
    smoke_run, tmp_path, capsys, monkeypatch
):
    """Without search_state.json the search began again at episode 1, adding a second copy of
    every episode to episodes.jsonl."""
    _no_work(monkeypatch)
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    (run / "report.json").unlink()
    (run / "search_state.json").unlink()
    _resume_refused(run, capsys, "search_state.json is missing", "episodes.jsonl records episodes")


def _resume_refused(run: Path, capsys, *phrases: str) -> None:
    """--resume of ``run`` fails cleanly, says these and that its policy.json can be replayed,
    and leaves the run as it was."""
    before = _digest(run)
    fail(["--resume", str(run), "--episodes", "5"], capsys, *phrases, "--replay it")
    assert _digest(run) == before


@pytest.mark.parametrize("episodes", [None, "", "\n"])
def test_a_run_stopped_before_its_first_episode_has_no_state_to_lose(episodes, tmp_path):
    """Killed before the search saved anything (config.json and maybe tb/ written, no episode
    recorded): --resume starts its search, as it should."""
    from agents.search_state import read_search_state

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tb").mkdir()
    if episodes is not None:
        (tmp_path / "episodes.jsonl").write_text(episodes)
    assert read_search_state(tmp_path) == {}


def test_odd_inputs_get_a_message_that_names_the_fix(smoke_run, tmp_path, capsys, monkeypatch):
    """Each of these gave a bare or misleading message: a bare tensor as --checkpoint (no fix
    named), a state_dict missing a key (torch's own line), a run's config.json as --replay (no
    hint where the policy is), a file as --resume ("no such directory"), and a hand-edited
    config.json whose methods is a string (read letter by letter: "unknown method 'k'")."""
    _no_work(monkeypatch)
    tensor, partial = tmp_path / "tensor.pt", tmp_path / "partial.pt"
    torch.save(torch.zeros(3), tensor)
    state = build_vgg(NET, width=WIDTH).state_dict()
    state.pop("features.0.weight")
    torch.save(state, partial)
    cases = [
        (["--checkpoint", str(tensor)], ["holds a Tensor", "torch.save(model.state_dict()"]),
        (["--checkpoint", str(partial)], ["features.0.weight", "not a whole vgg11 state_dict"]),
        (["--replay", str(smoke_run / "config.json")], ["a run's config.json", "policy.json"]),
    ]
    for extra, phrases in cases:
        fail([*COMMON, *extra, "--out", str(tmp_path / "out")], capsys, *phrases)
    fail(["--resume", str(tensor)], capsys, "is a file", "run's directory")
    run = tmp_path / "edited"
    shutil.copytree(smoke_run, run)
    config = read_json(run / "config.json")
    (run / "config.json").write_text(json.dumps({**config, "methods": "keep"}))
    fail(["--resume", str(run)], capsys, "methods must be a list", "'keep'")
    assert not (tmp_path / "out").exists()
