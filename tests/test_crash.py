"""Crash safety: a search killed hard resumes; a full disk leaves earlier files intact."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from agents.cli import main
from rl_mtd.checkpoints import save_baseline
from rl_mtd.decompose import FactorCache
from rl_mtd.io import CACHE_ENV, write_json_atomic
from rl_mtd.models import build_vgg

ROOT = Path(__file__).resolve().parents[1]
RUN = [
    "--net",
    "vgg11",
    "--width",
    "0.125",
    "--preset",
    "smoke",
    "--no-progress",
    "--data",
    "synthetic:600,200",
    "--proxy-size",
    "200",
    "--test-size",
    "200",
    "--baseline-epochs",
    "1",
    "--finetune-epochs",
    "0.2",
    "--levels",
    "16,32,64,128",
    "--target-ratio",
    "8",
    "--device",
    "cpu",
]


def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.slow
def test_search_killed_hard_resumes_from_the_last_save(tmp_path, _isolated_cache):
    out = tmp_path / "run"
    env = {
        **os.environ,
        CACHE_ENV: str(_isolated_cache),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    child = subprocess.Popen(
        [sys.executable, str(ROOT / "run_agent.py"), *RUN, "--episodes", "500", "--out", str(out)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    state_file = out / "search_state.json"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and child.poll() is None:
            if state_file.exists() and len(json.loads(state_file.read_text())["episodes"]) >= 6:
                break
            time.sleep(0.05)
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    saved = json.loads(state_file.read_text())["episodes"]
    assert len(saved) >= 6 and (out / "agent.zip").exists() and (out / "config.json").exists()
    assert not (out / "report.json").exists(), "killed during the search"

    rc = main(["--resume", str(out), "--episodes", str(len(saved) + 3), "--no-progress", "--quiet"])
    assert rc == 0
    state = json.loads(state_file.read_text())
    assert state["episodes"][: len(saved)] == saved, "the saved episodes are kept, not rerun"
    assert len(state["episodes"]) == len(saved) + 3
    report = json.loads((out / "report.json").read_text())
    assert report["episodes"] == len(saved) + 3
    lines = (out / "episodes.jsonl").read_text().splitlines()
    assert [json.loads(x)["episode"] for x in lines] == list(range(1, len(saved) + 4))


@pytest.mark.parametrize("writer", ["json", "torch", "png"])
def test_full_disk_keeps_the_earlier_file(writer, tmp_path, monkeypatch):
    """A write that fails half-way raises an error naming the file and leaves the old one."""
    from agents import report

    target = tmp_path / {"json": "report.json", "torch": "baseline.pt", "png": "layers.png"}[writer]
    rows = [{"name": "features.0", "method": "keep", "params_before": 10, "params": 10}]
    write = {
        "json": lambda: write_json_atomic(target, {"ok": writer}),
        "torch": lambda: save_baseline(
            target, build_vgg("vgg11", width=0.125), net="vgg11", width=0.125
        ),
        "png": lambda: report.plot_layers(target, rows),
    }[writer]
    write()
    before = target.read_bytes()
    if writer == "json":
        monkeypatch.setattr(Path, "write_text", _enospc)
    elif writer == "torch":
        monkeypatch.setattr(torch, "save", _enospc)
    else:
        monkeypatch.setattr(report.Figure, "savefig", _enospc)
    with pytest.raises(OSError) as excinfo:
        write()
    assert excinfo.value.errno == errno.ENOSPC
    assert excinfo.value.filename == str(target), "the error names the file being written"
    assert target.read_bytes() == before
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_get_the_mode_of_an_ordinary_new_file(umask, tmp_path):
    """The temporary file is renamed into place, so its mode is the result's: as ``open`` would
    give, not mkstemp's owner-only 0600."""
    old = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "report.json", {"ok": True})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "report.json").stat().st_mode) == 0o666 & ~umask
    (tmp_path / "report.json").chmod(0o600)  # the user's choice survives a rewrite
    write_json_atomic(tmp_path / "report.json", {"ok": False})
    assert stat.S_IMODE((tmp_path / "report.json").stat().st_mode) == 0o600


def test_an_atomic_write_works_where_modes_cannot_be_set(tmp_path, monkeypatch):
    def refuse(*_args, **_kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "chmod", refuse)
    write_json_atomic(tmp_path / "report.json", {"ok": True})
    assert json.loads((tmp_path / "report.json").read_text()) == {"ok": True}
    assert _leftovers(tmp_path) == []


