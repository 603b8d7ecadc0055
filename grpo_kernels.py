"""A fused GRPO loss in Triton: the per-token loss and its gradient straight from the logits, one pass each way.

Why: the GRPO loss of a batch reads a (B, T, V) logits tensor. For Qwen2.5 (V = 151936) at B = 8, T = 1024 that
is 2.5 GB in bf16, and the eager path (upcast, log_softmax, gather, autograd) keeps several float32 copies of it:
the usual out-of-memory of GRPO training. The loss itself is a handful of flops per logit, so it is bound by
memory traffic: the best a kernel can do is read the logits once forward, and read them and write d(logits) once
backward. This file does exactly that, and never holds a float32 (B, T, V) tensor.

What it computes is the per-token part of grpo.grpo_loss, on log-probs it forms itself:

    fused_per_token_loss(logits, completion_ids, old, ref, advantages, mask, ...)
        == the per-token loss L_t of grpo.grpo_loss(grpo.selective_log_softmax(logits.float() / temperature, ids), ...)

and grpo.py averages it over tokens (grpo.aggregate_loss, the same for both paths): loss = sum_t w_t L_t, so
the gradient arriving here is d(loss)/d(L_t) = w_t, and the kernels only ever see per-token math.

Where it runs: on a CUDA device, compiled. Without one, Triton's interpreter (NumPy on the CPU, slow) runs it
when the environment has TRITON_INTERPRET=1 before this module is imported; the tests and notebook 03 set it,
and so does `python grpo_kernels.py` on a machine without CUDA. Importing this module never sets it.

`python grpo_kernels.py` checks the kernels against grpo.py's reference; `python bench.py kernel` times them.
"""

from __future__ import annotations

import os

import torch

if __name__ == "__main__" and not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before Triton is imported
    print("No CUDA device: the kernels run in Triton's interpreter (TRITON_INTERPRET=1), NumPy on the CPU.")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


def _block_size(V: int) -> int:
    # 4096 elements per step: 8 KB of bf16 per program and iteration, enough bytes in flight to cover the
    # latency of HBM, while the loop over V stays short (37 steps for Qwen's V).
    return min(4096, triton.next_power_of_2(V))


@triton.jit
def _ratio_and_clip(logp, old_ptr, row, A, epsilon_low, epsilon_high, HAS_OLD: tl.constexpr):
    """rho = pi_theta / pi_old = exp(logp - old) (1 when there is no pi_old: num_iterations = 1), and whether
    the clip removed the token's gradient: rho < 1 - epsilon_low with A < 0, or rho > 1 + epsilon_high with
    A > 0. Shared by the forward kernel (the loss, the clip metrics) and the backward (which tokens get 0)."""
    if HAS_OLD:
        rho = tl.exp(logp - tl.load(old_ptr + row))
    else:
        rho = tl.exp(logp - logp)
    is_low = (rho < 1.0 - epsilon_low) & (A < 0)
    is_high = (rho > 1.0 + epsilon_high) & (A > 0)
    return rho, is_low, is_high


