"""Training, collapse recovery, distillation, evaluation and the BatchNorm re-estimate."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rl_mtd.data import DeviceLoader, Split, normalize
from rl_mtd.decompose import DecomposedConv, conv_layers, rank_for_ratio
from rl_mtd.evaluation import evaluate, reestimate_bn
from rl_mtd.models import build_vgg
from rl_mtd.policy import Policy, apply_policy
from rl_mtd.train import TrainConfig, train


@pytest.fixture(scope="module")
def splits(tiny_splits):
    return tiny_splits


@pytest.fixture(scope="module")
def trained(splits):
    torch.manual_seed(0)
    model = build_vgg("vgg11", width=0.125)
    result = train(
        model,
        splits.train,
        config=TrainConfig(epochs=4, lr=0.05, batch_size=64),
        val_split=splits.proxy,
    )
    return model, result


def test_training_learns_the_synthetic_task(splits, trained):
    model, result = trained
    acc = evaluate(model, splits.test)
    assert acc > 0.5, f"a tiny VGG should learn the synthetic classes, got {acc:.3f}"
    assert result.best_acc == pytest.approx(evaluate(model, splits.proxy))
    assert result.steps == 4 * (len(splits.train) // 64)
    assert all("val_acc" in h for h in result.history)


def test_collapse_is_detected_and_the_best_state_kept(splits, trained):
    model = copy.deepcopy(trained[0])
    before = evaluate(model, splits.proxy)
    # A learning rate far too high, no clipping: SGD diverges within an epoch.
    cfg = TrainConfig(
        epochs=2, lr=50.0, batch_size=64, grad_clip=None, evals_per_epoch=4, max_recoveries=2
    )
    result = train(model, splits.train, config=cfg, val_split=splits.proxy)
    assert result.recoveries >= 1
    after = evaluate(model, splits.proxy)
    assert after >= before, "training must leave the best state it has seen"
    assert after == pytest.approx(result.best_acc)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _scripted_fine_tune(splits, trained, monkeypatch, accs, losses, fresh):
    """A one-epoch run whose held-out accuracies (the first: before training, the best to
    beat), mean training losses and re-estimated accuracy (``fresh``) are scripted; returns the
    result and the steps at which the re-estimate was asked for."""
    import rl_mtd.train as train_mod

    real_checkpoint = train_mod._Run.checkpoint
    steps = len(splits.train) // 64
    assert steps >= 6, "the script needs six evaluations"
    accs = iter([*accs, *[0.65] * steps])
    losses = iter([*losses, *[1.6] * steps])
    asked: list[int] = []

    def scripted_fresh(self):
        asked.append(self.step)
        return fresh

    def scripted_loss(self, lr):
        self._loss_sum, self._loss_n = next(losses), 1
        return real_checkpoint(self, lr)

    monkeypatch.setattr(train_mod, "evaluate", lambda *_a, **_k: next(accs))
    monkeypatch.setattr(train_mod._Run, "checkpoint", scripted_loss)
    monkeypatch.setattr(train_mod._Run, "fresh_bn_accuracy", scripted_fresh)
    cfg = TrainConfig(epochs=1, lr=0.01, batch_size=64, evals_per_epoch=steps)
    model = copy.deepcopy(trained[0])
    return train(model, splits.train, config=cfg, val_split=splits.proxy), asked


@pytest.mark.parametrize(
    "rising, fresh, recoveries", [(False, None, 0), (True, 0.50, 1), (True, 0.63, 0)]
)
def test_a_held_out_dip_while_the_loss_falls_is_not_a_collapse(
    rising, fresh, recoveries, splits, trained, monkeypatch
):
    """At a high rate one evaluation can fall far below the best while training goes well (a
    32x fine-tune: 0.642 -> 0.534 at epoch 5 with the loss still falling; the recovery cut the
    rate for 35 epochs and cost 2-3 points), or only because the running BatchNorm statistics
    are stale (a 50x fine-tune: 0.514 -> 0.369, 0.485 with them re-estimated). Scripted held-out
    accuracies: with a falling loss the dip is logged, nothing restored; with a rising loss it
    is a collapse only when the accuracy with re-estimated statistics fell too."""
    accs = [0.55, 0.60, 0.62, 0.64, 0.50]
    losses = [2.0, 1.9, 1.8, 2.5 if rising else 1.7]
    result, asked = _scripted_fine_tune(splits, trained, monkeypatch, accs, losses, fresh)
    assert result.recoveries == recoveries, (rising, fresh, result.history)
    dip = result.history[3]
    assert dip["val_acc"] == 0.50
    assert ("recovered" in dip) is bool(recoveries) and ("dip" in dip) is (recoveries == 0)
    assert len(asked) == int(rising), "statistics are re-estimated only for a fall the loss shares"
    assert dip.get("val_acc_bn") == fresh


def test_a_fall_right_after_a_recovery_is_judged_not_waved_through(splits, trained, monkeypatch):
    """After a recovery the last logged loss is that of the weights it threw away, so any loss
    of the restored weights looked lower: a second collapse passed as a dip (a review's run at lr
    3.0: held-out 0.095, loss 2.344 against the discarded 18.764, "going on")."""
    accs = [0.55, 0.60, 0.62, 0.64, 0.50, 0.50]
    losses = [2.0, 1.9, 1.8, 2.5, 2.3]  # 2.3: below the discarded weights' 2.5
    result, asked = _scripted_fine_tune(splits, trained, monkeypatch, accs, losses, 0.50)
    assert result.recoveries == 2, result.history
    assert len(asked) == 2 and "recovered" in result.history[4], result.history


def test_the_re_estimate_check_leaves_the_model_and_its_statistics_as_they_were(splits, trained):
    """fresh_bn_accuracy: held-out accuracy with BatchNorm statistics recomputed; stale running
    statistics (here scrambled) cost accuracy that the re-estimate gives back, and afterwards
    every weight and statistic is what it was (training goes on unchanged)."""
    import rl_mtd.train as train_mod

    model = copy.deepcopy(trained[0])
    good = evaluate(model, splits.proxy)
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.add_(torch.randn(m.running_mean.shape, generator=gen))
            m.running_var.mul_(5.0)
    stale = evaluate(model, splits.proxy)
    assert stale < good - 0.1, "scrambled statistics must cost accuracy for this test to mean much"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(epochs=1, batch_size=64)
    run = train_mod._Run(
        model, cfg, splits.proxy, None, "test", 10, fresh=False, train_split=splits.train
    )
    rng = torch.get_rng_state()
    momenta = [m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    fresh = run.fresh_bn_accuracy()
    assert fresh > stale + 0.1 and fresh >= good - 0.05
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.training
    assert torch.equal(torch.get_rng_state(), rng), "no random state drawn"
    assert momenta == [m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def _kl_to(teacher: nn.Module, student: nn.Module, x: torch.Tensor, temperature: float) -> float:
    teacher.eval()
    student.eval()
    with torch.no_grad():
        t = (teacher(x) / temperature).log_softmax(1)
        s = (student(x) / temperature).log_softmax(1)
    return float((t.exp() * (t - s)).sum(1).mean())


def test_distillation_pulls_the_student_towards_the_teacher(splits, trained):
    """The same student, data and steps with kd_alpha 0.9 and 0: only the teacher term differs,
    so if the loss ignored the teacher both runs would end identical."""
    teacher = trained[0]
    torch.manual_seed(1)
    start = build_vgg("vgg11", width=0.125)
    x = normalize(splits.proxy.x[:200])
    students = {}
    for alpha in (0.0, 0.9):
        student = copy.deepcopy(start)
        cfg = TrainConfig(epochs=2, lr=0.05, batch_size=64, kd_alpha=alpha, seed=0)
        train(student, splits.train, config=cfg, teacher=teacher)
        students[alpha] = student
    t = TrainConfig().kd_temperature  # the temperature the distillation term matches at
    assert _kl_to(teacher, students[0.9], x, t) < 0.8 * _kl_to(teacher, students[0.0], x, t)


def _block_errors(teacher, student, x) -> float:
    """Mean relative squared error of the student's decomposed blocks against the teacher's
    layers of the same name, on ``x``."""
    outs: dict[tuple[str, str], torch.Tensor] = {}
    names = [n for n, m in student.named_modules() if isinstance(m, DecomposedConv)]
    handles = [
        model.get_submodule(n).register_forward_hook(
            lambda _m, _i, out, key=(side, n): outs.__setitem__(key, out)
        )
        for side, model in (("s", student), ("t", teacher))
        for n in names
    ]
    student.eval()
    with torch.no_grad():
        student(x), teacher(x)
    for h in handles:
        h.remove()
    return sum(
        float((outs["s", n] - outs["t", n]).pow(2).mean() / outs["t", n].pow(2).mean())
        for n in names
    ) / len(names)


def _tucker2_student(teacher: nn.Module, ratio: float) -> nn.Module:
    """The teacher with every conv but the first decomposed by Tucker-2 at ``ratio``."""
    convs = conv_layers(teacher)
    policy = Policy.from_choices(
        teacher,
        [("keep", None)] + [("tucker2", rank_for_ratio(c, "tucker2", ratio)) for _, c in convs[1:]],
        net="vgg11",
        width=0.125,
    )
    return apply_policy(teacher, policy)


def test_feature_distillation_pulls_each_block_towards_its_layer(splits, trained):
    """Uniform Tucker-2 at 2x, the same steps with feature_kd 20 and 0: the distilled blocks end
    closer to the original layers' outputs on held-out images, and no hook is left behind."""
    teacher = trained[0].eval()
    start = _tucker2_student(teacher, 2)
    x = normalize(splits.proxy.x[:200])
    errors = {}
    for weight in (0.0, 20.0):
        student = copy.deepcopy(start)
        cfg = TrainConfig(epochs=4, lr=0.02, batch_size=64, feature_kd=weight, seed=0)
        train(student, splits.train, config=cfg, teacher=teacher)
        errors[weight] = _block_errors(teacher, student, x)
        hooked = [m for m in (*student.modules(), *teacher.modules()) if m._forward_hooks]
        assert not hooked, "train() must remove its feature hooks"
    assert errors[20.0] < 0.6 * errors[0.0], errors