def test_full_disk_while_saving_the_agent(tmp_path, monkeypatch):
    import gymnasium as gym
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv

    from agents.ppo import make_ppo, read_agent_meta, save_agent

    agent = make_ppo(DummyVecEnv([lambda: gym.make("CartPole-v1")]), 8)
    path = tmp_path / "agent.zip"
    save_agent(agent, path, {"net": "vgg11", "width": 0.125, "methods": [], "levels": []})
    before = path.read_bytes()

    def half_written(self, save_path, *args, **kwargs):
        Path(save_path).write_bytes(b"PK\x03\x04 half a zip")
        _enospc()

    monkeypatch.setattr(PPO, "save", half_written)
    with pytest.raises(OSError) as excinfo:
        save_agent(agent, path, {"net": "vgg11", "width": 0.125, "methods": [], "levels": []})
    assert excinfo.value.filename == str(path)
    assert path.read_bytes() == before
    assert read_agent_meta(path)["net"] == "vgg11"
    assert _leftovers(tmp_path) == []


def test_full_disk_in_the_factor_cache_is_only_a_warning(tmp_path, monkeypatch, caplog):
    cache = FactorCache(tmp_path / "factors")
    monkeypatch.setattr(torch, "save", _enospc)
    cache.put("k", {"a": torch.ones(2)})
    assert cache.get("k") is not None, "kept in memory"
    assert "could not write factor cache" in caplog.text
    assert not list((tmp_path / "factors").rglob("*.tmp"))


