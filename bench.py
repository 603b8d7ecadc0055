"""Benchmarks that print a table. Speed lives here, not in the tests: it depends on the machine.

    python bench.py step       # one GRPO step of the embedded model, by phase: plain, shared prompt, bfloat16, TRL
    python bench.py kernel     # the fused GRPO loss against the eager reference, torch.compile and Liger (GPU)
    python bench.py preset     # a preset's step (mini-r1: Qwen2.5-3B's shape, random weights) and 450 steps' hours

`step` times whole GRPO steps (median after a warm-up step) with the host clock; `kernel` times many runs with
CUDA events after warm-ups. BENCHMARKS.md keeps the tables with the date, the device and the versions.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import platform
import random
import statistics

import torch

import grpo

LOSS_ARGS = dict(temperature=0.9, beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_type="dapo")


def kernel_inputs(B, T, V, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, device=device, dtype=torch.float32).mul_(2).to(dtype)  # (B, T, V)
    ids = torch.randint(0, V, (B, T), generator=g, device=device)  # (B, T)
    old = -torch.rand(B, T, generator=g, device=device) * 12 - 5  # (B, T) plausible log-probs
    ref = old + torch.randn(B, T, generator=g, device=device) * 0.1  # (B, T)
    adv = torch.randn(B, generator=g, device=device)  # (B,)
    mask = (torch.arange(T, device=device)[None, :] < torch.randint(T // 2, T + 1, (B, 1), device=device)).long()
    return logits, ids, old, ref, adv, mask


def reference_loss(logits, ids, old, ref, adv, mask):
    """The eager PyTorch reference of grpo.py, as grpo.py calls it."""
    kw = {k: v for k, v in LOSS_ARGS.items() if k != "temperature"}
    logps = grpo.selective_log_softmax(logits.float() / LOSS_ARGS["temperature"], ids)  # (B, T)
    return grpo.grpo_loss(logps, old, ref, adv, mask, **kw)[0]


def fused_loss(logits, ids, old, ref, adv, mask, inplace):
    """The Triton kernel, then grpo.aggregate_loss, as grpo.py calls it."""
    import grpo_kernels

    kw = {k: v for k, v in LOSS_ARGS.items() if k != "loss_type"}
    per_token = grpo_kernels.fused_per_token_loss(logits, ids, old, ref, adv, mask, inplace=inplace, **kw)
    return grpo.aggregate_loss(*per_token[:4], mask, beta=LOSS_ARGS["beta"], loss_type=LOSS_ARGS["loss_type"])[0]


def time_ms(fn, make_input, repeats):
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


def bench_kernel(B, T, V, dtype=torch.bfloat16, repeats=20):
    """Median forward + backward time (CUDA events) and peak extra memory of each implementation."""
    logits, ids, old, ref, adv, mask = kernel_inputs(B, T, V, dtype, "cuda")
    n_bytes = logits.numel() * logits.element_size()
    # the machine's copy bandwidth: read n_bytes and write n_bytes
    copy = torch.empty_like(logits)
    copy_ms = time_ms(lambda _: copy.copy_(logits), lambda: None, repeats)
    bandwidth = 2 * n_bytes / (copy_ms / 1e3)
    del copy
    floor_ms = 3 * n_bytes / bandwidth * 1e3  # forward reads logits; backward reads them and writes d(logits)

    compiled_reference = torch.compile(reference_loss)
    candidates = [
        ("eager reference (grpo.py)", lambda x: reference_loss(x, ids, old, ref, adv, mask).backward()),
        ("torch.compile(reference)", lambda x: compiled_reference(x, ids, old, ref, adv, mask).backward()),
        ("this kernel", lambda x: fused_loss(x, ids, old, ref, adv, mask, inplace=False).backward()),
        ("this kernel, in place", lambda x: fused_loss(x, ids, old, ref, adv, mask, inplace=True).backward()),
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
            ms = time_ms(fn, lambda: logits.clone().requires_grad_(), repeats)  # a fresh copy per run, untimed
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


def step_settings():
    """(name, GRPOConfig, forced completion length or None) of the two step benchmarks."""
    import train_countdown as tc

    preset = tc.PRESETS["cpu"]["config"]
    comparison = dict(preset, generation_batch_size=32, micro_batch_size=16, max_completion_length=64, beta=0.04,
                      loss_type="grpo", learning_rate=1e-6)  # TRL's comparison setting: 4 prompts x G = 8
    return [("the CPU preset (2 prompts x G = 8, completions up to 20 tokens)", grpo.GRPOConfig(**preset), None),
            ("4 prompts x G = 8, exactly 64 completion tokens, beta 0.04", grpo.GRPOConfig(**comparison), 64)]


def bench_step(cfg, forced_length, share_prompt, bf16, steps):
    """Seconds per phase of `steps` GRPO steps of the embedded model on Countdown prompts, after one warm-up step:
    {phase: median}."""
    import dataclasses

    import train_countdown as tc

    cfg = dataclasses.replace(cfg, share_prompt=share_prompt, bf16=bf16)
    model, tokenizer = grpo.load_model_and_tokenizer()
    if forced_length:  # every completion exactly this long: EOS is held back until then
        model.generate = functools.partial(model.generate, min_new_tokens=forced_length)
    ref_model, optimizer, scheduler = grpo.setup(model, cfg)
    preset = tc.PRESETS["cpu"]
    data = tc.generate_dataset(64, seed=1, num_numbers=preset["num_numbers"], max_number=preset["max_number"])
    funcs = [tc.REWARD_FUNCS[name] for name in preset["rewards"]]
    per_step = cfg.generation_batch_size // cfg.num_generations
    times = []
    for step in range(steps + 1):
        rows = data.select(range(step * per_step, (step + 1) * per_step))
        prompts = [tc.make_prompt(tokenizer, n, t, preset["style"]) for n, t in zip(rows["nums"], rows["target"])]
        m, _ = grpo.grpo_step(model, ref_model, tokenizer, optimizer, scheduler, prompts, funcs, cfg,
                              columns={"nums": rows["nums"], "target": rows["target"]})
        times.append({"generation": m["gen_time"], "pi_ref": m["logps_time"],
                      "update": m["train_time"] - m["logps_time"], "step": m["step_time"]})
    return {phase: statistics.median(t[phase] for t in times[1:]) for phase in times[0]}


def bench_trl_step(cfg, forced_length, bf16, steps):
    """The same steps on TRL's GRPOTrainer, through train_countdown's bridge (same config, prompts, rewards): {phase:
    median seconds}. Phases are timed around the policy's generate and pi_ref's forward passes; the update is the
    rest of the step."""
    import dataclasses
    import tempfile
    import time
    from pathlib import Path

    import trl
    from transformers import TrainerCallback

    import train_countdown as tc

    cfg = dataclasses.replace(cfg, bf16=bf16, max_steps=steps + 1, seed=1)
    preset = tc.PRESETS["cpu"]
    model, tokenizer = grpo.load_model_and_tokenizer()
    data = tc.generate_dataset(64, seed=1, num_numbers=preset["num_numbers"], max_number=preset["max_number"])
    dataset = tc.trl_dataset(tokenizer, data, list(range(len(data))), preset, cfg)
    spent = {"generation": 0.0, "pi_ref": 0.0}

    def timed(phase, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[phase] += time.perf_counter() - start
        return wrapper

    times = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            spent.update(generation=0.0, pi_ref=0.0, start=time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            step = time.perf_counter() - spent["start"]
            times.append({"generation": spent["generation"], "pi_ref": spent["pi_ref"],
                          "update": step - spent["generation"] - spent["pi_ref"], "step": step})

    with tempfile.TemporaryDirectory() as out:
        generation_kwargs = {"min_new_tokens": forced_length} if forced_length else None
        config = tc.trl_config(cfg, Path(out), list(preset["rewards"].values()), use_cpu=True, save_strategy="no",
                               logging_strategy="no", disable_tqdm=True, generation_kwargs=generation_kwargs)
        funcs = [tc.REWARD_FUNCS[n] for n in preset["rewards"]]
        trainer = trl.GRPOTrainer(model=model, reward_funcs=funcs, args=config, train_dataset=dataset,
                                  processing_class=tokenizer, callbacks=[StepTimer()])
        model.generate = timed("generation", model.generate)
        if trainer.ref_model is not None:
            trainer.ref_model.forward = timed("pi_ref", trainer.ref_model.forward)
        trainer.train()
    return {phase: statistics.median(t[phase] for t in times[1:]) for phase in times[0]}


# The shape of Qwen2.5-3B-Instruct (its config.json), so that a step is measured without downloading 6 GB; on a CPU,
# the same architecture at a tiny size.
QWEN25_3B = dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                 intermediate_size=11008, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
                 rope_theta=1000000.0, rms_norm_eps=1e-6)
TINY_QWEN = dict(QWEN25_3B, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 vocab_size=2048)
PROMPT_TOKENS = 150  # about the length of Mini-R1's prompt


def word_tokenizer(vocab_size: int):
    """A tokenizer with one word per id ("w0" .. "wV-1"): random prompts of an exact length, any id decodable."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w2"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=words, pad_token="w0", eos_token="w1", unk_token="w2")


