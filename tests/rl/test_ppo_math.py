"""GAE, group baselines, clipped losses, KL estimators and TIS against hand-computed values."""

import math

import pytest
import torch

from llmray.rl.ppo import advantages as A
from llmray.rl.ppo import kl as K
from llmray.rl.ppo import losses as L


def test_gae_matches_hand_computation():
    r = torch.tensor([[0.0, 0.0, 1.0], [0.5, 2.0, 0.0]])
    v = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])
    m = torch.tensor([[1, 1, 1], [1, 1, 0]])
    g, lam = 0.9, 0.8
    adv, ret = A.gae(r, v, m, gamma=g, lam=lam)
    # row 0: deltas d2 = 1 - .3 ; d1 = 0 + .9*.3 - .2 ; d0 = 0 + .9*.2 - .1
    d2, d1, d0 = 0.7, 0.9 * 0.3 - 0.2, 0.9 * 0.2 - 0.1
    a2 = d2
    a1 = d1 + g * lam * a2
    a0 = d0 + g * lam * a1
    assert adv[0].tolist() == pytest.approx([a0, a1, a2], abs=1e-6)
    # row 1: last real token t=1, V(t=2) is padding -> ignored (episode ends)
    e1 = 2.0 - 0.5
    e0 = 0.5 + 0.9 * 0.5 - 0.4
    assert adv[1].tolist() == pytest.approx([e0 + g * lam * e1, e1, 0.0], abs=1e-6)
    assert ret[0].tolist() == pytest.approx([a0 + 0.1, a1 + 0.2, a2 + 0.3], abs=1e-6)
    assert ret[1, 2].item() == 0.0


def test_gae_gamma1_lam1_is_reward_to_go_minus_value():
    r = torch.tensor([[1.0, 2.0, 3.0]])
    v = torch.tensor([[0.5, 0.5, 0.5]])
    adv, ret = A.gae(r, v, torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert adv[0].tolist() == pytest.approx([5.5, 4.5, 2.5])
    assert ret[0].tolist() == pytest.approx([6.0, 5.0, 3.0])


def test_whiten_masked():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[1, 1, 1, 0]])
    w = A.whiten(x, m)
    assert w[0, :3].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-4)  # unbiased std of 1,2,3 = 1
    assert w[0, 3].item() == 0.0


def test_kl_shaped_rewards_put_score_on_last_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    m = torch.tensor([[1, 1, 1], [1, 0, 0]])
    r = A.kl_shaped_rewards(torch.tensor([1.0, 2.0]), kl, m, kl_coef=0.5)
    assert r[0].tolist() == pytest.approx([-0.05, -0.1, 1.0 - 0.15])
    assert r[1].tolist() == pytest.approx([2.0 - 0.2, 0.0, 0.0])


def test_grpo_advantages():
    s = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5])
    adv = A.group_advantages(s, group_size=3)
    g0 = torch.tensor([1.0, 0.0, 0.0])
    std = g0.std().item()  # unbiased: sqrt(1/3)
    assert adv[:3].tolist() == pytest.approx([(1 - 1 / 3) / std, (-1 / 3) / std, (-1 / 3) / std], rel=1e-4)
    sd = math.sqrt(1 / 12)  # unbiased std of (1, .5, .5)
    assert adv[3:].tolist() == pytest.approx([(1 / 3) / sd, (-1 / 6) / sd, (-1 / 6) / sd], rel=1e-4)
    raw = A.group_advantages(s, group_size=3, normalize_std=False)
    assert raw[:3].tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3])
    # equal rewards in a group -> zero advantage, not NaN
    assert A.group_advantages(torch.ones(4), 2).abs().max().item() == 0.0


def test_rloo_advantages():
    s = torch.tensor([1.0, 0.0, 0.5, 2.0])
    adv = A.rloo_advantages(s, group_size=4)
    assert adv.tolist() == pytest.approx([1 - 2.5 / 3, 0 - 3.5 / 3, 0.5 - 3.0 / 3, 2 - 1.5 / 3])
    with pytest.raises(ValueError, match="at least 2"):
        A.rloo_advantages(s, group_size=1)
    with pytest.raises(ValueError, match="groups of 3"):
        A.group_advantages(s, group_size=3)


def test_kl_estimators():
    lp = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-1.5, -1.0])
    assert K.kl_estimate(lp, ref, "k1").tolist() == pytest.approx([0.5, -1.0])
    assert K.kl_estimate(lp, ref, "k2").tolist() == pytest.approx([0.125, 0.5])
    # k3 = exp(ref - lp) - (ref - lp) - 1
    assert K.kl_estimate(lp, ref, "k3").tolist() == pytest.approx(
        [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1], rel=1e-5)
    assert (K.kl_estimate(torch.randn(100), torch.randn(100), "k3") >= 0).all()
    with pytest.raises(ValueError, match="k4"):
        K.kl_estimate(lp, ref, "k4")


