"""RL math: group advantages, dynamic sampling, rewards (speed/format), PPO-clip."""
import math

import pytest
import torch

from llada_cpt.errors import ConfigError
from llada_cpt.rl.advantages import group_advantages
from llada_cpt.rl.dynamic_sampling import DynamicSamplingConfig, dynamic_sample, is_informative
from llada_cpt.rl.ppo import PPOConfig, k3_kl, ppo_loss, token_entropy, token_logprobs
from llada_cpt.rl.rewards import RewardConfig, RewardFunction, format_reward, speed_reward, tokens_per_step

# --------------------------------------------------------------------------- advantages


def test_advantages_hand_group():
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 0.0, 1.0, 1.0]]), eps=0.0)
    # population std: 0.5 and sqrt(0.5)
    assert torch.allclose(adv[0], torch.tensor([1.0, -1.0, -1.0, 1.0]))
    s = math.sqrt(0.5)
    assert torch.allclose(adv[1], torch.tensor([1 / s, -1 / s, 0.0, 0.0]))


def test_advantages_all_equal_groups_are_exactly_zero():
    r = torch.tensor([[0.1, 0.1, 0.1], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [7.3, 7.3, 7.3]])
    adv = group_advantages(r)
    assert torch.equal(adv[[0, 1, 3]], torch.zeros(3, 3))
    assert adv[2].abs().sum() > 0
    assert torch.equal(group_advantages(torch.tensor([[5.0]])), torch.zeros(1, 1))


def test_advantages_are_z_scores(gen):
    r = torch.randint(0, 3, (16, 8), generator=gen).float() + torch.rand(16, 8, generator=gen)
    adv = group_advantages(r, eps=0.0)
    assert torch.allclose(adv.mean(1), torch.zeros(16), atol=1e-5)
    assert torch.allclose(adv.std(1, unbiased=False), torch.ones(16), atol=1e-5)
    adv_u = group_advantages(r, eps=0.0, unbiased=True)
    assert torch.allclose(adv_u.std(1, unbiased=True), torch.ones(16), atol=1e-5)
    # eps keeps a tiny spread from blowing up
    tiny = group_advantages(torch.tensor([[0.0, 1e-9]]), eps=1e-6)
    assert tiny.abs().max() < 1e-2


def test_advantages_reject_bad_input():
    with pytest.raises(ValueError, match="num_groups, group_size"):
        group_advantages(torch.ones(4))
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([[0.0, float("nan")]]))


# --------------------------------------------------------------------------- dynamic sampling


class Source:
    """Draw callback over a fixed list (or an endless generator); records what was asked."""

    def __init__(self, groups, extra=0):
        self.it = iter(groups)
        self.asked = []
        self.extra = extra  # return this many more groups than asked (misbehaving callback)

    def __call__(self, n):
        self.asked.append(n)
        out = []
        for _ in range(n + self.extra):
            try:
                out.append(next(self.it))
            except StopIteration:
                break
        return out


def test_dynamic_sampling_drops_all_equal_and_fills():
    groups = [[1, 1], [0, 1], [0, 0], [1, 0], [0.5, 0.5], [1, 0, 1], [0, 1]]
    src = Source(groups)
    res = dynamic_sample(src, DynamicSamplingConfig(num_groups=3, draw_size=2))
    assert not res.skip and res.reason is None
    assert res.groups == [[0, 1], [1, 0], [1, 0, 1]]
    assert res.stats.as_dict() == dict(drawn=6, kept=3, dropped=3, invalid=0, surplus=0, calls=3)
    assert src.asked == [2, 2, 2]


def test_dynamic_sampling_respects_oversampling_bound():
    def endless():
        while True:
            yield [1.0, 1.0, 1.0]

    for extra in (0, 5):  # a callback returning more than asked must not break the bound
        src = Source(endless(), extra=extra)
        cfg = DynamicSamplingConfig(num_groups=4, max_oversample=2.5, draw_size=3)
        res = dynamic_sample(src, cfg)
        assert cfg.max_draw == 10
        assert res.skip and res.groups == []
        assert res.stats.drawn == 10 and res.stats.dropped == 10 and res.stats.kept == 0
        assert sum(src.asked) == 10 and src.asked == [3, 3, 3, 1]
        assert "oversampling bound" in res.reason


def test_dynamic_sampling_unfillable_batches_skip_without_raising():
    # source exhausted with too few informative groups
    res = dynamic_sample(Source([[0, 1], [1, 1]]), DynamicSamplingConfig(num_groups=2))
    assert res.skip and "exhausted" in res.reason and res.stats.kept == 1 and res.groups == []
    # nothing usable at all: NaN rewards and empty groups are counted as invalid
    bad = [[float("nan"), 1.0], [], [float("inf"), 0.0]]
    res = dynamic_sample(Source(bad), DynamicSamplingConfig(num_groups=2))
    assert res.skip and res.stats.invalid == 3 and res.stats.kept == 0
    # an empty source
    res = dynamic_sample(Source([]), DynamicSamplingConfig(num_groups=1))
    assert res.skip and res.stats.drawn == 0 and res.stats.calls == 1