@triton.jit(do_not_specialize=["T"])
def _grpo_forward_kernel(
    logits_ptr, stride_b, stride_t,  # logits (B, T, V); unit stride over V, any stride over B and T
    ids_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr,  # (B*T,) int64, float32, float32, (B,) float32, (B*T,) int32
    loss_ptr, lse_ptr, kl_ptr, low_ptr, high_ptr, entropy_ptr,  # (B*T,) float32 outputs, zero-initialised
    T, V,
    temperature, beta, epsilon_low, epsilon_high,
    HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One program per token row (b, t), on a 1-D grid over the B*T rows.

    Math, with z = logits[b, t, :] / temperature (float32) and y = completion_ids[b, t]:
        lse  = log sum_v exp(z_v)                     online over blocks of V: running max m, running sum s
        logp = z_y - lse                              log pi_theta(y)
        rho  = exp(logp - old)                        (old = logp when HAS_OLD is false: rho = 1)
        L    = -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A) + beta * (exp(ref - logp) - (ref - logp) - 1)
        H    = lse - sum_v softmax(z)_v z_v           the entropy, a metric, from the same pass
    Memory traffic per token: V logits read once (2V bytes in bf16), plus ~30 bytes of per-token inputs and
    outputs. Masked tokens (mask = 0) read nothing and keep their zeros.
    Saved for backward: lse, one float32 per token. Nothing of size V.
    """
    row = tl.program_id(0).to(tl.int64)  # 64-bit from the start: b * stride_b overflows int32 at B*T*V > 2^31
    if tl.load(mask_ptr + row) != 0:
        b = row // T
        t = row % T
        row_ptr = logits_ptr + b * stride_b + t * stride_t
        cols = tl.arange(0, BLOCK_V)
        # Online log-sum-exp (Milakov & Gimelshein 2018): after each block, m = max so far and
        # s = sum exp(z - m) so far; when the max grows, the old sum is rescaled by exp(m_old - m_new).
        # zs = sum exp(z - m) * z, rescaled the same way, gives the entropy.
        # Logits of -inf (banned tokens, and the tail beyond V) count as exp(-inf) = 0, also in a block that holds
        # nothing else: m stays -inf until a finite logit arrives, and m_safe keeps exp() from seeing -inf + inf.
        m = tl.full([], float("-inf"), tl.float32)  # -inf, not 0: logits may all be very negative
        s = tl.zeros([], tl.float32)
        zs = tl.zeros([], tl.float32)
        for start in range(0, V, BLOCK_V):
            valid = start + cols < V  # the tail block of a V that is not a multiple of BLOCK_V
            z = tl.load(row_ptr + start + cols, mask=valid, other=float("-inf")).to(tl.float32) / temperature
            m_new = tl.maximum(m, tl.max(z, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            rescale = tl.exp(m - m_safe)  # 0 while m = -inf (s and zs are still 0 then)
            e = tl.exp(z - m_safe)  # <= 1: no overflow even for logits of 1e4; 0 where z = -inf
            s = s * rescale + tl.sum(e, axis=0)
            zs = zs * rescale + tl.sum(e * tl.where(e > 0, z, 0.0), axis=0)  # where(): no 0 * -inf = NaN
            m = m_new
        lse = m + tl.log(s)

        y = tl.load(ids_ptr + row)
        logp = tl.load(row_ptr + y).to(tl.float32) / temperature - lse
        A = tl.load(adv_ptr + b)
        rho, is_low, is_high = _ratio_and_clip(logp, old_ptr, row, A, epsilon_low, epsilon_high, HAS_OLD)
        rho_clipped = tl.minimum(tl.maximum(rho, 1.0 - epsilon_low), 1.0 + epsilon_high)
        loss = -tl.minimum(rho * A, rho_clipped * A)
        if HAS_REF:
            log_ratio_ref = tl.load(ref_ptr + row) - logp
            kl = tl.exp(log_ratio_ref) - log_ratio_ref - 1.0
            loss += beta * kl
            tl.store(kl_ptr + row, kl)
        tl.store(loss_ptr + row, loss)
        tl.store(lse_ptr + row, lse)
        tl.store(low_ptr + row, is_low.to(tl.float32))
        tl.store(high_ptr + row, is_high.to(tl.float32))
        tl.store(entropy_ptr + row, lse - zs / s)


@triton.jit(do_not_specialize=["T"])
def _grpo_backward_kernel(
    logits_ptr, stride_b, stride_t,  # logits (B, T, V), as in the forward
    dlogits_ptr, dstride_b, dstride_t,  # d(logits), the logits' dtype; may be the logits buffer itself
    ids_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, lse_ptr, dloss_ptr,  # (B*T,) except adv (B,)
    T, V,
    temperature, beta, epsilon_low, epsilon_high,
    HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One program per token row, writing d(logits) for the whole row.

    Math: with g = d(loss)/d(L) for this token (grpo.py's token weight w_t, times the upstream gradient),
        dL/dlogp = -A * rho          if the token is not clipped, else 0        (the surrogate)
                 + beta * (1 - exp(ref - logp))                                  (the k3 KL)
        d(loss)/dz_v     = g * dL/dlogp * (1[v = y] - p_v),  p_v = exp(z_v - lse)   (log-softmax's Jacobian)
        d(loss)/dlogits_v = d(loss)/dz_v / temperature
    (1[v = y] - p_v) is formed in float32 and rounded to the logits' dtype only once, at the store: at p = 0.999
    the target's gradient is 1e-3 * g, which bf16 arithmetic on p would have rounded to 0 (Liger PR 1329).
    Memory traffic per token: V logits read, V gradients written (4V bytes in bf16). Masked rows only write
    zeros. In place, the gradient overwrites the logits it was computed from, column block by column block:
    each block is read before it is written, and no other program touches the row.
    """
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    cols = tl.arange(0, BLOCK_V)
    out_ptr = dlogits_ptr + b * dstride_b + t * dstride_t
    if tl.load(mask_ptr + row) != 0:
        row_ptr = logits_ptr + b * stride_b + t * stride_t
        lse = tl.load(lse_ptr + row)
        y = tl.load(ids_ptr + row)
        logp = tl.load(row_ptr + y).to(tl.float32) / temperature - lse  # recomputed: cheaper than storing it
        A = tl.load(adv_ptr + b)
        rho, is_low, is_high = _ratio_and_clip(logp, old_ptr, row, A, epsilon_low, epsilon_high, HAS_OLD)
        dL_dlogp = tl.where(is_low | is_high, 0.0, -A * rho)
        if HAS_REF:
            dL_dlogp += beta * (1.0 - tl.exp(tl.load(ref_ptr + row) - logp))
        coef = tl.load(dloss_ptr + row) * dL_dlogp / temperature
        for start in range(0, V, BLOCK_V):
            valid = start + cols < V
            z = tl.load(row_ptr + start + cols, mask=valid, other=0.0).to(tl.float32) / temperature
            p = tl.exp(z - lse)
            grad = coef * (tl.where(start + cols == y, 1.0, 0.0) - p)
            tl.store(out_ptr + start + cols, grad.to(dlogits_ptr.dtype.element_ty), mask=valid)
    else:
        for start in range(0, V, BLOCK_V):
            valid = start + cols < V
            tl.store(out_ptr + start + cols, tl.zeros([BLOCK_V], tl.float32).to(dlogits_ptr.dtype.element_ty), mask=valid)