def test_kl_controllers():
    fixed = K.make_kl_controller("fixed", 0.1)
    assert fixed.update(5.0, 64) == 0.1
    ada = K.make_kl_controller("adaptive", 0.1, target=1.0, horizon=100)
    # KL 3x target -> error clipped to +0.2 -> beta * (1 + 0.2 * 10/100)
    assert ada.update(3.0, 10) == pytest.approx(0.1 * 1.02)
    # KL half the target -> error -0.5 clipped to -0.2
    assert ada.update(0.5, 10) == pytest.approx(0.1 * 1.02 * (1 - 0.2 * 0.1))
    restored = K.make_kl_controller("adaptive", 0.1, target=1.0, horizon=100, state=ada.state_dict())
    assert restored.value == ada.value


def test_policy_loss_clipping():
    old = torch.zeros(1, 3)
    lp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    m = torch.ones(1, 3)
    loss, st = L.policy_loss(lp, old, adv, m, clip_eps=0.2)
    # token0: min(1.5, 1.2)=1.2; token1: min(-0.5, -0.8) = -0.8; token2: min(2.2, 2.2)=2.2
    assert loss.item() == pytest.approx(-(1.2 - 0.8 + 2.2) / 3, rel=1e-5)
    assert st["clip_frac"].item() == pytest.approx(2 / 3)


def test_policy_loss_gradient_is_zero_when_clipped():
    lp = torch.log(torch.tensor([[1.5]])).requires_grad_()
    loss, _ = L.policy_loss(lp, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.2)
    loss.backward()
    assert lp.grad.abs().item() == 0.0


def test_tis_changes_loss_as_the_formula_says():
    actor = torch.tensor([[-1.0, -2.0, -0.5]])
    rollout = torch.tensor([[-1.2, -1.0, -0.5]])
    w = L.tis_weights(actor, rollout, cap=2.0)
    assert w.tolist()[0] == pytest.approx([math.exp(0.2), math.exp(-1.0), 1.0], rel=1e-5)
    assert L.tis_weights(torch.tensor([0.0]), torch.tensor([-3.0]), cap=2.0).item() == 2.0  # truncated
    lp = torch.tensor([[-0.9, -2.1, -0.4]])
    adv = torch.tensor([[1.0, 0.5, -1.0]])
    m = torch.ones(1, 3)
    plain, _ = L.policy_loss(lp, actor, adv, m, 0.2)
    corrected, _ = L.policy_loss(lp, actor, adv, m, 0.2, is_weights=w)
    ratio = torch.exp(lp - actor)
    per = -torch.min(ratio * adv, torch.clamp(ratio, 0.8, 1.2) * adv)
    assert plain.item() == pytest.approx(per.mean().item(), rel=1e-5)
    assert corrected.item() == pytest.approx((per * w).mean().item(), rel=1e-5)
    assert corrected.item() != pytest.approx(plain.item())


def test_value_loss_clipping():
    v = torch.tensor([[1.0, 0.0]])
    old = torch.tensor([[0.5, 0.0]])
    ret = torch.tensor([[2.0, 0.1]])
    m = torch.ones(1, 2)
    loss, st = L.value_loss(v, old, ret, m, clip_range=0.2)
    # token0: unclipped (1-2)^2=1, clipped V=0.7 -> 1.69 -> max 1.69 ; token1: 0.01 both
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.01) / 2, rel=1e-5)
    assert st["clip_frac"].item() == pytest.approx(0.5)
    plain, _ = L.value_loss(v, old, ret, m, clip_range=None)
    assert plain.item() == pytest.approx(0.5 * (1.0 + 0.01) / 2, rel=1e-5)


def test_entropy_and_token_logprobs():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]])
    ent = L.entropy_from_logits(logits)
    assert ent.tolist() == pytest.approx([math.log(4), 0.0], abs=1e-4)
    lp = L.token_logprobs(logits, torch.tensor([2, 0]))
    assert lp.tolist() == pytest.approx([-math.log(4), 0.0], abs=1e-4)


def test_clip_higher_uses_the_upper_bound_only_for_ratios_above_one():
    old = torch.zeros(1, 3)
    lp = torch.log(torch.tensor([[1.5, 0.5, 1.25]]))  # ratios 1.5, 0.5, 1.25
    adv = torch.tensor([[1.0, -1.0, 1.0]])
    m = torch.ones(1, 3)
    loss, st = L.policy_loss(lp, old, adv, m, clip_eps=0.2, clip_eps_high=0.28)
    # token0: min(1.5, 1.28) = 1.28; token1: min(-0.5, -0.8) = -0.8; token2: min(1.25, 1.25) = 1.25
    assert loss.item() == pytest.approx(-(1.28 - 0.8 + 1.25) / 3, rel=1e-5)
    assert st["clip_frac"].item() == pytest.approx(2 / 3)
    same, _ = L.policy_loss(lp, old, adv, m, clip_eps=0.2, clip_eps_high=None)
    assert same.item() == pytest.approx(-(1.2 - 0.8 + 1.2) / 3, rel=1e-5)


