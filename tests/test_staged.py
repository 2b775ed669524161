"""Staged compression (rl_mtd.staged): the gradual path, re-factorising, and the driver."""

from __future__ import annotations

import pytest
import torch

from rl_mtd.decompose import DecomposedConv, conv_layers, rank_for_ratio
from rl_mtd.errors import RlMtdError
from rl_mtd.metrics import count_params
from rl_mtd.models import build_vgg
from rl_mtd.policy import Policy, apply_policy
from rl_mtd.staged import compress_in_stages, dense_conv, refactorize, stage_policies


def _mixed_policy(model, ratio: float) -> Policy:
    """keep, then Tucker-2 and CP alternating, each layer at ``ratio``."""
    choices = [("keep", None)]
    for i, (_, conv) in enumerate(conv_layers(model)[1:]):
        method = "cp" if i % 2 else "tucker2"
        choices.append((method, rank_for_ratio(conv, method, ratio)))
    return Policy.from_choices(model, choices, net="vgg11", width=0.125)


def _rank_size(rank) -> int:
    return sum(rank) if isinstance(rank, tuple) else rank


def test_stage_path_shrinks_to_the_policy() -> None:
    model = build_vgg("vgg11", width=0.125)
    policy = _mixed_policy(model, 12)
    path = stage_policies(model, policy, 3)
    assert len(path) == 3 and path[-1] is policy
    sizes = [p.predicted_params(model) for p in path]
    assert sizes[0] > sizes[1] > sizes[2], sizes
    for a, b in zip(path, path[1:]):
        for ca, cb in zip(a.layers, b.layers):
            assert ca.method == cb.method
            if ca.method != "keep":
                assert _rank_size(ca.rank) >= _rank_size(cb.rank)
    assert stage_policies(model, policy, 1) == [policy]
    with pytest.raises(RlMtdError, match="stages"):
        stage_policies(model, policy, 0)


def test_dense_conv_computes_the_block() -> None:
    torch.manual_seed(0)
    model = build_vgg("vgg11", width=0.125).eval()
    compressed = apply_policy(model, _mixed_policy(model, 6)).eval()
    blocks = [m for m in compressed.modules() if isinstance(m, DecomposedConv)]
    assert {b.method for b in blocks} == {"tucker2", "cp"}
    for block in blocks:
        xi = torch.randn(2, block.source_shape[1], 8, 8)
        torch.testing.assert_close(dense_conv(block)(xi), block(xi), atol=1e-4, rtol=1e-4)
    with pytest.raises(RlMtdError, match="expected a conv"):
        dense_conv(torch.nn.ReLU())


def test_refactorize_keeps_layers_at_their_choice_and_refits_the_rest() -> None:
    torch.manual_seed(0)
    model = build_vgg("vgg11", width=0.125).eval()
    first, final = stage_policies(model, _mixed_policy(model, 10), 2)
    stage1 = refactorize(model, first)
    with torch.no_grad():  # stand in for a fine-tune: move one block's factors
        block1 = stage1.get_submodule(first.layers[1].name)
        block1[0].weight.mul_(1.5)
    # The same policy again: nothing is re-fitted, the moved factors survive.
    again = refactorize(stage1, first)
    torch.testing.assert_close(
        again.get_submodule(first.layers[1].name)[0].weight, block1[0].weight
    )
    stage2 = refactorize(stage1, final)
    assert count_params(stage2) == final.predicted_params(model) < count_params(stage1)
    for c in final.layers:
        m = stage2.get_submodule(c.name)
        assert (c.method == "keep") == (not isinstance(m, DecomposedConv))
        if c.method != "keep":
            assert (m.method, m.rank) == (c.method, c.rank)
    # The re-fit starts from the moved kernel, not the original one.
    dense1, dense2 = (dense_conv(s.get_submodule(first.layers[1].name)) for s in (stage1, stage2))
    fresh = dense_conv(apply_policy(model, final).get_submodule(first.layers[1].name))
    assert (dense2.weight - dense1.weight).norm() < (fresh.weight - dense1.weight).norm()
    with pytest.raises(RlMtdError, match="cannot keep"):
        refactorize(stage2, Policy.keep_all(model, net="vgg11", width=0.125))
    assert not any(isinstance(m, DecomposedConv) for m in model.modules()), "input unchanged"


def test_compress_in_stages_fine_tunes_after_every_stage() -> None:
    model = build_vgg("vgg11", width=0.125).eval()
    policy = _mixed_policy(model, 10)
    seen = []
    out = compress_in_stages(model, policy, 3, lambda m, k: seen.append((k, count_params(m))))
    assert [k for k, _ in seen] == [0, 1, 2]
    assert seen[0][1] > seen[1][1] > seen[2][1] == count_params(out)
    assert count_params(out) == policy.predicted_params(model)