def test_dynamic_sampling_partial_batch_surplus_and_disabled():
    res = dynamic_sample(Source([[0, 1], [1, 1]]), DynamicSamplingConfig(num_groups=2, min_groups=1))
    assert not res.skip and res.groups == [[0, 1]]
    res = dynamic_sample(Source([[0, 1]] * 4), DynamicSamplingConfig(num_groups=2, draw_size=4))
    assert len(res.groups) == 2 and res.stats.surplus == 2
    res = dynamic_sample(Source([[1, 1], [0, 0]]), DynamicSamplingConfig(num_groups=2, enabled=False))
    assert not res.skip and res.groups == [[1, 1], [0, 0]]


def test_dynamic_sampling_reward_accessors_and_tolerance():
    class G:
        def __init__(self, r):
            self.rewards = torch.tensor(r)

    groups = [G([1.0, 1.0 + 1e-9]), {"rewards": [0.0, 1.0]}, G([0.0, 2.0])]
    res = dynamic_sample(Source(groups), DynamicSamplingConfig(num_groups=2, tolerance=1e-6))
    assert res.groups == groups[1:] and res.stats.dropped == 1
    assert is_informative([1.0, 1.0 + 1e-9]) is True
    assert is_informative([1.0, 1.0 + 1e-9], tolerance=1e-6) is False


def test_dynamic_sampling_config_errors():
    for kw in (dict(num_groups=0), dict(num_groups=2, max_oversample=0.5), dict(num_groups=2, min_groups=3),
               dict(num_groups=2, draw_size=0)):
        with pytest.raises(ConfigError):
            DynamicSamplingConfig(**kw)


# --------------------------------------------------------------------------- rewards


def test_tokens_per_step_ignores_ungenerated():
    assert tokens_per_step([0, 0, 1, 1, -1, -1]) == 2.0
    assert tokens_per_step(torch.tensor([3, 3, 3, 5, 7])) == 5 / 3
    assert tokens_per_step([-1, -1]) == 0.0


@pytest.mark.parametrize(
    "tpf, block, correct_value, wrong_value",
    [
        (1.0, 4, 0.5, 0.0),  # one token per step: slow end of the ramp
        (4.0, 4, 1.0, -0.5),  # a whole block per step: fast end
        (2.0, 4, 0.625, -0.125),  # t=1, T=3: (1 - cos(pi/3)) / 2 = 0.25
        (2.5, 4, 0.75, -0.25),  # t=1.5: half-way, ramp = 0.5
        (9.0, 4, 1.0, -0.5),  # clipped at B tokens/step
        (1.0, 1, 0.5, 0.0),  # block size 1: only the slow value exists
        (5.0, 9, 0.75, -0.25),  # t=4, T=8: half-way
    ],
)
def test_speed_reward_hand_values(tpf, block, correct_value, wrong_value):
    cfg = RewardConfig(speed=True)
    assert speed_reward(tpf, block, True, cfg) == pytest.approx(correct_value)
    assert speed_reward(tpf, block, False, cfg) == pytest.approx(wrong_value)


def test_speed_reward_is_monotone_and_bounded():
    cfg = RewardConfig(speed=True)
    xs = [1 + 0.1 * i for i in range(31)]
    c = [speed_reward(x, 4, True, cfg) for x in xs]
    w = [speed_reward(x, 4, False, cfg) for x in xs]
    assert all(a <= b for a, b in zip(c, c[1:])) and all(a >= b for a, b in zip(w, w[1:]))
    assert min(c) == 0.5 and max(c) == 1.0 and max(w) == 0.0 and min(w) == -0.5


def test_format_reward_cases():
    assert format_reward("so the answer is \\boxed{3}.", 32) == 1.0
    assert format_reward("$$\\boxed{\\frac{1}{2}}$$", 32) == 1.0
    assert format_reward("\\boxed{3} or maybe \\boxed{4}", 32) == 0.0
    assert format_reward("\\boxed{3} " + "and then I keep talking " * 3, 32) == 0.0
    assert format_reward("the answer is 3", 32) == 0.0
    assert format_reward("\\boxed{3", 32) == 0.0


