"""The final check (--final-check): candidates from a search, the choice, and its resume file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agents.final_check import (
    Candidate,
    HeldOut,
    describe,
    episode_candidates,
    final_check,
    pack_correct,
    paired_gap,
    policy_key,
    top_candidates,
    unpack_correct,
    with_anchor,
)
from rl_mtd.errors import RlMtdError
from rl_mtd.models import build_vgg
from rl_mtd.policy import Policy

NET, WIDTH = "vgg11", 0.125


@pytest.fixture(scope="module")
def model():
    return build_vgg(NET, width=WIDTH)


def _policy(model, first_rank: int, method: str = "cp") -> Policy:
    """A policy that differs from the others by the rank of its first layer."""
    choices = [(method, first_rank)] + [("tucker2", (4, 4))] * 7
    return Policy.from_choices(model, choices, net=NET, width=WIDTH)


def _episode(policy: Policy, reward: float, n: int) -> dict:
    return {
        "episode": n,
        "reward": reward,
        "methods": [c.method for c in policy.layers],
        "ranks": [list(c.rank) if isinstance(c.rank, tuple) else c.rank for c in policy.layers],
    }


def test_top_candidates_are_distinct_and_best_first(model):
    a, b, c = (_policy(model, r) for r in (2, 3, 4))
    scored = [Candidate(a, 0.1), Candidate(b, 0.5), Candidate(a, 0.7), Candidate(c, 0.3)]
    top = top_candidates(scored, 2)
    assert [policy_key(t.policy) for t in top] == [policy_key(a), policy_key(b)]
    assert [t.score for t in top] == [0.7, 0.5], "a repeated policy counts with its best score"
    assert len(top_candidates(scored, 10)) == 3
    with pytest.raises(RlMtdError, match="at least 1"):
        top_candidates(scored, 0)


def test_episode_candidates_put_the_search_s_best_first(model):
    """The search's best comes first even when an episode scored higher (a warm start's
    policy is not an episode), and the rest follow by reward, rebuilt from their choices."""
    best, a, b = (_policy(model, r) for r in (2, 3, 4))
    episodes = [_episode(a, 0.2, 1), _episode(b, 0.9, 2), _episode(a, 0.4, 3)]
    cands = episode_candidates(best, episodes, model, 3, net=NET, width=WIDTH, num_classes=10)
    assert [policy_key(c.policy) for c in cands] == [policy_key(p) for p in (best, b, a)]
    assert cands[0].score is None and cands[2].score == 0.4
    assert cands[1].policy.predicted_params(model) == b.predicted_params(model)
    again = [_episode(best, 0.3, 4), *episodes]
    cands = episode_candidates(best, again, model, 2, net=NET, width=WIDTH, num_classes=10)
    assert cands[0].score == 0.3 and len(cands) == 2


def test_the_warm_start_stays_among_the_candidates(model):
    """The policy a search started from is checked too: second, after the search's best, in
    place of the last other candidate; not twice where it is already there."""
    best, a, b, start = (_policy(model, r) for r in (2, 3, 4, 5))
    keys = [policy_key(p) for p in (best, a, b, start)]
    cands = [Candidate(best, 0.9), Candidate(a, 0.8), Candidate(b, 0.7)]
    anchored = with_anchor(cands, Candidate(start, 0.1), 3)
    assert [policy_key(c.policy) for c in anchored] == [keys[0], keys[3], keys[1]]
    assert [policy_key(c.policy) for c in with_anchor(cands, Candidate(b, 0.1), 3)] == keys[:3]
    assert [policy_key(c.policy) for c in with_anchor(cands, Candidate(a, 0.1), 2)] == keys[:2]
    assert with_anchor(cands, None, 2) == cands[:2]
    longer = [*cands, Candidate(start, 0.1)]  # the anchor beyond the k: moved up, not repeated
    assert [policy_key(c.policy) for c in with_anchor(longer, longer[3], 2)] == [keys[0], keys[3]]
    # Through episode_candidates: the warm start is no episode and scores below every one.
    episodes = [_episode(a, 0.2, 1), _episode(b, 0.9, 2)]
    got = episode_candidates(
        best, episodes, model, 2, net=NET, width=WIDTH, num_classes=10, anchor=Candidate(start, 0.0)
    )
    assert [policy_key(c.policy) for c in got] == [keys[0], keys[3]]
    got = episode_candidates(best, episodes, model, 2, net=NET, width=WIDTH, num_classes=10)
    assert [policy_key(c.policy) for c in got] == [keys[0], keys[2]], "no anchor: by reward"


def test_candidates_are_named_by_where_they_came_from():
    assert describe({"strategy": "sensitivity", "target_ratio": 8.0}) == "the heuristic's policy"
    assert describe({"strategy": "ppo", "episode": 12, "reward": -0.1}) == "episode 12"
    assert describe({"strategy": "local"}) == "local"
    assert describe({}) == "the search's best"


def test_final_check_keeps_the_best_held_out_and_resumes(model, tmp_path):
    pols = [_policy(model, r) for r in (2, 3, 4)]
    acc = {policy_key(p): v for p, v in zip(pols, (0.40, 0.55, 0.55), strict=True)}
    calls = []

    def score(policy):
        calls.append(policy_key(policy))
        return acc[policy_key(policy)]

    path = tmp_path / "final_check.json"
    cands = [Candidate(p, s) for p, s in zip(pols, (None, 0.3, 0.2), strict=True)]
    result = final_check(cands, score, epochs=3.0, path=path)
    assert result.chosen == 1, "the best held-out; of a tie the one the search ranked higher"
    assert policy_key(result.policy) == policy_key(pols[1])
    saved = json.loads(path.read_text())
    assert saved["epochs"] == 3.0 and len(saved["candidates"]) == 3
    assert len(calls) == 3

    # Resumed: the saved candidates are not fine-tuned again; another length starts over.
    calls.clear()
    again = final_check(cands, score, epochs=3.0, path=path)
    assert calls == [] and again.chosen == 1
    assert again.seconds == pytest.approx(result.seconds)
    final_check(cands, score, epochs=2.0, path=path)
    assert len(calls) == 3


@pytest.mark.parametrize(
    "content",
    ["{", '{"epochs": 3.0, "candidates": [{"key": "x"}]}', "[]", '{"epochs": 3.0}'],
)
def test_a_damaged_check_file_is_redone_not_trusted(content, model, tmp_path, caplog):
    path = tmp_path / "final_check.json"
    path.write_text(content)
    pols = [_policy(model, r) for r in (2, 3)]
    calls = []

    def score(policy):
        calls.append(1)
        return 0.5

    with caplog.at_level("WARNING"):
        result = final_check([Candidate(p, 0.1) for p in pols], score, epochs=3.0, path=path)
    assert "damaged" in caplog.text
    assert len(calls) == 2 and result.chosen == 0
    assert json.loads(path.read_text())["candidates"][0]["held_out_acc"] == 0.5


def test_a_resumed_check_keeps_what_it_measured_when_the_candidates_change(model, tmp_path):
    """A search continued after a check may rank other policies first: candidates measured
    before are reused (with this search's score), those no longer among the best stay in the
    file and their seconds still count."""
    a, b, c, d = (_policy(model, r) for r in (2, 3, 4, 5))
    acc = {policy_key(p): v for p, v in zip((a, b, c, d), (0.4, 0.5, 0.6, 0.7), strict=True)}
    calls = []

    def score(policy):
        calls.append(policy_key(policy))
        return acc[policy_key(policy)]

    path = tmp_path / "final_check.json"
    first = final_check([Candidate(a, 0.3), Candidate(b, 0.2)], score, epochs=3.0, path=path)
    calls.clear()
    again = final_check(
        [Candidate(c, 0.5), Candidate(a, 0.4), Candidate(d, 0.1)], score, epochs=3.0, path=path
    )
    assert calls == [policy_key(c), policy_key(d)], "a is measured once"
    assert again.rows[1]["search_score"] == 0.4, "the score is this search's"
    assert again.chosen == 2
    saved = json.loads(path.read_text())
    assert [r["key"] for r in saved["earlier"]] == [policy_key(b)], "b is kept, not dropped"
    assert again.seconds == pytest.approx(
        sum(r["seconds"] for r in again.rows) + first.rows[1]["seconds"]
    )


def test_a_saved_candidate_whose_key_and_policy_disagree_is_not_trusted(model, tmp_path, caplog):
    a, b = _policy(model, 2), _policy(model, 3)
    path = tmp_path / "final_check.json"
    final_check([Candidate(a, 0.3)], lambda p: 0.5, epochs=3.0, path=path)
    saved = json.loads(path.read_text())
    saved["candidates"][0]["policy"] = b.to_dict()  # hand-edited: b's policy under a's key
    path.write_text(json.dumps(saved))
    calls = []
    with caplog.at_level("WARNING"):
        final_check([Candidate(a, 0.3)], lambda p: calls.append(1) or 0.5, epochs=3.0, path=path)
    assert calls == [1] and "damaged" in caplog.text


def test_paired_gap_counts_only_the_images_where_two_models_disagree():
    a = np.array([1, 1, 0, 0, 1, 1], dtype=bool)
    b = np.array([1, 0, 0, 1, 1, 0], dtype=bool)
    gap, se = paired_gap(a, b)
    d = np.array([0, 1, 0, -1, 0, 1], dtype=float)
    assert gap == pytest.approx(1 / 6)
    assert se == pytest.approx(d.std(ddof=1) / np.sqrt(6))
    assert paired_gap(a, a) == (0.0, 0.0), "the same answers: no lead and no noise"
    with pytest.raises(RlMtdError, match="same images"):
        paired_gap(a, b[:5])


def test_image_records_survive_the_check_file():
    rng = np.random.default_rng(0)
    for n in (1, 7, 8, 9, 2000):
        bits = rng.random(n) < 0.8
        assert np.array_equal(unpack_correct(pack_correct(bits)), bits)
    with pytest.raises(ValueError, match="wrong length"):
        unpack_correct({**pack_correct(np.ones(9, dtype=bool)), "n": 20})


def _answers(n_right: int, n: int = 2000, *, shift: int = 0) -> np.ndarray:
    """``n_right`` of ``n`` images right, starting at image ``shift`` (wrapping): two such
    records agree on most images, as two fine-tunes of nearby policies do."""
    right = np.zeros(n, dtype=bool)
    right[(np.arange(n_right) + shift) % n] = True
    return right


@pytest.mark.parametrize(
    ("lead", "margin", "leaves_the_start"),
    [(7, 2.0, False), (7, 0.0, True), (40, 2.0, True), (-3, 2.0, False)],
)
def test_the_check_leaves_its_start_only_for_a_lead_beyond_the_margin(
    model, tmp_path, caplog, lead, margin, leaves_the_start
):
    """A candidate 7 images (0.35 points) ahead of the start on 2,000, disagreeing on about
    40 images, is within 2 paired standard errors: the start stays. 40 images ahead is not."""
    start, other, third = (_policy(model, r) for r in (2, 3, 4))
    answers = {
        policy_key(start): _answers(1600),
        policy_key(other): _answers(1600 + lead, shift=17),
        policy_key(third): _answers(1500),
    }

    def score(policy):
        right = answers[policy_key(policy)]
        return HeldOut(float(right.mean()), right)

    cands = [Candidate(other, 0.5), Candidate(start, None), Candidate(third, 0.4)]
    path = tmp_path / "final_check.json"
    with caplog.at_level("INFO"):
        result = final_check(cands, score, epochs=3.0, path=path, anchor=start, margin=margin)
    assert result.anchor == 1 and result.margin == margin
    assert result.chosen == (0 if leaves_the_start else 1)
    gap, se = result.rows[0]["vs_anchor"]["gap"], result.rows[0]["vs_anchor"]["se"]
    assert gap == pytest.approx(lead / 2000)
    assert (gap > margin * se) == leaves_the_start or margin == 0
    assert "vs_anchor" not in result.rows[1], "the start is not compared with itself"
    if lead > 0 and not leaves_the_start:
        assert "within 2 paired standard errors" in caplog.text
    if leaves_the_start and margin > 0:
        assert "beyond 2 paired standard errors" in caplog.text
    assert (
        "candidate 2 of 3, " in caplog.text and "the search's start (search score -)" in caplog.text
    )
    # report.json gets the leads, not the image records; the check file keeps them, so a
    # resumed check decides the same without fine-tuning anything again.
    assert all("correct" not in c for c in result.to_dict()["candidates"])
    again = final_check(
        cands, lambda p: pytest.fail("refined"), epochs=3.0, path=path, anchor=start, margin=margin
    )
    assert again.chosen == result.chosen


def test_without_image_records_the_best_held_out_is_kept(model, caplog):
    """Plain accuracies (a check file from before the records) give no paired error: the best
    is kept and the log says the margin was not applied."""
    start, other = _policy(model, 2), _policy(model, 3)
    acc = {policy_key(start): 0.80, policy_key(other): 0.8035}
    with caplog.at_level("WARNING"):
        result = final_check(
            [Candidate(start, None), Candidate(other, 0.5)],
            lambda p: acc[policy_key(p)],
            epochs=3.0,
            anchor=start,
            margin=2.0,
        )
    assert result.chosen == 1 and result.anchor == 0 and not result.margin_applied
    assert "without the margin" in caplog.text


def test_a_damaged_image_record_is_redone(model, tmp_path, caplog):
    a = _policy(model, 2)
    path = tmp_path / "final_check.json"
    right = _answers(50, 64)
    final_check([Candidate(a, 0.3)], lambda p: HeldOut(0.78, right), epochs=3.0, path=path)
    saved = json.loads(path.read_text())
    saved["candidates"][0]["correct"]["bits"] = "not base64!"
    path.write_text(json.dumps(saved))
    calls = []
    with caplog.at_level("WARNING"):
        final_check(
            [Candidate(a, 0.3)],
            lambda p: calls.append(1) or HeldOut(0.78, right),
            epochs=3.0,
            path=path,
        )
    assert calls == [1] and "damaged" in caplog.text


def _records(model, accs_and_shifts, n=2000):
    """Candidates (policies differing in their first rank) and a score giving each its record."""
    pols = [_policy(model, 2 + i) for i in range(len(accs_and_shifts))]
    answers = {
        policy_key(p): _answers(right, n, shift=shift)
        for p, (right, shift) in zip(pols, accs_and_shifts, strict=True)
    }

    def score(policy):
        right = answers[policy_key(policy)]
        return HeldOut(float(right.mean()), right)

    return pols, score


def test_the_margin_guards_the_start_wherever_it_stands(model):
    """The start first (a search that found nothing better on the proxy), or not a candidate at
    all (no margin then), or tied with an earlier candidate."""
    (start, other), score = _records(model, [(1600, 0), (1607, 17)])
    first = final_check(
        [Candidate(start, 0.9), Candidate(other, 0.5)], score, epochs=3.0, anchor=start, margin=2.0
    )
    assert (first.anchor, first.chosen) == (0, 0)
    outside = _policy(model, 9)
    free = final_check(
        [Candidate(start, 0.9), Candidate(other, 0.5)],
        score,
        epochs=3.0,
        anchor=outside,
        margin=2.0,
    )
    assert free.anchor is None and free.chosen == 1, "no start among them: the best held-out"
    (a, b), tied = _records(model, [(1600, 5), (1600, 0)])
    cands = [Candidate(a, 0.9), Candidate(b, None)]
    assert final_check(cands, tied, epochs=3.0, anchor=b, margin=0.0).chosen == 0
    assert final_check(cands, tied, epochs=3.0, anchor=b, margin=2.0).chosen == 1


def test_records_of_other_lengths_fall_back_to_the_best_held_out(model, tmp_path, caplog):
    start, other = _policy(model, 2), _policy(model, 3)
    records = {policy_key(start): _answers(1600), policy_key(other): _answers(1700, 1900)}

    def score(policy):
        right = records[policy_key(policy)]
        return HeldOut(float(right.mean()), right)

    with caplog.at_level("WARNING"):
        result = final_check(
            [Candidate(start, None), Candidate(other, 0.5)],
            score,
            epochs=3.0,
            anchor=start,
            margin=2.0,
        )
    assert result.chosen == 1 and not result.margin_applied
    assert "same images" in caplog.text and "without the margin" in caplog.text
    assert all("vs_anchor" not in r for r in result.rows)
