"""Sampling: greedy, each filter's semantics, the penalty, and a serialisable random stream."""

import json

import numpy as np
import pytest

from rgemma_cli.errors import RgemmaError
from rgemma_cli.sampling import (SamplerSettings, apply_repeat_penalty, candidates, new_rng_state,
                                 sample)

OFF = dict(top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0)


def rng(seed=0):
    g = np.random.Generator(np.random.PCG64())
    g.bit_generator.state = new_rng_state(seed)
    return g


def test_greedy_is_argmax_ties_to_lowest_id():
    logits = np.array([0.0, 3.0, 1.0, 3.0], np.float32)
    g = rng()
    before = g.bit_generator.state
    assert sample(logits, SamplerSettings(temperature=0), [], g) == 1
    assert g.bit_generator.state == before  # greedy draws nothing


def test_one_draw_per_sampled_token():
    logits = np.zeros(10, np.float32)
    g, ref = rng(5), rng(5)
    for _ in range(7):
        sample(logits, SamplerSettings(temperature=1.0, top_k=1), [], g)
        ref.random()
    assert g.bit_generator.state == ref.bit_generator.state


def test_rng_state_is_json():
    state = new_rng_state(123)
    g = rng()
    g.bit_generator.state = json.loads(json.dumps(state))
    assert g.random() == rng(123).random()


def test_repeat_penalty_divides_positive_multiplies_negative():
    logits = np.array([2.0, -2.0, 1.0], np.float32)
    out = apply_repeat_penalty(logits, [0, 1, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]  # each token penalised once
    assert logits.tolist() == [2.0, -2.0, 1.0]  # input untouched


def test_repeat_last_n_window():
    logits = np.array([1.0, 1.01, 0.0], np.float32)
    s = SamplerSettings(temperature=0, repeat_penalty=2.0, repeat_last_n=1)
    assert sample(logits, s, [1], rng()) == 0
    assert sample(logits, s, [1, 2], rng()) == 1  # token 1 fell out of the window


def test_top_k():
    logits = np.log(np.array([0.1, 0.4, 0.2, 0.3]))
    ids, p = candidates(logits, SamplerSettings(temperature=1.0, **{**OFF, "top_k": 2}))
    assert ids.tolist() == [1, 3]
    np.testing.assert_allclose(p, [4 / 7, 3 / 7])


def test_top_p_smallest_set_reaching_p():
    logits = np.log(np.array([0.1, 0.4, 0.2, 0.3]))
    s = SamplerSettings(temperature=1.0, **{**OFF, "top_p": 0.7})
    assert candidates(logits, s)[0].tolist() == [1, 3]  # 0.4 + 0.3 reaches 0.7
    s = s.replace(top_p=0.71)
    assert candidates(logits, s)[0].tolist() == [1, 3, 2]
    s = s.replace(top_p=0.01)
    assert candidates(logits, s)[0].tolist() == [1]  # always at least one


def test_min_p_relative_to_best():
    logits = np.log(np.array([0.1, 0.4, 0.2, 0.3]))
    s = SamplerSettings(temperature=1.0, **{**OFF, "min_p": 0.5})
    assert candidates(logits, s)[0].tolist() == [1, 3, 2]  # >= 0.2


def test_temperature_sharpens():
    logits = np.log(np.array([0.25, 0.75]))
    _, p = candidates(logits, SamplerSettings(temperature=0.5, **OFF))
    np.testing.assert_allclose(p, [0.9, 0.1])  # 0.75^2 : 0.25^2


def test_sampling_frequencies_follow_the_distribution():
    logits = np.log(np.array([0.2, 0.5, 0.3]))
    s, g = SamplerSettings(temperature=1.0, **OFF), rng(1)
    counts = np.bincount([sample(logits, s, [], g) for _ in range(4000)], minlength=3) / 4000
    np.testing.assert_allclose(counts, [0.2, 0.5, 0.3], atol=0.03)


@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5),
                                 dict(min_p=-0.1), dict(top_k=-1), dict(repeat_penalty=0.0),
                                 dict(repeat_last_n=-1), dict(seed=-2), dict(seed=2**64)])
