"""Tests for policies (rl_mtd.policy) and checkpoints (rl_mtd.checkpoints)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from rl_mtd.checkpoints import load_baseline, save_baseline
from rl_mtd.decompose import (
    DecomposedConv,
    FactorCache,
    conv_layers,
    layer_params,
    rank_for_ratio,
)
from rl_mtd.errors import RlMtdError
from rl_mtd.metrics import count_params
from rl_mtd.models import build_vgg
from rl_mtd.policy import LayerChoice, Policy, apply_policy, load_compressed, save_compressed

WIDTH = 0.125
# One (method, ratio) per vgg11 conv: a mix of keep, Tucker-2 and CP.
MIXED = [
    ("keep", 1),
    ("tucker2", 4),
    ("cp", 8),
    ("tucker2", 8),
    ("cp", 4),
    ("keep", 1),
    ("tucker2", 16),
    ("cp", 16),
]


def _model(net: str = "vgg11", seed: int = 0):
    torch.manual_seed(seed)
    return build_vgg(net, width=WIDTH)


def _mixed_policy(model) -> Policy:
    choices = [
        (method, rank_for_ratio(conv, method, ratio))
        for (_, conv), (method, ratio) in zip(conv_layers(model), MIXED)
    ]
    return Policy.from_choices(model, choices, net="vgg11", width=WIDTH, meta={"note": "test"})


@pytest.fixture
def model():
    return _model()


@pytest.fixture
def policy(model) -> Policy:
    return _mixed_policy(model)


# ----------------------------------------------------------------------------- applying


def test_apply_policy_params_match_prediction(model, policy: Policy) -> None:
    assert policy.methods() == [m for m, _ in MIXED]
    compressed = apply_policy(model, policy, cache=FactorCache())
    predicted = policy.predicted_params(model)
    assert count_params(compressed) == predicted
    assert predicted < count_params(model)

    # The same total from the per-layer ratios alone.
    convs = conv_layers(model)
    conv_before = sum(layer_params(c) for _, c in convs)
    conv_after = sum(layer_params(c) / ch.ratio for (_, c), ch in zip(convs, policy.layers))
    from_ratios = count_params(model) - conv_before + conv_after
    assert from_ratios == pytest.approx(predicted, rel=1e-9)
    ratio = count_params(model) / count_params(compressed)
    assert ratio == pytest.approx(count_params(model) / from_ratios, rel=1e-9)
    assert ratio > 1


def test_apply_policy_returns_a_copy_with_blocks(model, policy: Policy) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compressed = apply_policy(model, policy, cache=FactorCache())
    assert compressed is not model
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"apply_policy changed the original model ({k})"
    for (name, _), choice in zip(conv_layers(model), policy.layers):
        sub = compressed.get_submodule(name)
        if choice.method == "keep":
            assert isinstance(sub, torch.nn.Conv2d)
        else:
            assert isinstance(sub, DecomposedConv) and sub.method == choice.method
    out = compressed.eval()(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_keep_all_policy_is_lossless(model) -> None:
    policy = Policy.keep_all(model, net="vgg11", width=WIDTH)
    compressed = apply_policy(model, policy)
    assert count_params(compressed) == count_params(model) == policy.predicted_params(model)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(compressed.eval()(x), model.eval()(x))


def test_vgg11_policy_refused_on_vgg16(policy: Policy) -> None:
    vgg16 = _model("vgg16")
    names = [n for n, _ in conv_layers(vgg16)]
    # vgg11's second conv is 128x64 at width 1; vgg16's second conv is 64x64: the first mismatch.
    first_bad = names[1]
    with pytest.raises(RlMtdError) as exc:
        apply_policy(vgg16, policy)
    assert first_bad in str(exc.value)
    assert "vgg11" in str(exc.value)
    with pytest.raises(RlMtdError, match=first_bad.replace(".", r"\.")):
        policy.predicted_params(vgg16)


def test_policy_refused_on_a_model_whose_layers_have_other_names(model, policy: Policy) -> None:
    wrapped = nn.Sequential(model)  # same kernels, every name now starts with "0."
    with pytest.raises(RlMtdError, match=r"'0\.features\.0'"):
        apply_policy(wrapped, policy)


def test_a_policy_made_in_memory_is_refused_on_another_width(model) -> None:
    """Without kernel shapes (a Policy built from LayerChoices) nothing but the net and width
    tell the layers apart: a width-0.125 policy went onto a width-0.25 VGG11 without a word."""
    bare = Policy(
        "vgg11",
        WIDTH,
        [LayerChoice(name, "tucker2", (2, 2), 1.0) for name, _ in conv_layers(model)],
    )
    assert all(c.shape is None for c in bare.layers)
    wider = build_vgg("vgg11", width=2 * WIDTH)
    with pytest.raises(RlMtdError, match=f"width {2 * WIDTH:g}"):
        apply_policy(wider, bare)
    assert apply_policy(model, bare) is not model  # the model it was made for takes it


def test_policy_with_wrong_choice_count_refused(model) -> None:
    with pytest.raises(RlMtdError, match="conv layers"):
        Policy.from_choices(model, [("keep", None)] * 7, net="vgg11", width=WIDTH)


# ----------------------------------------------------------------------------- JSON


def test_policy_json_round_trip(tmp_path, policy: Policy) -> None:
    path = tmp_path / "policy.json"
    policy.save(path)
    loaded = Policy.load(path)
    assert loaded == policy
    data = json.loads(path.read_text())
    assert data["format"] == 1 and data["net"] == "vgg11" and data["width"] == WIDTH
    assert [tuple(layer["shape"]) for layer in data["layers"]] == [c.shape for c in policy.layers]
    # And the reloaded policy builds the same compressed model.
    model = _model()
    x = torch.randn(1, 3, 32, 32)
    a = apply_policy(model, policy).eval()(x)
    b = apply_policy(model, loaded).eval()(x)
    assert torch.equal(a, b)


def test_a_policy_saved_by_an_editor_with_a_byte_order_mark_loads(tmp_path, policy) -> None:
    path = tmp_path / "policy.json"
    policy.save(path)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # as Notepad saves UTF-8
    assert Policy.load(path) == policy


def _write(path, data) -> None:
    path.write_text(json.dumps(data))


def _first_decomposed(data: dict) -> int:
    return next(i for i, layer in enumerate(data["layers"]) if layer["method"] == "cp")


def _bad_format(d):
    d["format"] = 2


def _bad_layer_count(d):
    d["layers"].pop()


def _negative_rank(d):
    d["layers"][_first_decomposed(d)]["rank"] = -4


def _negative_tucker_rank(d):
    i = next(i for i, layer in enumerate(d["layers"]) if layer["method"] == "tucker2")
    d["layers"][i]["rank"][0] = -1


def _unknown_method(d):
    d["layers"][1]["method"] = "svd"


def _wrong_shape(d):
    d["layers"][2]["shape"] = [1, 2, 3, 3]


def _wrong_ratio(d):
    d["layers"][_first_decomposed(d)]["ratio"] = 123.0


def _wrong_name(d):
    d["layers"][2]["name"] = "features.99"


def _rank_on_a_kept_layer(d):
    i = next(i for i, layer in enumerate(d["layers"]) if layer["method"] == "keep")
    d["layers"][i]["rank"] = 5


def _unknown_net(d):
    d["net"] = "vgg12"


def _missing_net(d):
    del d["net"]


def _bad_width(d):
    d["width"] = -1


def _format_true(d):
    d["format"] = True  # == 1 in Python, not in the file


def _net_as_a_list(d):
    d["net"] = [d["net"]]


def _infinite_width(d):
    d["width"] = float("inf")  # json writes Infinity, and json reads it back


def _shape_as_a_number(d):
    d["layers"][2]["shape"] = 5


def _width_edited(d):
    d["width"] = 2 * d["width"]


@pytest.mark.parametrize(
    "mutate,words",
    [
        (_format_true, ["format", "True"]),
        (_net_as_a_list, ["net", "vgg11"]),
        (_infinite_width, ["width", "inf"]),
        (_shape_as_a_number, ["layers[2].shape", "5"]),
        (_width_edited, ["layers[0].shape", "'width' or 'shape' edited"]),
        (_bad_format, ["format"]),
        (_bad_layer_count, ["layers", "7", "8"]),
        (_negative_rank, ["rank", "-4"]),
        (_negative_tucker_rank, ["rank"]),
        (_unknown_method, ["method", "svd"]),
        (_wrong_shape, ["shape", "layers[2]"]),
        (_wrong_ratio, ["ratio"]),
        (_wrong_name, ["layers[2].name", "features.99"]),
        (_rank_on_a_kept_layer, ["rank must be null", "5"]),
        (_unknown_net, ["net", "vgg12"]),
        (_missing_net, ["net"]),
        (_bad_width, ["width"]),
    ],
)
def test_bad_policy_file_named(tmp_path, policy: Policy, mutate, words: list[str]) -> None:
    data = policy.to_dict()
    mutate(data)
    path = tmp_path / "policy.json"
    _write(path, data)
    with pytest.raises(ValueError) as exc:
        Policy.load(path)
    assert isinstance(exc.value, RlMtdError)
    for word in words:
        assert word in str(exc.value), (word, str(exc.value))


def test_a_policy_whose_net_was_edited_is_named_as_such(tmp_path, policy: Policy) -> None:
    data = policy.to_dict()
    data["net"] = "vgg16"  # the layers are still vgg11's 8
    path = tmp_path / "policy.json"
    _write(path, data)
    with pytest.raises(RlMtdError, match=r"8 entries but vgg16 has 13 .*a policy for vgg11"):
        Policy.load(path)


def test_a_report_json_is_not_taken_for_a_policy(tmp_path, policy: Policy) -> None:
    path = tmp_path / "report.json"
    _write(path, {"net": "vgg11", "width": WIDTH, "layers": [], "finetuned_acc": 0.8})
    with pytest.raises(RlMtdError, match="not an rl_mtd policy file .a run's report.json"):
        Policy.load(path)


def test_truncated_policy_file(tmp_path, policy: Policy) -> None:
    path = tmp_path / "policy.json"
    policy.save(path)
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="JSON") as exc:
        Policy.load(path)
    assert "truncated" in str(exc.value)


def test_missing_policy_file(tmp_path) -> None:
    with pytest.raises(RlMtdError, match="does not exist"):
        Policy.load(tmp_path / "nope.json")


# ----------------------------------------------------------------------------- checkpoints


def test_compressed_checkpoint_round_trip(tmp_path, model, policy: Policy) -> None:
    compressed = apply_policy(model, policy, cache=FactorCache())
    # Make the BatchNorm statistics non-trivial so they must be saved too.
    compressed.train()
    with torch.no_grad():
        compressed(torch.randn(8, 3, 32, 32))
    compressed.eval()
    path = tmp_path / "compressed.pt"
    save_compressed(path, compressed, policy, accuracy=0.5)

    raw = torch.load(path, weights_only=True)
    assert raw["kind"] == "compressed" and raw["accuracy"] == 0.5

    loaded, loaded_policy = load_compressed(path)
    assert loaded_policy == policy
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), compressed(x))
    assert count_params(loaded) == count_params(compressed)


def test_load_compressed_refuses_baseline(tmp_path, model) -> None:
    path = tmp_path / "base.pt"
    save_baseline(path, model, net="vgg11", width=WIDTH)
    with pytest.raises(RlMtdError, match="not a compressed checkpoint"):
        load_compressed(path)


def test_baseline_round_trip(tmp_path, model) -> None:
    path = tmp_path / "base.pt"
    save_baseline(path, model, net="vgg11", width=WIDTH, meta={"acc": 0.9})
    loaded, info = load_baseline(path, net="vgg11")
    assert info["width"] == WIDTH and info["meta"] == {"acc": 0.9}
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded.eval()(x), model.eval()(x))


def test_baseline_of_other_net_refused(tmp_path, model) -> None:
    path = tmp_path / "base.pt"
    save_baseline(path, model, net="vgg11", width=WIDTH)
    with pytest.raises(RlMtdError) as exc:
        load_baseline(path, net="vgg16")
    assert "vgg11" in str(exc.value) and "vgg16" in str(exc.value)


def test_bare_state_dict_of_other_net_refused(tmp_path, model) -> None:
    path = tmp_path / "bare.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(RlMtdError) as exc:
        load_baseline(path, net="vgg16", width=WIDTH)
    assert "vgg16" in str(exc.value) and "vgg11" in str(exc.value)


@pytest.mark.parametrize("wrap", ["bare", "model", "model_state_dict"])
@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.module."])
def test_a_state_dict_from_data_parallel_or_compile_or_a_wrapper_loads(
    tmp_path, model, wrap, prefix
) -> None:
    """Training scripts save weights under "model" or "model_state_dict", and DataParallel and
    torch.compile prefix every key: all load (before: a 1,000-character missing-keys message)."""
    state = {prefix + k: v for k, v in model.state_dict().items()}
    path = tmp_path / "base.pt"
    torch.save(state if wrap == "bare" else {wrap: state, "epoch": 3}, path)
    loaded, _ = load_baseline(path, net="vgg11", width=WIDTH)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded.eval()(x), model.eval()(x))


def test_a_checkpoint_without_weights_names_what_it_holds(tmp_path) -> None:
    path = tmp_path / "base.pt"
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, path)
    with pytest.raises(RlMtdError, match="top-level keys: epoch, optimizer"):
        load_baseline(path, net="vgg11", width=WIDTH)


def test_truncated_baseline_refused(tmp_path, model) -> None:
    path = tmp_path / "base.pt"
    save_baseline(path, model, net="vgg11", width=WIDTH)
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(RlMtdError, match="cannot be read"):
        load_baseline(path, net="vgg11")


def test_nan_baseline_refused(tmp_path, model) -> None:
    with torch.no_grad():
        conv_layers(model)[2][1].weight[0, 0, 0, 0] = float("nan")
    path = tmp_path / "base.pt"
    save_baseline(path, model, net="vgg11", width=WIDTH)
    with pytest.raises(RlMtdError, match="NaN"):
        load_baseline(path, net="vgg11")


def test_baseline_of_other_width_refused(tmp_path, model) -> None:
    path = tmp_path / "base.pt"
    save_baseline(path, model, net="vgg11", width=WIDTH)
    with pytest.raises(RlMtdError, match="width"):
        load_baseline(path, net="vgg11", width=0.25)