class _FusedPerTokenLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, completion_ids, old, ref, advantages, mask, temperature, beta, eps_low, eps_high, inplace):
        B, T, V = logits.shape
        N = B * T
        if logits.stride(-1) != 1:
            logits = logits.contiguous()
        ids = completion_ids.reshape(-1).long().contiguous()  # (N,)
        mask_i = (mask.reshape(-1) != 0).to(torch.int32).contiguous()  # (N,) which tokens to compute
        adv = advantages.float().contiguous()  # (B,)
        old_f = old.reshape(-1).float().contiguous() if old is not None else adv  # (N,) or a placeholder
        ref_f = ref.reshape(-1).float().contiguous() if ref is not None else adv
        loss = torch.zeros(N, dtype=torch.float32, device=logits.device)  # (N,)
        stats = torch.zeros(5, N, dtype=torch.float32, device=logits.device)  # lse, kl, low, high, entropy
        _grpo_forward_kernel[(N,)](
            logits, logits.stride(0), logits.stride(1),
            ids, old_f, ref_f, adv, mask_i,
            loss, stats[0], stats[1], stats[2], stats[3], stats[4],
            T, V, float(temperature), float(beta), float(eps_low), float(eps_high),
            HAS_OLD=old is not None, HAS_REF=ref is not None, BLOCK_V=_block_size(V),
        )
        ctx.save_for_backward(logits, ids, old_f, ref_f, adv, mask_i, stats[0])
        ctx.args = (float(temperature), float(beta), float(eps_low), float(eps_high), old is not None, ref is not None,
                    inplace)
        per_token_stats = stats[1:].view(4, B, T)  # kl, low, high, entropy: (4, B, T)
        ctx.mark_non_differentiable(per_token_stats)
        return loss.view(B, T), per_token_stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        logits, ids, old_f, ref_f, adv, mask_i, lse = ctx.saved_tensors
        temperature, beta, eps_low, eps_high, has_old, has_ref, inplace = ctx.args
        B, T, V = logits.shape
        dloss = grad_loss.float().reshape(-1).contiguous()  # (N,) d(loss)/d(L_t): grpo.py's token weights
        dlogits = logits if inplace else torch.empty_like(logits, memory_format=torch.contiguous_format)
        _grpo_backward_kernel[(B * T,)](
            logits, logits.stride(0), logits.stride(1),
            dlogits, dlogits.stride(0), dlogits.stride(1),
            ids, old_f, ref_f, adv, mask_i, lse, dloss,
            T, V, temperature, beta, eps_low, eps_high,
            HAS_OLD=has_old, HAS_REF=has_ref, BLOCK_V=_block_size(V),
        )
        return dlogits, None, None, None, None, None, None, None, None, None, None


