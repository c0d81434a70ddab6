"""Timestep samplers of the training objective."""
import jax
import numpy as np

from fluxir_jax import sampling, train
from fluxir_jax.train_config import LossConfig


def test_logit_normal_with_resolution_shift_matches_the_formula():
    key = jax.random.key(0)
    seq = 1024
    t = np.asarray(train.sample_timesteps(key, 4096, seq, LossConfig()))
    u = np.asarray(jax.random.normal(key, (4096,)))
    s = 1 / (1 + np.exp(-u))
    mu = sampling.lin_mu(seq)
    want = np.exp(mu) / (np.exp(mu) + 1 / s - 1)
    np.testing.assert_allclose(t, want, rtol=1e-5, atol=1e-6)
    assert 0 < t.min() and t.max() < 1 and np.median(t) > 0.5  # shifted toward noise at 1024 tokens
    plain = np.asarray(train.sample_timesteps(key, 4096, seq, LossConfig(resolution_shift=False)))
    np.testing.assert_allclose(plain, s, rtol=1e-6)


def test_uniform_and_high_noise():
    key = jax.random.key(1)
    uni = np.asarray(train.sample_timesteps(key, 20000, 256, LossConfig(timesteps="uniform")))
    high = np.asarray(train.sample_timesteps(key, 20000, 256, LossConfig(timesteps="high_noise")))
    assert abs(uni.mean() - 0.5) < 0.01 and 0 <= uni.min() and uni.max() <= 1
    np.testing.assert_allclose(high, 3 * uni / (3 * uni + 1 - uni), rtol=1e-5)
    assert high.mean() > 0.6