def test_full_disk_during_a_run_is_one_clear_line(tmp_path, monkeypatch, capsys):
    """The report cannot be written: exit 1, a line naming the file, the run's other files kept."""
    from agents import report

    out = tmp_path / "run"
    real = report.write_markdown
    monkeypatch.setattr(report, "write_markdown", lambda path, _r: _enospc_at(path))
    rc = main([*RUN, "--episodes", "2", "--quiet", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "No space left on device" in err and "report.md" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert (out / "policy.json").exists() and (out / "compressed.pt").exists()
    assert _leftovers(out) == []
    # Space freed, --resume finishes the report (it is not refused as complete).
    monkeypatch.setattr(report, "write_markdown", real)
    assert main(["--resume", str(out), "--quiet"]) == 0, capsys.readouterr().err
    assert (out / "report.md").exists() and (out / "layers.png").exists()


def _enospc_at(path: Path):
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


@pytest.mark.parametrize(("free", "code"), [(1 << 20, errno.ENOSPC), (1 << 40, errno.EIO)])
def test_torch_s_own_write_error_becomes_an_os_error(free, code, tmp_path, monkeypatch):
    """torch's zip writer reports a full disk as a RuntimeError ("unexpected pos ..."); it
    reaches callers as the OSError every other write raises, naming the file, so the CLI's one
    clear line and the fine-tune's warn-and-go-on handle it, and the earlier file is kept."""
    import shutil
    from types import SimpleNamespace

    from rl_mtd.io import torch_save_atomic

    target = tmp_path / "state.pt"
    torch_save_atomic({"a": 1}, target)
    before = target.read_bytes()

    def broken(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 32")

    monkeypatch.setattr(torch, "save", broken)
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: SimpleNamespace(free=free))
    with pytest.raises(OSError) as excinfo:
        torch_save_atomic({"a": 2}, target)
    assert excinfo.value.errno == code
    assert excinfo.value.filename == str(target)
    assert target.read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_a_full_disk_in_torch_save_during_a_run_is_one_clear_line(tmp_path, monkeypatch, capsys):
    """The real failure a full disk gave (torch's RuntimeError in the fine-tune's state save,
    then in compressed.pt): the fine-tune warns and goes on; the run ends with one line saying
    to free space, no traceback."""
    import shutil
    from types import SimpleNamespace

    from agents import pipeline

    real_save = torch.save

    def full(obj, f, *args, **kwargs):
        if "finetune_state" in str(f) or "compressed.pt" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: SimpleNamespace(free=0))
    out = tmp_path / "run"
    rc = main([*RUN, "--episodes", "2", "--quiet", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "No space left on device" in err and "compressed.pt" in err and "free some space" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert (out / "policy.json").exists(), "the search's result is kept"
    assert pipeline.FINETUNE_STATE == "finetune_state.pt"


@pytest.mark.parametrize("where", ["file", "proc"])
def test_an_unwritable_out_is_refused_before_any_work(where, tmp_path, capsys, monkeypatch):
    """--out below a file (or somewhere nothing can be created) fails at once, before data and
    the baseline, with advice that fits (not "free space")."""
    monkeypatch.setattr(
        "agents.pipeline.load_data", lambda *_: pytest.fail("loaded data before the check")
    )
    if where == "file":
        blocker = tmp_path / "a-file"
        blocker.write_text("x")
        out = blocker / "run"
    else:
        out = Path("/proc/rl_mtd_no_such_dir/run")
    rc = main([*RUN, "--episodes", "2", "--quiet", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err  # a user's input, as every other bad option
    assert f"--out {out} cannot be written" in err
    assert "pick a writable directory for --out" in err and "free some space" not in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_check_writable_creates_nothing(tmp_path):
    from rl_mtd.io import check_writable

    target = tmp_path / "new" / "deeper" / "run"
    check_writable(target)
    assert list(tmp_path.iterdir()) == [], "neither the directory nor a probe file is left"
    (tmp_path / "f").write_text("x")
    with pytest.raises(OSError) as excinfo:
        check_writable(tmp_path / "f" / "run")
    assert excinfo.value.errno == errno.ENOTDIR


def test_a_benchmark_script_ends_a_full_disk_with_one_line(capsys):
    """Benchmark scripts run under ``exit_on_user_error``: a full disk is one line and status 1;
    any other OS error (a missing file read, say) keeps its traceback."""
    from rl_mtd.errors import exit_on_user_error

    def full():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/x/rows.json")

    with pytest.raises(SystemExit) as stop:
        exit_on_user_error(full)
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "/x/rows.json" in err and "free some space" in err

    def missing():
        raise FileNotFoundError(errno.ENOENT, "No such file", "p.json")

    with pytest.raises(FileNotFoundError):
        exit_on_user_error(missing)


def test_a_baseline_the_full_cache_cannot_keep_is_kept_in_the_run(tmp_path, monkeypatch, caplog):
    """The cache's disk filled while the baseline trained: the weights were lost and the run
    ended. Now they go to the run directory as baseline.pt, the run goes on with them, its
    config.json names that file, --resume loads it (it trained a new one), and it serves as
    --checkpoint."""
    real_save = torch.save

    def cache_full(obj, f, *args, **kwargs):
        if f"{os.sep}baselines{os.sep}" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")
        return real_save(obj, f, *args, **kwargs)

    import shutil
    from types import SimpleNamespace

    monkeypatch.setattr(torch, "save", cache_full)
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: SimpleNamespace(free=0))
    out = tmp_path / "run"
    assert main([*RUN, "--episodes", "2", "--quiet", "--out", str(out)]) == 0
    kept = out / "baseline.pt"
    assert json.loads((out / "config.json").read_text())["baseline_path"] == str(kept)
    assert (
        "could not keep the trained baseline" in caplog.text
        and f"--checkpoint {kept}" in caplog.text
    )
    monkeypatch.setattr(torch, "save", real_save)
    (out / "report.json").unlink()  # as if stopped in its fine-tune: --resume goes on with it
    monkeypatch.setattr("agents.inputs.train", lambda *_a, **_k: pytest.fail("trained again"))
    with caplog.at_level("INFO", logger="rl_mtd"):
        assert main(["--resume", str(out), "--no-progress"]) == 0
    assert "baseline: this run's own" in caplog.text and (out / "report.json").exists()
    no_search = RUN[: RUN.index("--levels")]  # a replay takes no search settings
    replay = [*no_search, "--replay", str(out / "policy.json"), "--checkpoint", str(kept)]
    assert main([*replay, "--quiet", "--out", str(tmp_path / "again")]) == 0


def test_one_job_at_a_time_writes_into_a_run_directory(tmp_path, capsys):
    """Two jobs started into one --out interleaved their episodes.jsonl and mixed their files.
    A job now holds a lock there (flock on .run.lock); a second is refused naming it, also on
    --resume; a job killed hard (SIGKILL) frees it, the file it leaves blocks nothing."""
    import socket

    from agents.run_lock import LOCK_FILE, RunLock

    run = tmp_path / "run"
    with RunLock() as lock:
        lock.take(run)
        holder = json.loads((run / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    assert not run.exists(), "released when the job ends, and the folder it made, left empty"
    run.mkdir()
    with RunLock() as lock:
        lock.take(run)
    assert run.is_dir() and not (run / LOCK_FILE).exists(), "a folder the user made stays"
    hold = (
        "import fcntl, json, os, socket, sys, time\n"
        f"fd = os.open({str(run / LOCK_FILE)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, json.dumps({'pid': os.getpid(), 'host': socket.gethostname()}).encode())\n"
        "print('held', flush=True)\n"
        "time.sleep(120)\n"
    )
    other = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "held"
        rc = main([*RUN, "--episodes", "2", "--quiet", "--out", str(run)])
        err = capsys.readouterr().err
        assert rc == 2 and f"in use by another run_agent.py job (process {other.pid} on" in err
        assert "pass another --out" in err
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE], "nothing written"
    finally:
        other.kill()
        other.wait()
    assert (run / LOCK_FILE).exists(), "a job killed hard leaves its lock file"
    assert main([*RUN, "--episodes", "2", "--quiet", "--out", str(run)]) == 0
    assert (run / "report.json").exists() and not (run / LOCK_FILE).exists()
    with RunLock() as lock:  # a --resume while this run is going on
        lock.take(run)
        rc = main(["--resume", str(run), "--episodes", "3", "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2 and f"then --resume {run} again" in err
