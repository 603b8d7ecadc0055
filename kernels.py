"""A fused GRPO loss in Triton: the loss and its gradient straight from the logits, one pass each way.

Why: the GRPO loss of a batch reads a (B, T, V) logits tensor. For Qwen2.5 (V = 151936) at B = 8, T = 1024 that
is 2.5 GB in bf16, and the eager path (upcast, log_softmax, gather, autograd) keeps several float32 copies of it:
the usual out-of-memory of GRPO training. The loss itself is a handful of flops per logit, so it is bound by
memory traffic: the best a kernel can do is read the logits once forward, and read them and write d(logits) once
backward. This file does exactly that, and never holds a float32 (B, T, V) tensor.

    fused_grpo_loss(logits, completion_ids, old, ref, advantages, mask, ...) == 
        grpo.grpo_loss(grpo.selective_log_softmax(logits.float() / temperature, completion_ids), old, ref, ...)

The aggregation over tokens (which loss_type, which normaliser) is grpo.token_weights, shared with the
reference: loss = sum_t w_t * L_t, so d(loss)/d(L_t) = w_t and the kernels only ever see per-token math.

Run `python kernels.py` for the check and the benchmark (a GPU for timings; on a CPU it runs the interpreter).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # no GPU: Triton's interpreter runs the kernels with NumPy on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import grpo  # noqa: E402  (token_weights, masked_mean, and the reference we are checked against)


def _block_size(V: int) -> int:
    # 4096 elements per step: 8 KB of bf16 per program and iteration, enough bytes in flight to cover the
    # latency of HBM, while the loop over V stays short (37 steps for Qwen's V).
    return min(4096, triton.next_power_of_2(V))


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
        m = tl.full([], float("-inf"), tl.float32)  # -inf, not 0: logits may all be very negative
        s = tl.zeros([], tl.float32)
        zs = tl.zeros([], tl.float32)
        for start in range(0, V, BLOCK_V):
            valid = start + cols < V  # the tail block of a V that is not a multiple of BLOCK_V
            z = tl.load(row_ptr + start + cols, mask=valid, other=float("-inf")).to(tl.float32) / temperature
            m_new = tl.maximum(m, tl.max(z, axis=0))  # finite: every block holds at least one valid column
            rescale = tl.exp(m - m_new)  # exp(-inf) = 0 on the first block
            e = tl.where(valid, tl.exp(z - m_new), 0.0)  # <= 1: no overflow even for logits of 1e4
            s = s * rescale + tl.sum(e, axis=0)
            zs = zs * rescale + tl.sum(e * tl.where(valid, z, 0.0), axis=0)  # where(): no 0 * -inf = NaN
            m = m_new
        lse = m + tl.log(s)

        y = tl.load(ids_ptr + row)
        logp = tl.load(row_ptr + y).to(tl.float32) / temperature - lse
        A = tl.load(adv_ptr + b)
        if HAS_OLD:
            rho = tl.exp(logp - tl.load(old_ptr + row))
        else:
            rho = tl.exp(logp - logp)
        rho_clipped = tl.minimum(tl.maximum(rho, 1.0 - epsilon_low), 1.0 + epsilon_high)
        loss = -tl.minimum(rho * A, rho_clipped * A)
        if HAS_REF:
            log_ratio_ref = tl.load(ref_ptr + row) - logp
            kl = tl.exp(log_ratio_ref) - log_ratio_ref - 1.0
            loss += beta * kl
            tl.store(kl_ptr + row, kl)
        tl.store(loss_ptr + row, loss)
        tl.store(lse_ptr + row, lse)
        tl.store(low_ptr + row, ((rho < 1.0 - epsilon_low) & (A < 0)).to(tl.float32))
        tl.store(high_ptr + row, ((rho > 1.0 + epsilon_high) & (A > 0)).to(tl.float32))
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

    Math: with g = d(loss)/d(L) for this token (the upstream gradient times the token's weight w_t),
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
        if HAS_OLD:
            rho = tl.exp(logp - tl.load(old_ptr + row))
        else:
            rho = tl.exp(logp - logp)
        clipped = ((rho < 1.0 - epsilon_low) & (A < 0)) | ((rho > 1.0 + epsilon_high) & (A > 0))
        dL_dlogp = tl.where(clipped, 0.0, -A * rho)
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


class _FusedGRPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, completion_ids, old, ref, advantages, mask, weights, temperature, beta, eps_low, eps_high, inplace):
        B, T, V = logits.shape
        N = B * T
        if logits.stride(-1) != 1:
            logits = logits.contiguous()
        ids = completion_ids.reshape(-1).long().contiguous()  # (N,)
        mask_i = mask.reshape(-1).to(torch.int32).contiguous()  # (N,)
        adv = advantages.float().contiguous()  # (B,)
        old_f = old.reshape(-1).float().contiguous() if old is not None else adv  # (N,) or a placeholder
        ref_f = ref.reshape(-1).float().contiguous() if ref is not None else adv
        has_ref = ref is not None and beta != 0
        out = torch.zeros(6, N, dtype=torch.float32, device=logits.device)  # loss, lse, kl, low, high, entropy
        _grpo_forward_kernel[(N,)](
            logits, logits.stride(0), logits.stride(1),
            ids, old_f, ref_f, adv, mask_i,
            out[0], out[1], out[2], out[3], out[4], out[5],
            T, V, float(temperature), float(beta), float(eps_low), float(eps_high),
            HAS_OLD=old is not None, HAS_REF=has_ref, BLOCK_V=_block_size(V),
        )
        per_token_loss = out[0].view(B, T)  # (B, T)
        loss = (per_token_loss * weights).sum()
        ctx.save_for_backward(logits, ids, old_f, ref_f, adv, mask_i, out[1], weights)
        ctx.args = (float(temperature), float(beta), float(eps_low), float(eps_high), old is not None, has_ref, inplace)
        per_token_metrics = out[2:].view(4, B, T)  # kl, low, high, entropy: (4, B, T)
        ctx.mark_non_differentiable(per_token_metrics)
        return loss, per_token_metrics

    @staticmethod
    def backward(ctx, grad_loss, _grad_metrics):
        logits, ids, old_f, ref_f, adv, mask_i, lse, weights = ctx.saved_tensors
        temperature, beta, eps_low, eps_high, has_old, has_ref, inplace = ctx.args
        B, T, V = logits.shape
        dloss = (grad_loss.float() * weights).reshape(-1).contiguous()  # (N,) d(loss)/d(L_t)
        dlogits = logits if inplace else torch.empty_like(logits, memory_format=torch.contiguous_format)
        _grpo_backward_kernel[(B * T,)](
            logits, logits.stride(0), logits.stride(1),
            dlogits, dlogits.stride(0), dlogits.stride(1),
            ids, old_f, ref_f, adv, mask_i, lse, dloss,
            T, V, temperature, beta, eps_low, eps_high,
            HAS_OLD=has_old, HAS_REF=has_ref, BLOCK_V=_block_size(V),
        )
        return dlogits, None, None, None, None, None, None, None, None, None, None, None


def fused_grpo_loss(
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
    loss_type: str,
    max_completion_length: int | None = None,
    inplace: bool = False,
) -> tuple[torch.Tensor, dict]:
    """The GRPO loss and metrics from logits (B, T, V), where logits[:, t] scores completion_ids[:, t].

    Same values and gradients as grpo.grpo_loss on grpo.selective_log_softmax(logits.float() / temperature, ids),
    plus the entropy metric. inplace=True writes d(logits) into the logits' own buffer in backward, so no second
    (B, T, V) tensor is allocated: use it only when nothing else needs the logits after this loss (true in
    grpo.py, where they come straight out of the LM head).
    """
    if beta != 0 and ref_per_token_logps is None:
        raise ValueError("beta != 0 needs ref_per_token_logps (the reference model's log-probs); pass them or set beta=0.")
    if logits.ndim != 3 or completion_ids.shape != logits.shape[:2] or completion_mask.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits (B, T, V) with completion_ids and completion_mask (B, T); got {tuple(logits.shape)}, "
            f"{tuple(completion_ids.shape)}, {tuple(completion_mask.shape)}."
        )
    weights = grpo.token_weights(completion_mask, loss_type, max_completion_length)  # (B, T)
    loss, per_token = _FusedGRPOLoss.apply(
        logits, completion_ids, old_per_token_logps, ref_per_token_logps, advantages, completion_mask,
        weights, temperature, beta, epsilon_low, epsilon_high, inplace,
    )
    kl, low, high, entropy = per_token  # (B, T) each
    mask = completion_mask.float()  # (B, T)
    metrics = {
        "kl": grpo.masked_mean(kl, mask).item(),
        "clip_ratio/low_mean": grpo.masked_mean(low, mask).item(),
        "clip_ratio/high_mean": grpo.masked_mean(high, mask).item(),
        "clip_ratio/region_mean": grpo.masked_mean(torch.maximum(low, high), mask).item(),
        "entropy": grpo.masked_mean(entropy, mask).item(),
    }
    return loss, metrics


# ----------------------------------------------------------------------------------------------------
# python kernels.py: a correctness check, then (on a GPU) the benchmark table.
# ----------------------------------------------------------------------------------------------------
def _inputs(B, T, V, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, device=device, dtype=torch.float32).mul_(2).to(dtype)  # (B, T, V)
    ids = torch.randint(0, V, (B, T), generator=g, device=device)  # (B, T)
    old = -torch.rand(B, T, generator=g, device=device) * 12 - 5  # (B, T) plausible log-probs
    ref = old + torch.randn(B, T, generator=g, device=device) * 0.1  # (B, T)
    adv = torch.randn(B, generator=g, device=device)  # (B,)
    mask = (torch.arange(T, device=device)[None, :] < torch.randint(T // 2, T + 1, (B, 1), device=device)).long()
    return logits, ids, old, ref, adv, mask


LOSS_ARGS = dict(temperature=0.9, beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_type="dapo")


def _reference(logits, ids, old, ref, adv, mask):
    """The eager PyTorch reference of grpo.py, as grpo.py calls it."""
    kw = {k: v for k, v in LOSS_ARGS.items() if k != "temperature"}
    logps = grpo.selective_log_softmax(logits.float() / LOSS_ARGS["temperature"], ids)  # (B, T)
    return grpo.grpo_loss(logps, old, ref, adv, mask, **kw)[0]


def _check(B, T, V, dtype, device):
    """Loss and d(logits) of the kernel against the reference (float32 math on the same logits)."""
    logits, ids, old, ref, adv, mask = _inputs(B, T, V, dtype, device)
    x = logits.clone().requires_grad_()
    expected = _reference(x, ids, old, ref, adv, mask)
    expected.backward()
    y = logits.clone().requires_grad_()
    loss, _ = fused_grpo_loss(y, ids, old, ref, adv, mask, **LOSS_ARGS)
    loss.backward()
    loss_err = abs(loss.item() - expected.item()) / abs(expected.item())
    grad_err = ((y.grad.float() - x.grad.float()).norm() / x.grad.float().norm()).item()
    return loss_err, grad_err


def _benchmark(B, T, V, dtype=torch.bfloat16, repeats=20):
    """Median forward + backward time (CUDA events) and peak extra memory of each implementation."""
    device = "cuda"
    logits, ids, old, ref, adv, mask = _inputs(B, T, V, dtype, device)
    n_bytes = logits.numel() * logits.element_size()
    # the machine's copy bandwidth: read n_bytes and write n_bytes
    copy = torch.empty_like(logits)
    copy_ms = _time_ms(lambda _: copy.copy_(logits), lambda: None, repeats)
    bandwidth = 2 * n_bytes / (copy_ms / 1e3)
    del copy
    floor_ms = 3 * n_bytes / bandwidth * 1e3  # forward reads logits; backward reads them and writes d(logits)

    def run_reference(x):
        _reference(x, ids, old, ref, adv, mask).backward()

    compiled_reference = torch.compile(_reference)

    def run_compiled(x):
        compiled_reference(x, ids, old, ref, adv, mask).backward()

    def run_kernel(x, inplace):
        fused_grpo_loss(x, ids, old, ref, adv, mask, inplace=inplace, **LOSS_ARGS)[0].backward()

    candidates = [
        ("eager reference (grpo.py)", run_reference),
        ("torch.compile(reference)", run_compiled),
        ("this kernel", lambda x: run_kernel(x, False)),
        ("this kernel, in place", lambda x: run_kernel(x, True)),
    ]
    try:  # Liger Kernel's Triton GRPO loss, when installed; it takes the unshifted (B, T+1, V) logits
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss

        padded = torch.cat([logits, logits[:, -1:]], dim=1)  # (B, T+1, V)

        def run_liger(_x):
            x = padded.clone().requires_grad_()
            out = triton_grpo_loss(x, old, ref, ids, adv, mask, temperature=LOSS_ARGS["temperature"], beta=0.04,
                                   eps_low=0.2, eps_high=0.28, inplace=True, loss_type="dapo", reduce=True)
            (out[0] if isinstance(out, tuple) else out).backward()

        candidates.append(("Liger triton_grpo_loss", run_liger))
    except ImportError:
        print("(liger-kernel is not installed: its row is left out)")

    rows = []
    for name, fn in candidates:
        try:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            ms = _time_ms(fn, lambda: logits.clone().requires_grad_(), repeats)  # a fresh copy per run, untimed
            peak = torch.cuda.max_memory_allocated() - base - n_bytes  # extra beyond the logits themselves
            rows.append((name, ms, 3 * n_bytes / (ms / 1e3) / 1e9, ms / floor_ms, peak / n_bytes))
        except Exception as error:  # a failing candidate is reported, not fatal
            rows.append((name, float("nan"), float("nan"), float("nan"), float("nan")))
            print(f"{name}: failed: {type(error).__name__}: {str(error)[:200]}")
    print(f"\nB={B} T={T} V={V} {str(dtype).replace('torch.', '')}: logits {n_bytes / 1e9:.2f} GB, "
          f"copy bandwidth {bandwidth / 1e12:.2f} TB/s, memory floor {floor_ms:.2f} ms")
    print(f"| {'implementation':28s} | fwd+bwd ms | GB/s  | x floor | peak extra memory / logits |")
    print(f"|{'-' * 30}|-----------:|------:|--------:|---------------------------:|")
    for name, ms, gbs, ratio, mem in rows:
        print(f"| {name:28s} | {ms:10.2f} | {gbs:5.0f} | {ratio:7.2f} | {mem:26.2f} |")
    return rows


def _time_ms(fn, make_input, repeats):
    """Median milliseconds of fn(make_input()) over `repeats` runs after 3 warm-ups, timed with CUDA events
    around fn alone."""
    for _ in range(3):
        fn(make_input())
    times = []
    for _ in range(repeats):
        x = make_input()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn(x)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        del x  # free this run's logits and gradient before the next copy is made
    return sorted(times)[len(times) // 2]


if __name__ == "__main__":
    if not torch.cuda.is_available():
        print("No CUDA device: checking the kernels under Triton's interpreter (TRITON_INTERPRET=1) at a small size.")
        for dtype in (torch.float32, torch.bfloat16):
            loss_err, grad_err = _check(2, 16, 5000, dtype, "cpu")
            print(f"  {str(dtype):15s} B=2 T=16 V=5000: loss relative error {loss_err:.1e}, "
                  f"d(logits) relative error {grad_err:.1e}")
        print("Timings need a GPU: run `python kernels.py` on one (see BENCHMARKS.md).")
    else:
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
        for shape in [(8, 1024, 151936), (16, 512, 49152)]:
            loss_err, grad_err = _check(*shape, torch.bfloat16, "cuda")
            print(f"check {shape} bf16: loss relative error {loss_err:.1e}, d(logits) relative error {grad_err:.1e}")
            assert loss_err < 1e-4 and grad_err < 1e-2, "the kernel disagrees with the reference"
        for shape in [(8, 1024, 151936), (16, 512, 49152)]:
            _benchmark(*shape)