def test_steps_and_progress_callback(splits):
    seen = []
    model = build_vgg("vgg11", width=0.125)
    result = train(
        model,
        splits.train,
        config=TrainConfig(steps=5, batch_size=64, evals_per_epoch=1),
        on_progress=seen.append,
    )
    assert result.steps == 5
    assert [p.step for p in seen] == [1, 2, 3, 4, 5] and {p.total for p in seen} == {5}
    assert seen[-1].loss is not None, "the last step reports the mean loss"


def test_reestimate_bn_matches_the_data_statistics():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    model = nn.Sequential(conv, nn.BatchNorm2d(4))
    images = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8)
    split = Split(images, torch.zeros(256, dtype=torch.int64))
    model.eval()
    reestimate_bn(model, split, batches=100, batch_size=64)  # all 4 batches
    with torch.no_grad():
        feats = conv(normalize(images))
    expected = feats.mean(dim=(0, 2, 3))
    assert torch.allclose(model[1].running_mean, expected, atol=1e-4)
    assert model[1].momentum == 0.1, "the BN momentum must be restored"
    assert not model.training, "the caller's eval mode must be restored"


def test_train_config_rejects_bad_values():
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="kd_alpha"):
        TrainConfig(kd_alpha=2.0)
    with pytest.raises(ValueError, match="feature_kd"):
        TrainConfig(feature_kd=-1.0)