def test_reward_terms_and_total():
    maps = [[0, 0, 1, 1], [0, 1, 2, 3], [0, 0, 0, 0], [0, 1, -1, -1]]
    texts = ["\\boxed{\\frac{1}{2}}", "\\boxed{0.5}", "it is \\boxed{3} and \\boxed{7}", "no box"]
    gts = ["0.5", "1/2", "0.5", "0.5"]
    fn = RewardFunction(RewardConfig(speed=True, format_weight=0.25))
    out = fn.batch(texts, gts, maps, block_size=4)
    assert out["correctness"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert out["format"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert out["tokens_per_step"].tolist() == [2.0, 1.0, 4.0, 1.0]
    assert out["speed"].tolist() == pytest.approx([0.625, 0.5, -0.5, 0.0])
    expected = out["correctness"] + 0.25 * out["format"] + out["speed"]
    assert torch.allclose(out["total"], expected)
    # without speed/format the total is the correctness alone
    plain = RewardFunction(RewardConfig()).batch(texts, gts)
    assert torch.equal(plain["total"], plain["correctness"]) and plain["speed"].abs().sum() == 0
    assert torch.equal(plain["format"], out["format"])  # reported even when it does not count
    with pytest.raises(ConfigError, match="step_map"):
        fn("\\boxed{1}", "1")
    with pytest.raises(ValueError, match="one of each"):
        fn.batch(texts, gts[:2])


# --------------------------------------------------------------------------- PPO


def _batch(gen, b=3, s=7):
    logp = -torch.rand(b, s, generator=gen) * 3
    adv = torch.randn(b, generator=gen)
    mask = torch.rand(b, s, generator=gen) > 0.3
    return logp, adv, mask


def test_ppo_first_update_is_the_policy_gradient(gen):
    logp0, adv, mask = _batch(gen)
    logp = logp0.clone().requires_grad_(True)
    terms = ppo_loss(logp, logp0.clone(), adv, mask)
    assert terms.ratio_sum == mask.sum()  # every ratio is exactly 1
    m = terms.means()
    assert m["ratio"] == 1.0 and m["clip_fraction"] == 0.0
    a = adv.unsqueeze(1).expand_as(logp0)
    unclipped = -(a * mask).sum() / mask.sum()
    assert torch.equal(terms.loss(), unclipped)
    terms.loss().backward()
    # d/dlogp of -r*A at r=1 is -A, averaged over the target tokens
    expected = torch.where(mask, -a / mask.sum(), torch.zeros_like(a))
    assert torch.allclose(logp.grad, expected)


def test_ppo_asymmetric_clip_cuts_the_right_gradients():
    old = torch.zeros(1, 6)
    log_r = torch.log(torch.tensor([[1.25, 1.25, 1.35, 0.7, 0.7, 1.35]]))
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0, 1.0, -1.0]])
    logp = log_r.clone().requires_grad_(True)
    terms = ppo_loss(logp, old, adv, torch.ones(1, 6, dtype=torch.bool))  # eps_low .2, eps_high .28
    terms.loss().backward()
    g = logp.grad[0] * 6  # per-token gradient of the summed loss: -A * r where unclipped, 0 where cut
    r = log_r.exp()[0]
    assert g[0] == pytest.approx(-r[0].item())  # 1.25 < 1.28: not clipped under clip-higher
    assert g[1] == pytest.approx(r[1].item())  # A<0: the upper clip never binds
    assert g[2] == 0.0  # 1.35 > 1.28 with A>0: clipped
    assert g[3] == 0.0  # 0.7 < 0.8 with A<0: clipped
    assert g[4] == pytest.approx(-r[4].item())  # A>0 below the lower bound: still pushed up
    assert g[5] == pytest.approx(r[5].item())
    assert terms.means()["clip_fraction"] == pytest.approx(2 / 6)
    pg = -torch.minimum(r * adv[0], r.clamp(0.8, 1.28) * adv[0])
    assert terms.loss().item() == pytest.approx(pg.mean().item())
    sym = ppo_loss(log_r, old, adv, torch.ones(1, 6, dtype=torch.bool), PPOConfig(eps_high=0.2))
    assert sym.means()["clip_fraction"] == pytest.approx(3 / 6)  # 1.25 is clipped by symmetric 0.2