def test_bad_values(bad):
    with pytest.raises(RgemmaError, match="--"):
        SamplerSettings(**bad)


def test_seed_minus_one_means_a_random_seed_everywhere():
    # llama.cpp's spelling, which the server already took: the CLI, batch lines and /set agree
    assert SamplerSettings(seed=-1).seed is None
    assert SamplerSettings(seed=-1).with_seed().seed >= 0
    assert SamplerSettings(seed=np.int64(-1)).seed is None


def test_settings_round_trip():
    s = SamplerSettings(temperature=0.3, top_k=5, seed=9)
    assert SamplerSettings.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert SamplerSettings().with_seed().seed is not None


def reference_candidates(logits, s):
    """The pipeline step by step on the full vocabulary (slow, obviously right)."""
    z = logits.astype(np.float64) / s.temperature
    order = np.lexsort((np.arange(z.size), -z))
    if s.top_k:
        order = order[:s.top_k]
    p = np.exp(z[order] - z[order].max())
    p /= p.sum()
    if s.top_p < 1:
        keep = np.searchsorted(np.cumsum(p), s.top_p) + 1
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    keep = p >= s.min_p * p[0]
    order, p = order[keep], p[keep]
    return order, p / p.sum()


@pytest.mark.parametrize("seed", range(30))
def test_fast_pipeline_matches_the_step_by_step_one(seed):
    r = np.random.default_rng(seed)
    logits = (r.standard_normal(500) * r.uniform(0.5, 6)).astype(np.float32)
    logits[r.integers(0, 500, 20)] = logits.max()  # ties
    s = SamplerSettings(temperature=float(r.uniform(0.2, 2)), top_k=int(r.choice([0, 1, 5, 40, 499])),
                        top_p=float(r.choice([1.0, 0.5, 0.9, 0.99])),
                        min_p=float(r.choice([0.0, 0.01, 0.1, 0.5])))
    ids, p = candidates(logits, s)
    want_ids, want_p = reference_candidates(logits, s)
    assert ids.tolist() == want_ids.tolist()
    np.testing.assert_allclose(p, want_p, rtol=1e-5)


# -- settings that would overflow float32 are clamped (issue 11, item 4) ------------------------

@pytest.mark.parametrize("changes", [
    dict(temperature=1e-45), dict(temperature=5e-324), dict(temperature=1e-38, repeat_penalty=1e-38),
    dict(temperature=1.0, repeat_penalty=1e-38), dict(temperature=1.0, repeat_penalty=1e38),
    dict(temperature=1e300), dict(temperature=0.7, repeat_penalty=1e-300, min_p=0.0),
])
def test_extreme_settings_sample_a_valid_token(changes):
    logits = np.array([1.0, 5.0, -2.0, 4.9, 0.0, -30.0], np.float32)
    s = SamplerSettings(**{**OFF, **changes, "repeat_last_n": 8})
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # no warning escapes
        for recent in ([], [1, 2], [0, 1, 2, 3, 4, 5]):
            t = sample(logits, s, recent, rng())
            assert 0 <= t < logits.size


def test_tiny_temperature_is_greedy():
    logits = np.array([1.0, 5.0, -2.0, 4.999, 0.0], np.float32)
    s = SamplerSettings(**{**OFF, "temperature": 1e-45})
    assert all(sample(logits, s, [], rng(i)) == 1 for i in range(20))


@pytest.mark.parametrize("bad", [dict(temperature=True), dict(top_k=2.5), dict(top_p="0.9"),
                                 dict(repeat_penalty=float("inf")), dict(seed=-1.0), dict(min_p=None)])
def test_wrong_types_are_refused(bad):
    with pytest.raises(RgemmaError):
        SamplerSettings(**bad)
    with pytest.raises(RgemmaError):
        SamplerSettings.from_dict(dict(SamplerSettings().to_dict(), **bad))