def test_too_small_training_split_is_a_clear_error(splits):
    tiny = Split(splits.train.x[:10], splits.train.y[:10])
    with pytest.raises(ValueError, match="smaller than one batch"):
        train(build_vgg("vgg11", width=0.125), tiny, config=TrainConfig(batch_size=64))


def _stop_at(step: int):
    def on_progress(p) -> None:
        if p.step == step:
            raise KeyboardInterrupt

    return on_progress


def test_an_interrupted_training_goes_on_exactly_where_it_stopped(splits, trained, tmp_path):
    """Ctrl-C mid-epoch, then the same call again: the same weights, best state and history as
    one uninterrupted run (distillation and the held-out guard included)."""
    teacher = trained[0].eval()
    start = _tucker2_student(teacher, 4)
    cfg = TrainConfig(epochs=3, lr=0.02, batch_size=64, feature_kd=1.0, evals_per_epoch=2, seed=1)
    kwargs = {"config": cfg, "val_split": splits.proxy, "teacher": teacher}
    whole = copy.deepcopy(start)
    expected = train(whole, splits.train, **kwargs)
    steps_per_epoch = len(splits.train) // 64
    eval_every = steps_per_epoch // 2
    stop = steps_per_epoch + eval_every + 1  # mid-epoch, one step after an evaluation
    assert eval_every > 1 and stop % eval_every

    state = tmp_path / "ft_state.pt"
    resumed = copy.deepcopy(start)
    with pytest.raises(KeyboardInterrupt):
        train(resumed, splits.train, **kwargs, state_path=state, on_progress=_stop_at(stop))
    assert state.exists(), "the last evaluation before Ctrl-C must have been saved"
    saved_step = torch.load(state, weights_only=True)["step"]
    assert saved_step == stop - 1
    # A job of another key (another policy) does not take the state; it starts over.
    other = copy.deepcopy(start)
    with pytest.raises(KeyboardInterrupt):
        train(
            other,
            splits.train,
            **kwargs,
            state_path=state,
            state_key="other",
            on_progress=_stop_at(1),
        )
    assert torch.load(state, weights_only=True)["step"] == saved_step, "left alone"
    seen = []
    result = train(
        resumed,
        splits.train,
        **kwargs,
        state_path=state,
        on_progress=lambda p: seen.append(p.step),
    )
    assert seen[0] == saved_step + 1, "goes on after the saved step, not from the start"
    assert torch.load(state, weights_only=True)["step"] == expected.steps, "the last step too"
    assert result.steps == expected.steps and result.history == expected.history
    assert result.best_acc == expected.best_acc
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_failed_save_does_not_stop_training(splits, tmp_path, caplog):
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("")
    model = build_vgg("vgg11", width=0.125)
    cfg = TrainConfig(steps=4, batch_size=64, evals_per_epoch=4)
    with caplog.at_level("WARNING"):
        result = train(model, splits.train, config=cfg, state_path=blocked / "state.pt")
    assert result.steps == 4
    assert caplog.text.count("cannot save its state") == 1, "warned once, then no more tries"