def random_reward(completions, **kwargs):
    """Speed, not learning, is measured: rewards that differ within every group, so that no step is skipped."""
    return [random.random() for _ in completions]


SAMPLERS = {  # name: the GRPOConfig fields that select it
    "generate": dict(),
    "static": dict(cache_implementation="static"),
    "continuous": dict(use_transformers_continuous_batching=True),
}


def bench_preset(preset_name: str, length: int, steps: int, device: str, tiny: bool, sampler: str = "generate") -> dict:
    """Seconds per phase (median of `steps` steps after a warm-up step), peak memory and the projected hours of the
    preset's max_steps, for a random model of the preset's shape with every completion exactly `length` tokens."""
    import dataclasses
    import resource

    from transformers import Qwen2Config, Qwen2ForCausalLM

    import train_countdown as tc

    preset = tc.PRESETS[preset_name]
    cfg = grpo.GRPOConfig(**preset["config"])
    total_steps = cfg.max_steps
    cfg = dataclasses.replace(cfg, max_completion_length=length, max_steps=steps + 1, **SAMPLERS[sampler])
    if tiny:  # the preset's settings at a size a CPU runs in seconds
        cfg = dataclasses.replace(cfg, generation_batch_size=2 * cfg.num_generations, micro_batch_size=4,
                                  use_fused_loss=False)
    shape = TINY_QWEN if tiny else QWEN25_3B
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(Qwen2Config(**shape, pad_token_id=0, eos_token_id=1, bos_token_id=None))
    model.to(preset.get("dtype") or torch.float32)
    if cfg.use_peft:
        model = grpo.add_lora(model, cfg)
    model.generation_config.min_new_tokens = length  # EOS held back until then: every completion exactly `length`
    tokenizer = word_tokenizer(shape["vocab_size"])
    ref_model, optimizer, scheduler = grpo.setup(model, cfg)
    rng = random.Random(0)
    per_step = cfg.generation_batch_size // cfg.num_generations
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps + 1):
        prompts = [" ".join(f"w{rng.randrange(3, shape['vocab_size'])}" for _ in range(PROMPT_TOKENS))
                   for _ in range(per_step)]
        m, _ = grpo.grpo_step(model, ref_model, tokenizer, optimizer, scheduler, prompts, [random_reward], cfg)
        assert m["completion_length_min"] == length, "completions were not forced to the length asked for"
        times.append({"generation": m["gen_time"], "pi_ref": m["logps_time"],
                      "update": m["train_time"] - m["logps_time"], "step": m["step_time"],
                      "gen_tokens_per_s": m["gen_tokens_per_s"]})
    result = {k: statistics.median(t[k] for t in times[1:]) for k in times[0]}
    result["peak_gb"] = (torch.cuda.max_memory_allocated() if device == "cuda" else  # Linux: ru_maxrss in KiB
                         resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 1e9
    result["hours"] = result["step"] * total_steps / 3600
    return result


def preset_table(preset_name: str, lengths: list[int], steps: int, samplers: list[str]):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tiny = device == "cpu"
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({cpu_name()}), at a tiny shape"
    print(f"{preset_name} on {where}; torch {torch.__version__}; completions forced to each length; "
          f"median of {steps} steps after a warm-up step")
    print("| sampler | completion tokens | generation s | pi_ref s | update s | step s | generated tokens/s | "
          "peak GB | hours for the preset's steps |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for sampler in samplers:
        for length in lengths:
            r = bench_preset(preset_name, length, steps, device, tiny, sampler)
            rows.append((sampler, length, r))
            print(f"| {sampler} | {length} | {r['generation']:.2f} | {r['pi_ref']:.2f} | {r['update']:.2f} | "
                  f"{r['step']:.2f} | {r['gen_tokens_per_s']:.0f} | {r['peak_gb']:.1f}"
                  f"{' (process RSS)' if device == 'cpu' else ''} | {r['hours']:.1f} |", flush=True)
    return rows


def cpu_name() -> str:
    """The CPU's model name where the system says it (Linux), else what the platform module knows."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def step_table(steps=3):
    import train_countdown as tc

    native, why = tc.cpu_bf16("cpu")
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, capability "
          f"{torch.backends.cpu.get_cpu_capability()}; native bfloat16: {'yes' if native else 'no'} ({why}); "
          f"torch {torch.__version__}")
    for name, cfg, forced in step_settings():
        rows = []
        for label, share, bf16 in [("(a) plain, float32", False, False), ("(b) shared prompt, float32", True, False),
                                   ("(c) shared prompt, bfloat16", True, True)]:
            if bf16 and not native:
                print(f"{label}: skipped, this CPU has no native bfloat16 (emulated, it would take hours)")
                continue
            rows.append((label, bench_step(cfg, forced, share, bf16, steps)))
        if importlib.util.find_spec("trl") is None:
            print("(d) TRL's GRPOTrainer: skipped, trl is not installed")
        else:
            for label, bf16 in [("(d) TRL GRPOTrainer, float32", False), ("(d) TRL GRPOTrainer, bfloat16", True)]:
                if bf16 and not native:
                    print(f"{label}: skipped, this CPU has no native bfloat16")
                    continue
                rows.append((label, bench_trl_step(cfg, forced, bf16, steps)))
        print(f"\n{name}: seconds per step, median of {steps} steps after a warm-up step")
        print("| variant | generation | pi_ref | update | whole step | x (a) |")
        print("|---|---:|---:|---:|---:|---:|")
        for label, t in rows:
            print(f"| {label} | {t['generation']:.2f} | {t['pi_ref']:.2f} | {t['update']:.2f} | {t['step']:.2f} | "
                  f"{rows[0][1]['step'] / t['step']:.1f} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["step", "kernel", "preset"], help="which benchmark")
    parser.add_argument("--steps", type=int, default=3, help="step, preset: timed steps, after a warm-up step")
    parser.add_argument("--preset", default="mini-r1", help="preset: which train_countdown.py preset")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024], help="preset: completion lengths")
    parser.add_argument("--samplers", nargs="+", choices=sorted(SAMPLERS), default=list(SAMPLERS),
                        help="preset: generate (plain), static (static KV cache), continuous (continuous batching)")
    args = parser.parse_args(argv)
    if args.what == "step":
        step_table(args.steps)
    if args.what == "preset":
        import train_countdown as tc

        if args.preset not in tc.PRESETS or args.steps < 1 or min(args.lengths) < 1:
            raise SystemExit(f"error: --preset is one of {sorted(tc.PRESETS)}; --steps and --lengths at least 1.")
        preset_table(args.preset, args.lengths, args.steps, args.samplers)
    if args.what == "kernel":
        if not torch.cuda.is_available():
            raise SystemExit("bench.py kernel times the Triton kernel on a CUDA GPU; on a CPU, `python grpo_kernels.py` "
                             "checks it under Triton's interpreter.")
        import triton

        import grpo_kernels

        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
        for shape in [(8, 1024, 151936), (16, 512, 49152)]:  # Qwen2.5's vocabulary, then SmolLM2's
            loss_err, grad_err = grpo_kernels.check_against_reference(*shape, torch.bfloat16, "cuda")
            print(f"check {shape} bf16: loss relative error {loss_err:.1e}, d(logits) relative error {grad_err:.1e}")
            assert loss_err < 1e-4 and grad_err < 1e-2, "the kernel disagrees with the reference: no timings"
        for shape in [(8, 1024, 151936), (16, 512, 49152)]:
            bench_kernel(*shape)


if __name__ == "__main__":
    main()