def test_gspo_sequence_ratio_value_and_gradient():
    old = torch.zeros(2, 3)
    lp = torch.tensor([[0.3, -0.1, 0.0], [0.2, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([[1.0, 1.0, 0.0], [-1.0, -1.0, 0.0]])
    loss, _ = L.policy_loss(lp, old, adv, mask, clip_eps=0.5, ratio_level="sequence", loss_agg="seq_mean_token_mean")
    s0, s1 = math.exp((0.3 - 0.1) / 2), math.exp(0.2)  # length-normalised sequence ratios 1.105, 1.221
    # Inside the clip range: loss = -(s0 * 1 + s1 * -1) / 2 sequences.
    assert loss.item() == pytest.approx(-(s0 - s1) / 2, rel=1e-5)
    loss.backward()
    # d/dlp_t of -(1/2) * s_i * A_i * (1/|y_i|) per real token (GSPO's gradient), 0 on padding.
    expected = torch.tensor([[-s0 / 4, -s0 / 4, 0.0], [s1 / 2, 0.0, 0.0]])
    assert torch.allclose(lp.grad, expected, atol=1e-6)


def test_gspo_clips_the_whole_sequence():
    old = torch.zeros(1, 2)
    lp = torch.tensor([[0.2, 0.0]], requires_grad=True)  # s = exp(0.1) = 1.105 > 1 + 0.05
    loss, st = L.policy_loss(lp, old, torch.ones(1, 2), torch.ones(1, 2), clip_eps=0.05,
                             ratio_level="sequence", loss_agg="seq_mean_token_mean")
    assert loss.item() == pytest.approx(-1.05, rel=1e-6)
    assert st["clip_frac"].item() == 1.0
    loss.backward()
    assert lp.grad.abs().sum().item() == 0.0


def test_loss_aggregations_by_hand():
    per = torch.tensor([[1.0, 3.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert L.aggregate(per, mask, "token_mean").item() == pytest.approx((1 + 3 + 2) / 3)
    assert L.aggregate(per, mask, "seq_mean_token_mean").item() == pytest.approx((2.0 + 2.0) / 2)
    # Dr. GRPO: token sums over a constant length 4, then the mean over sequences.
    assert L.aggregate(per, mask, "seq_mean_token_sum_norm", norm_len=4).item() == pytest.approx((4 / 4 + 2 / 4) / 2)
    with pytest.raises(ValueError, match="norm_len"):
        L.aggregate(per, mask, "seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="token_mean"):
        L.aggregate(per, mask, "mean")


def test_dr_grpo_advantages_are_mean_centred_only():
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    adv = A.group_advantages(scores, 4, normalize_std=False)
    assert adv.tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25, 0.25, 0.25, 0.25, -0.75])


def test_dynamic_sampling_keeps_groups_with_reward_spread():
    from llmray.rl.algorithms import group_rows, informative_groups

    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.5, 0.2, 0.7])
    assert informative_groups(scores, 2) == [1, 4]
    assert group_rows([1, 4], 2) == [2, 3, 8, 9]
    assert informative_groups(torch.zeros(6), 3) == []


def test_variant_keys_are_checked_by_name():
    from llmray.config import ConfigError
    from llmray.rl.algorithms import AlgoConfig

    with pytest.raises(ConfigError, match="algo.clip_eps_high"):
        AlgoConfig(clip_eps_high=0.0)
    with pytest.raises(ConfigError, match="algo.dynamic_sampling"):
        AlgoConfig(algorithm="ppo", n_samples=1, dynamic_sampling=True, minibatch_size=8)
    with pytest.raises(ConfigError, match="algo.max_sampling_rounds"):
        AlgoConfig(algorithm="grpo", max_sampling_rounds=0)


def test_refill_size_scales_by_keep_rate_and_engine_count():
    from llmray.rl.controller import refill_size

    assert refill_size(missing=2, kept=6, seen=8, engines=1) == 3  # keep rate 0.75 -> ceil(2 / 0.75)
    assert refill_size(missing=2, kept=0, seen=8, engines=1) == 8  # rate floored at 1/4: at most 4x
    assert refill_size(missing=3, kept=4, seen=8, engines=2) == 6  # ceil(3 / 0.5) = 6, a multiple of 2
    assert refill_size(missing=1, kept=7, seen=8, engines=4) == 4