def test_schedules_warm_up_then_decay_or_hold():
    from rl_mtd.train import _lr_factor

    for schedule in ("cosine", "constant"):
        assert _lr_factor(schedule, 0.0) == pytest.approx(0.1)
        assert _lr_factor(schedule, 0.03) == pytest.approx(1.0)
    # cosine anneals to zero; constant holds the peak to the end (a long run's first steps)
    assert _lr_factor("cosine", 1.0) == pytest.approx(0.0)
    assert _lr_factor("cosine", 0.5) < 0.6
    assert [_lr_factor("constant", t) for t in (0.2, 0.5, 1.0)] == [1.0, 1.0, 1.0]
    assert _lr_factor("onecycle", 0.1) < 1.0  # its warm-up is longer


def test_a_reported_accuracy_is_measured_in_float32(splits, trained, monkeypatch):
    """The proxy evaluates under bf16 autocast on CUDA; a report's test accuracy is measured in
    float32, as the saved and exported model runs (the autocast is not entered at all)."""
    import rl_mtd.evaluation as evaluation

    entered = []

    def spy(device):
        entered.append(device)
        return contextlib.nullcontext()

    model, _ = trained
    monkeypatch.setattr(evaluation, "autocast", spy)
    fast = evaluate(model, splits.proxy)
    assert len(entered) == 1
    exact = evaluate(model, splits.proxy, full_precision=True)
    assert len(entered) == 1 and exact == fast  # the same arithmetic on the CPU