def test_ppo_kl_and_entropy_terms(gen):
    logp0, adv, mask = _batch(gen)
    ref = logp0 - 0.3 * torch.rand(logp0.shape, generator=gen)
    assert torch.equal(k3_kl(logp0, logp0), torch.zeros_like(logp0))
    d = ref - logp0
    assert torch.allclose(k3_kl(logp0, ref), d.exp() - d - 1)
    assert (k3_kl(logp0, ref) >= 0).all()
    base = ppo_loss(logp0, logp0, adv, mask).loss()
    with_kl = ppo_loss(logp0, logp0, adv, mask, PPOConfig(kl_coef=0.1), ref_logp=ref)
    kl_mean = (k3_kl(logp0, ref) * mask).sum() / mask.sum()
    assert with_kl.loss().item() == pytest.approx((base + 0.1 * kl_mean).item(), rel=1e-6)
    assert with_kl.means()["kl"] == pytest.approx(kl_mean.item(), rel=1e-6)

    V = 11
    logits = torch.randn(*logp0.shape, V, generator=gen)
    ent = token_entropy(logits)
    p = logits.softmax(-1)
    assert torch.allclose(ent, -(p * p.log()).sum(-1), atol=1e-5)
    assert torch.allclose(token_entropy(torch.zeros(2, V)), torch.full((2,), math.log(V)))
    a = ppo_loss(logp0, logp0, adv, mask, PPOConfig(entropy_coef=0.01), logits=logits)
    b = ppo_loss(logp0, logp0, adv, mask, PPOConfig(entropy_coef=0.01), entropy=ent)
    ent_mean = (ent * mask).sum() / mask.sum()
    assert a.loss().item() == pytest.approx(b.loss().item())
    assert a.loss().item() == pytest.approx((base - 0.01 * ent_mean).item(), rel=1e-6)
    with pytest.raises(ValueError, match="ref_logp"):
        ppo_loss(logp0, logp0, adv, mask, PPOConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="entropy"):
        ppo_loss(logp0, logp0, adv, mask, PPOConfig(entropy_coef=0.1))


def test_ppo_sum_count_aggregation_is_split_invariant(gen):
    logp0, _, mask = _batch(gen, b=6, s=9)
    adv = torch.randn(6, 9, generator=gen)  # per-token advantages
    logp = logp0 + 0.4 * torch.randn(logp0.shape, generator=gen)
    whole = ppo_loss(logp, logp0, adv, mask)
    parts = ppo_loss(logp[:2], logp0[:2], adv[:2], mask[:2]) + ppo_loss(logp[2:], logp0[2:], adv[2:], mask[2:])
    assert parts.count == whole.count == mask.sum()
    assert parts.loss().item() == pytest.approx(whole.loss().item(), rel=1e-6)
    for k, v in whole.means().items():
        assert parts.means()[k] == pytest.approx(v, rel=1e-6)
    # padding with -inf log-probs outside the mask does not poison the sums
    padded = torch.where(mask, logp, torch.full_like(logp, -float("inf")))
    assert ppo_loss(padded, logp0, adv, mask).loss().item() == pytest.approx(whole.loss().item(), rel=1e-6)
    empty = ppo_loss(logp, logp0, adv, torch.zeros_like(mask))
    assert empty.loss().item() == 0.0


def test_token_logprobs_match_log_softmax(gen):
    logits = torch.randn(2, 5, 13, generator=gen)
    tgt = torch.randint(0, 13, (2, 5), generator=gen)
    lp = token_logprobs(logits, tgt)
    for i in range(2):
        for j in range(5):
            assert lp[i, j].item() == pytest.approx(torch.log_softmax(logits[i, j], -1)[tgt[i, j]].item(), abs=1e-6)


def test_ppo_config_errors():
    for kw in (dict(eps_low=0.0), dict(eps_low=1.0), dict(eps_high=0.0), dict(kl_coef=-1.0),
               dict(entropy_coef=float("nan"))):
        with pytest.raises(ConfigError):
            PPOConfig(**kw)


def test_dynamic_sampling_accuracy_drops_all_correct_groups_whatever_their_speed_rewards():
    """DAPO drops groups whose accuracy is 0 or 1; with the speed reward their total rewards still differ."""
    class G:
        def __init__(self, correct, speed):
            self.correct = torch.tensor(correct, dtype=torch.float)
            self.rewards = self.correct + torch.tensor(speed)

    all_right = G([1, 1, 1, 1], [0.1, 0.3, 0.2, 0.0])  # accuracy 1, rewards differ by speed
    all_wrong = G([0, 0, 0, 0], [0.0, 0.0, 0.0, 0.0])
    mixed = G([1, 0, 1, 0], [0.2, 0.0, 0.1, 0.0])
    groups = [all_right, all_wrong, mixed]
    res = dynamic_sample(Source(groups), DynamicSamplingConfig(num_groups=1, criterion="accuracy"),
                         correct_of=lambda g: g.correct)
    assert res.groups == [mixed] and res.stats.dropped == 2
    assert DynamicSamplingConfig().criterion == "accuracy"  # the default
    res = dynamic_sample(Source(groups), DynamicSamplingConfig(num_groups=2, criterion="reward_std"))
    assert res.groups == [all_right, mixed] and res.stats.dropped == 1
    with pytest.raises(ConfigError, match="accuracy, reward_std"):
        DynamicSamplingConfig(criterion="std")