def fused_per_token_loss(
    logits: torch.Tensor,
    completion_ids: torch.Tensor,
    old_per_token_logps: torch.Tensor | None,
    ref_per_token_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    beta: float,
    epsilon_low: float,
    epsilon_high: float,
    inplace: bool = False,
):
    """The per-token GRPO loss from logits (B, T, V), where logits[:, t] scores completion_ids[:, t].

    Returns (per_token_loss, per_token_kl, is_low, is_high, entropy), each (B, T) float32; only per_token_loss
    carries a gradient, and per_token_kl is None when there is no KL term (beta = 0 or no ref_per_token_logps).
    Tokens where completion_mask is 0 are not computed (0 in every output). grpo.aggregate_loss turns these
    into the loss and its metrics. inplace=True writes d(logits) into the logits' own buffer in backward, so no
    second (B, T, V) tensor is allocated: use it only when nothing else needs the logits after this loss (true
    in grpo.py, where they come straight out of the LM head).
    """
    if logits.ndim != 3 or completion_ids.shape != logits.shape[:2] or completion_mask.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits (B, T, V) with completion_ids and completion_mask (B, T); got {tuple(logits.shape)}, "
            f"{tuple(completion_ids.shape)}, {tuple(completion_mask.shape)}."
        )
    V = logits.shape[-1]
    if completion_ids.numel() and (int(completion_ids.min()) < 0 or int(completion_ids.max()) >= V):
        raise ValueError(f"completion_ids must lie in [0, {V}), the vocabulary of the logits; got ids from "
                         f"{int(completion_ids.min())} to {int(completion_ids.max())}.")
    if not logits.is_cuda and isinstance(_grpo_forward_kernel, triton.runtime.JITFunction):  # compiled, not interpreted
        raise ValueError(
            "the fused loss needs the logits on a CUDA device; on a CPU, set TRITON_INTERPRET=1 before importing "
            "grpo_kernels (Triton's interpreter, slow) or use grpo.grpo_loss."
        )
    ref = ref_per_token_logps if beta != 0 else None  # as in grpo.grpo_loss: no KL term at beta = 0
    per_token_loss, (kl, is_low, is_high, entropy) = _FusedPerTokenLoss.apply(
        logits, completion_ids, old_per_token_logps, ref, advantages, completion_mask,
        temperature, beta, epsilon_low, epsilon_high, inplace,
    )
    return per_token_loss, (kl if ref is not None else None), is_low, is_high, entropy


# ----------------------------------------------------------------------------------------------------
# python grpo_kernels.py: the kernels against the reference in grpo.py.
# ----------------------------------------------------------------------------------------------------
def check_against_reference(B, T, V, dtype, device, seed=0, loss_type="dapo", temperature=0.9):
    """Relative errors of the loss and of d(logits): this kernel (through grpo.aggregate_loss, as grpo.py calls
    it) against grpo.grpo_loss on grpo.selective_log_softmax, both from the same logits."""
    import grpo  # the reference; imported here so that the kernel itself never depends on grpo.py

    g = torch.Generator(device=device).manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g, device=device) * 2).to(dtype)  # (B, T, V)
    ids = torch.randint(0, V, (B, T), generator=g, device=device)  # (B, T)
    exact = torch.log_softmax(logits.float() / temperature, -1).gather(-1, ids[..., None]).squeeze(-1)  # (B, T)
    old = exact + 0.3 * torch.randn(B, T, generator=g, device=device)  # (B, T) near pi_theta: some tokens clip
    ref = exact + 0.1 * torch.randn(B, T, generator=g, device=device)  # (B, T)
    adv = torch.randn(B, generator=g, device=device)  # (B,)
    mask = (torch.arange(T, device=device)[None, :] < torch.randint(T // 2, T + 1, (B, 1), generator=g, device=device))
    kw = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.28)

    x = logits.clone().requires_grad_()
    logps = grpo.selective_log_softmax(x.float() / temperature, ids)  # (B, T)
    expected, _ = grpo.grpo_loss(logps, old, ref, adv, mask, **kw, loss_type=loss_type)
    expected.backward()
    y = logits.clone().requires_grad_()
    per_token = fused_per_token_loss(y, ids, old, ref, adv, mask, temperature=temperature, **kw)
    loss, _ = grpo.aggregate_loss(*per_token[:4], mask, beta=kw["beta"], loss_type=loss_type)
    loss.backward()
    loss_err = abs(loss.item() - expected.item()) / abs(expected.item())
    grad_err = ((y.grad.float() - x.grad.float()).norm() / x.grad.float().norm()).item()
    return loss_err, grad_err


if __name__ == "__main__":
    on_gpu = torch.cuda.is_available()
    shapes = [(8, 1024, 151936), (16, 512, 49152)] if on_gpu else [(2, 16, 5000)]  # the interpreter is slow
    for shape in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            loss_err, grad_err = check_against_reference(*shape, dtype, "cuda" if on_gpu else "cpu")
            print(f"B, T, V = {shape} {str(dtype):15s} loss relative error {loss_err:.1e}, "
                  f"d(logits) relative error {grad_err:.1e}")
            # float32 agrees to rounding; bf16 d(logits) is the same float32 gradient rounded to bf16 (2^-8)
            assert loss_err < 1e-4 and grad_err < (1e-4 if dtype == torch.float32 else 1e-2), "kernel != reference"
    print("The kernels agree with grpo.py's reference." + ("" if on_gpu else " Timings need a GPU: python bench.py kernel"))