def test_batches_are_channels_last_where_measured_faster(monkeypatch):
    """The layout choice: CUDA and x86 CPUs get NHWC batches, other CPUs NCHW; the variable
    overrides both ways, and a value it does not know is a clear error."""
    import rl_mtd.data.loader as loader_mod
    from rl_mtd.data import channels_last_inputs
    from rl_mtd.errors import RlMtdError

    monkeypatch.delenv("RL_MTD_CHANNELS_LAST", raising=False)
    for machine, expected in (("x86_64", True), ("AMD64", True), ("aarch64", False)):
        monkeypatch.setattr(loader_mod.platform, "machine", lambda m=machine: m)
        assert channels_last_inputs("cpu") is (expected and torch.backends.mkldnn.is_available())
        assert channels_last_inputs(torch.device("cuda")) is True
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    assert channels_last_inputs("cpu") is False, "without oneDNN NHWC is not the measured path"
    monkeypatch.setenv("RL_MTD_CHANNELS_LAST", "0")
    assert channels_last_inputs("cuda") is False
    monkeypatch.setenv("RL_MTD_CHANNELS_LAST", "1")
    assert channels_last_inputs("cpu") is True
    monkeypatch.setenv("RL_MTD_CHANNELS_LAST", "yes")
    with pytest.raises(RlMtdError, match="RL_MTD_CHANNELS_LAST='yes'.*1.*0"):
        channels_last_inputs("cpu")

    x = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    split = Split(x, torch.zeros(10, dtype=torch.long))
    nhwc, _ = next(iter(DeviceLoader(split, 4, channels_last=True)))
    nchw, _ = next(iter(DeviceLoader(split, 4)))
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and not nhwc.is_contiguous()
    assert nchw.is_contiguous() and torch.equal(nhwc, nchw)


@pytest.mark.parametrize("method", ["tucker2", "cp"])
def test_training_and_evaluation_agree_across_batch_layouts(splits, trained, monkeypatch, method):
    """NHWC batches change which kernels run, not the arithmetic: the same fine-tune of a
    decomposed net from the same start, with NCHW and with channels_last batches, moves the
    weights the same way (not bit for bit: a ReLU whose input sits within rounding of zero may
    pass a gradient in one layout and not the other), and evaluation agrees."""
    convs = conv_layers(trained[0])
    choices = [("keep", None)] + [(method, rank_for_ratio(c, method, 4.0)) for _, c in convs[1:]]
    policy = Policy.from_choices(trained[0], choices, net="vgg11", width=0.125)
    start = apply_policy(trained[0], policy)
    before = {k: v for k, v in start.state_dict().items() if v.is_floating_point()}
    moves, accs, logits = [], [], []
    x = next(iter(DeviceLoader(splits.proxy, 100)))[0]
    for layout in ("0", "1"):
        monkeypatch.setenv("RL_MTD_CHANNELS_LAST", layout)
        net = copy.deepcopy(start)
        train(net, splits.train, config=TrainConfig(steps=6, lr=0.01, batch_size=64, seed=3))
        after = net.state_dict()
        moves.append(torch.cat([(after[k] - v).flatten() for k, v in before.items()]))
        accs.append(evaluate(trained[0], splits.proxy))
        with torch.no_grad():
            batch = x.contiguous(memory_format=torch.channels_last) if layout == "1" else x
            logits.append(trained[0].eval()(batch))
    assert float(moves[0].norm()) > 0
    assert float(F.cosine_similarity(moves[0], moves[1], dim=0)) > 0.999
    assert accs[0] > 0.5 and accs[0] == pytest.approx(accs[1], abs=1 / len(splits.proxy))
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["0", "1"])
def test_every_batch_the_library_draws_follows_the_layout(splits, trained, monkeypatch, layout):
    """Training, evaluation, the BatchNorm re-estimate and the data-aware fit's moments all feed
    the net batches in the layout ``channels_last_inputs`` chose (here forced each way)."""
    from rl_mtd.datafit import collect_input_moments

    monkeypatch.setenv("RL_MTD_CHANNELS_LAST", layout)
    net = copy.deepcopy(trained[0])
    first = conv_layers(net)[0][1]
    seen: list[bool] = []
    hook = first.register_forward_pre_hook(
        lambda _m, args: seen.append(
            args[0].is_contiguous(memory_format=torch.channels_last) and not args[0].is_contiguous()
        )
    )
    calls = {
        "train": lambda: train(net, splits.train, config=TrainConfig(steps=2, batch_size=64)),
        "evaluate": lambda: evaluate(net, splits.proxy),
        "reestimate_bn": lambda: reestimate_bn(net, splits.train, batches=2),
        "collect_input_moments": lambda: collect_input_moments(net, splits.train, images=64),
    }
    for what, call in calls.items():
        seen.clear()
        call()
        assert seen and all(s == (layout == "1") for s in seen), what
    hook.remove()
    assert all(p.is_contiguous() for p in net.parameters()), "CPU weights stay NCHW"
