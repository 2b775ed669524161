"""Argument guards of the benchmark scripts that a GPU run depends on: a bad combination must
stop at once with a message, not after minutes of (lent) GPU time."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def script(monkeypatch):
    """Import a benchmark script as its own command line would (benchmarks/ on the path)."""
    monkeypatch.syspath_prepend(str(BENCH))

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look it up
        spec.loader.exec_module(module)
        return module

    return load


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--device", "cuda", "--profile"], "--profile times each module with the CPU's clock"),
        (["--device", "cpu", "--graphs"], "--bf16 and --graphs are for --device cuda"),
    ],
)
def test_latency_refuses_what_it_cannot_time_honestly(argv, message, capsys, script):
    latency = script("latency")
    with pytest.raises(SystemExit) as exc:
        latency.parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert latency.parse_args(["--device", "cpu", "--profile"]).profile


def test_compare_prints_a_dash_for_speed_ups_it_did_not_time(script):
    compare = script("compare")
    row = {
        "strategy": "ppo",
        "target": 37.0,
        "seed": 0,
        "ratio": 37.2,
        "macs_reduction": 9.1,
        "proxy_acc": 0.5,
        "test_acc": 0.6,
        "drop": 0.2,
        "search_s": 12.0,
        "speedup_b1": None,
        "speedup_b128": None,
    }
    line = compare._row(row)
    assert line.endswith("| 12 | - | - |"), line
    assert compare._row({**row, "speedup_b1": 2.5, "speedup_b128": 3.0}).endswith(
        "| 2.50x | 3.00x |"
    )


def test_latency_prints_each_batch_table_before_timing_the_next(script, monkeypatch):
    """A GPU run stops the latency step at its time limit (SIGTERM, which flushes nothing): the
    tables of the batches it finished must already be printed and flushed, not held back until
    every batch is timed."""
    latency = script("latency")
    timed = []

    class Stdout(io.StringIO):
        flushed = ""

        def flush(self):
            self.flushed = self.getvalue()

    out = Stdout()
    monkeypatch.setattr(sys, "stdout", out)

    def fake_measure(net, *, batch_size, **kw):
        if batch_size == 8:
            raise KeyboardInterrupt  # stands for the limit's signal arriving during batch 8
        timed.append(batch_size)
        return {"median_ms": 1.0 + len(timed) % 3, "p10_ms": 1.0, "p90_ms": 3.0}

    monkeypatch.setattr(latency, "measure_latency", fake_measure)
    argv = ["--width", "0.125", "--batches", "1,8", "--no-onnx", "--repeats", "1", "--rounds", "1"]
    with pytest.raises(KeyboardInterrupt):
        latency.main(argv)
    assert timed and set(timed) == {1}
    assert "batch 1, " in out.flushed and "| original |" in out.flushed
    assert "batch 8, " not in out.getvalue()


@pytest.mark.slow
def test_compare_gives_every_strategy_a_fresh_proxy(script, monkeypatch, tmp_path, short_cp_fits):
    """Local search shared the study's proxy, whose memo held the heuristic's policy that the
    sensitivity row had scored: its first evaluation was free and it made fewer new ones than
    the PPO row beside it. Each strategy now starts from an empty memo, and rows.json counts the
    new evaluations each made."""
    compare = script("compare")
    real, memo_at_start = compare.strategy_policy, {}

    def spying(name, proxy, *args, **kwargs):
        memo_at_start[name] = len(proxy._memo)
        return real(name, proxy, *args, **kwargs)

    monkeypatch.setattr(compare, "strategy_policy", spying)
    # No pre-filled factor cache (CP-ALS of options no row uses): the rows factorise what they
    # need as a run does (and CP-ALS is capped: what is tested is the memos, not the factors).
    monkeypatch.setattr(compare, "prefill_factors", lambda *a, **k: (0.0, 0))
    monkeypatch.setenv("RL_MTD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    argv = "--width 0.125 --data synthetic:600,200 --baseline-epochs 1 --proxy-size 200 "
    argv += "--targets 8 --strategies sensitivity,local --evaluations 4 --repair-steps 2 "
    argv += f"--bn-batches 2 --finetune-epochs 0 --latency-repeats 0 --no-progress --out-dir {out}"
    monkeypatch.setattr(sys, "argv", ["compare.py", *argv.split()])
    compare.main()
    assert memo_at_start == {"sensitivity": 0, "local": 0}
    rows = {r["strategy"]: r for r in json.loads((out / "rows.json").read_text())}
    assert rows["local"]["evaluations"] == 4
