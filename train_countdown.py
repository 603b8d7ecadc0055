"""Countdown with GRPO: reproduce Mini-R1's "aha moment" on one GPU, and watch a small model learn on a CPU.

Countdown: given numbers (say 19, 36, 55, 7) and a target (65), write an equation that uses each number exactly
once with + - * / and equals the target: 55 + 36 - 7 - 19. The reward is checkable, so no reward model is needed.

    python train_countdown.py                      # the embedded SmolLM2-135M-Instruct, ~5 min on a 2-core CPU
    python train_countdown.py --preset mini-r1     # Qwen2.5-3B-Instruct, the Mini-R1 tutorial, one 80 GB GPU
    python train_countdown.py --help               # every GRPOConfig field can be overridden: --learning-rate 1e-6
    python train_countdown.py --trainer trl        # the same run on TRL's GRPOTrainer (and so on many GPUs)

Writes to --output-dir: metrics.jsonl, curves.png, samples.txt, eval.json, run.json (the settings) and checkpoint/
(continue with --resume). Presets and the game come first in this file, the plumbing last.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import dataclasses
import itertools
import json
import math
import operator
import os
import random
import re
import reprlib
import shutil
import socket
import sys
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path

import torch
from tqdm.auto import tqdm

import grpo

# ----------------------------------------------------------------------------------------------------
# Presets: a config, a model, a prompt style, a difficulty, and which rewards count. The prompts and the reward
# functions they name are defined below; every GRPOConfig field can be overridden on the command line.
# ----------------------------------------------------------------------------------------------------
PRESETS = {
    # The embedded model on a laptop CPU (GPU when there is one): easier problems (2 numbers up to 20), the
    # answer-only prompt, numbers_reward as shaping (the strict format_reward still logged, with weight 0).
    # float32: bfloat16 (--bf16) was 1.25x faster per step on a CPU with native bf16 but learned less (README.md).
    "cpu": dict(
        model=grpo.EMBEDDED_MODEL, style="answer", num_numbers=(2,), max_number=20, eval_size=32,
        rewards={"numbers_reward": 1.0, "equation_reward": 1.0, "format_reward": 0.0},
        config=dict(num_generations=8, generation_batch_size=16, micro_batch_size=16, max_prompt_length=256,
                    max_completion_length=20, temperature=1.0, learning_rate=1e-5, beta=0.04, max_steps=30,
                    lr_scheduler_type="constant", warmup_ratio=0.0, loss_type="grpo", seed=0),
    ),
    # The Mini-R1 tutorial (philschmid.de/mini-deepseek-r1), fitted to one 80 GB GPU: see README.md.
    "mini-r1": dict(
        model="Qwen/Qwen2.5-3B-Instruct", style="mini-r1", num_numbers=(3, 4), max_number=100, eval_size=200,
        rewards={"format_reward": 1.0, "equation_reward": 1.0},
        config=dict(num_generations=8, generation_batch_size=192, micro_batch_size=4, max_prompt_length=256,
                    max_completion_length=1024, temperature=0.9, learning_rate=5e-7, beta=0.001, max_steps=450,
                    lr_scheduler_type="cosine", warmup_ratio=0.03, loss_type="grpo", bf16=True,
                    gradient_checkpointing=True, use_fused_loss=True, seed=42),
    ),
    # The same run with LoRA adapters on a frozen bfloat16 base, for a 24 GB card (memory plan in README.md). Not
    # yet run on a GPU. LoRA usually wants a larger learning rate than full fine-tuning: 1e-5 is a start, not tuned.
    "mini-r1-lora": dict(
        model="Qwen/Qwen2.5-3B-Instruct", style="mini-r1", num_numbers=(3, 4), max_number=100, eval_size=200,
        rewards={"format_reward": 1.0, "equation_reward": 1.0}, dtype=torch.bfloat16,
        config=dict(num_generations=8, generation_batch_size=192, micro_batch_size=2, max_prompt_length=256,
                    max_completion_length=1024, temperature=0.9, learning_rate=1e-5, beta=0.001, max_steps=450,
                    lr_scheduler_type="cosine", warmup_ratio=0.03, loss_type="grpo", bf16=True,
                    gradient_checkpointing=True, use_fused_loss=True, use_peft=True, lora_r=16, lora_alpha=32,
                    seed=42),
    ),
}


# ----------------------------------------------------------------------------------------------------
# Data: an offline generator of solvable problems, or the hub dataset / a local file.
# ----------------------------------------------------------------------------------------------------
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


def make_problem(rng: random.Random, num_numbers: int, max_number: int, ops: str = "+-*/",
                 balanced: bool = False) -> dict:
    """Draw numbers, then combine random pairs with random operations until one value is left: the target.
    Every intermediate is a positive integer, as in the game. Example: [4, 7, 2] -> 4 * 2 = 8, 8 + 7 = 15.
    By default each operation is drawn among those the numbers allow (so / is rare: it must divide evenly);
    balanced: the operations are drawn first, each of ops equally likely, and the numbers until they allow them.
    Returns nums, target and the solution it built ("((4 * 2) + 7)")."""
    for tries in itertools.count():
        if tries % 1000 == 0:  # balanced: new operations now and then, as small numbers cannot make some (1 - 1)
            wanted = [rng.choice(ops) if balanced else None for _ in range(num_numbers - 1)]
        nums = [rng.randint(1, max_number) for _ in range(num_numbers)]
        pool = [(Fraction(n), str(n)) for n in nums]  # (value, the expression that makes it)
        for op in wanted:
            (a, ea), (b, eb) = pool.pop(rng.randrange(len(pool))), pool.pop(rng.randrange(len(pool)))
            choices = [sym for sym in ops if (sym != "-" or a > b) and (sym != "/" or (b != 0 and a % b == 0))]
            if not balanced:
                op = rng.choice(choices) if choices else "+"
            elif op not in choices:
                break  # these numbers do not allow the wanted operation: draw new ones
            pool.append((OPS[op](a, b), f"({ea} {op} {eb})"))
        else:
            target, solution = pool[0]
            if target.denominator == 1 and 0 < target <= 10 * max_number:
                return {"nums": nums, "target": int(target), "solution": solution}


def solve(nums: list[int], target: int) -> str | None:
    """An equation over nums that equals target, by exhaustive search (a few thousand tries for 4 numbers, up to
    minutes for 6); None when there is none. The tests' independent check that generated problems are solvable."""
    items = [(Fraction(n), str(n)) for n in nums]

    def search(items):
        if len(items) == 1:
            return items[0][1] if items[0][0] == target else None
        for i in range(len(items)):
            for j in range(len(items)):
                if i == j:
                    continue
                (a, ea), (b, eb) = items[i], items[j]
                rest = [items[k] for k in range(len(items)) if k not in (i, j)]
                for sym, fn in OPS.items():
                    if (sym in "+*" and i > j) or (sym == "/" and b == 0):
                        continue  # + and * commute: try each pair once
                    found = search(rest + [(fn(a, b), f"({ea} {sym} {eb})")])
                    if found:
                        return found
        return None

    return search(items)


def generate_dataset(size: int, seed: int, num_numbers=(3, 4), max_number: int = 100, ops: str = "+-*/",
                     balanced: bool = False):
    """A datasets.Dataset of `size` solvable problems with columns nums and target, the same for a seed.
    Default shape: 3 or 4 numbers up to 100, as in Jiayi-Pan/Countdown-Tasks-3to4. Each problem's own solution is
    checked by the rewards' parser (linear time; an exhaustive search takes about a second for 6 numbers)."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = [make_problem(rng, rng.choice(num_numbers), max_number, ops, balanced) for _ in range(size)]
    for row in rows:  # solvable by construction; checked anyway
        value, used = safe_eval(row.pop("solution"))
        assert value == row["target"] and sorted(used) == sorted(row["nums"]), row
    return Dataset.from_list(rows)


def load_countdown(name_or_path: str):
    """Jiayi-Pan/Countdown-Tasks-3to4 (or any hub dataset) through datasets.load_dataset, for users who are
    online, or a local .jsonl/.json/.parquet file, each with columns nums and target."""
    from datasets import load_dataset

    path = Path(name_or_path)
    if path.is_file() and path.suffix not in (".jsonl", ".json", ".parquet"):
        raise ValueError(f"dataset file {path}: only .jsonl, .json and .parquet files are read; write it as JSON lines "
                         '({"nums": [3, 4], "target": 7} per line).')
    if path.suffix in (".jsonl", ".json", ".parquet"):
        if not path.is_file():
            raise ValueError(f"dataset file {path} does not exist; give a .jsonl or .parquet file with columns nums and target.")
        try:
            data = load_dataset("parquet" if path.suffix == ".parquet" else "json", data_files=str(path), split="train")
        except Exception as error:  # malformed JSON, not a parquet file, an empty file
            cause = error.__cause__ or error
            first_line = (str(cause).strip() or type(cause).__name__).splitlines()[0][:200]
            raise ValueError(f"could not read dataset file {path} ({type(error).__name__}: {first_line}); it must be "
                             "JSON lines or parquet with columns nums and target.") from None
    else:
        try:
            data = load_dataset(name_or_path, split="train")
        except Exception as error:  # offline, or no such dataset
            raise ValueError(
                f"could not load dataset {name_or_path!r} ({type(error).__name__}): give a local .jsonl or .parquet "
                "file with columns nums and target, or leave out --dataset to generate problems offline."
            ) from None
    missing = {"nums", "target"} - set(data.column_names)
    if missing:
        raise ValueError(f"dataset {name_or_path!r} lacks the column(s) {sorted(missing)}; it needs nums and target.")
    data = data.select_columns(["nums", "target"])
    check_problems(data["nums"], data["target"], name_or_path)
    return data


def check_problems(nums: list, targets: list, name: str) -> None:
    """Every row a Countdown problem: nums a list of 2 to 6 non-negative integers, target an integer. A
    bad row would otherwise train at reward 0 without a word, or stop a run midway."""
    if not nums:
        raise ValueError(f"dataset {name!r} has no rows.")
    for row, (n, t) in enumerate(zip(nums, targets)):
        if not (isinstance(n, list) and 2 <= len(n) <= 6 and all(type(x) is int and x >= 0 for x in n)):
            raise ValueError(f"dataset {name!r}, row {row}: nums must be a list of 2 to 6 non-negative integers, "
                             f"got {reprlib.repr(n)}.")  # reprlib: a row of 10,000 numbers is shown by its start
        if type(t) is not int:
            raise ValueError(f"dataset {name!r}, row {row}: target must be an integer, got {reprlib.repr(t)}.")


def countdown_data(dataset: str | None, preset: dict, cfg: grpo.GRPOConfig):
    """(train split, held-out split, the order of training problems). The order is fixed by the seed, so that
    step k always sees the same prompts and --resume continues the same sequence."""
    if dataset:
        data = load_countdown(dataset)
        if len(data) < 5:
            raise ValueError(f"dataset {dataset!r} has {len(data)} rows: at least 5 are needed, one in five (at most "
                             "--eval-size) held out for the evaluation.")
    else:
        prompts_per_step = cfg.generation_batch_size // cfg.num_generations
        size = max(5000, cfg.max_steps * prompts_per_step + preset["eval_size"])  # no problem seen twice
        print(f"generating {size} problems of {'/'.join(map(str, preset['num_numbers']))} numbers up to "
              f"{preset['max_number']}", flush=True)
        data = generate_dataset(size, seed=cfg.seed, num_numbers=preset["num_numbers"], max_number=preset["max_number"],
                                balanced=preset.get("balanced", False))
    split = data.train_test_split(test_size=min(preset["eval_size"], len(data) // 5), seed=cfg.seed)
    order = torch.randperm(len(split["train"]), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    return split["train"], split["test"], order


# ----------------------------------------------------------------------------------------------------
# The prompt: Mini-R1's messages (word for word, grammar included), and the assistant turn pre-filled so that
# the model starts thinking.
# ----------------------------------------------------------------------------------------------------
SYSTEM = ("You are a helpful assistant. You first thinks about the reasoning process in the mind "
          "and then provides the user with the answer.")
USER = ("Using the numbers {nums}, create an equation that equals {target}. You can use basic arithmetic "
        "operations (+, -, *, /) one or multiple times but each number can only be used once. Show your work in "
        "<think> </think> tags. And return the final equation in <answer> </answer> tags, for example "
        "<answer> (1 + 2) / 3 </answer>. Think step by step inside <think> tags.")
PREFILL = "Let me solve this step by step.\n<think>"
# The CPU preset's shorter format: no think block, the answer alone, after one solved example in the chat: the
# only one of the formats tried that SmolLM2-135M writes often enough to learn from (README.md says what was tried).
ANSWER_SYSTEM = "You solve arithmetic puzzles."
ANSWER_USER = "Using the numbers {nums} once each, with + - * /, make {target}. Reply with only the equation, like <answer> 3 * 4 </answer>"
ANSWER_PREFILL = "<answer>"
ANSWER_EXAMPLE = ([3, 4], 12, "<answer> 3 * 4 </answer>")  # nums, target, the assistant's reply
STYLES = {"mini-r1": (SYSTEM, USER, PREFILL), "answer": (ANSWER_SYSTEM, ANSWER_USER, ANSWER_PREFILL)}


def make_prompt(tokenizer, nums, target, style: str = "mini-r1") -> str:
    """The chat-templated prompt, ending with the pre-filled start of the assistant's turn."""
    system, user, prefill = STYLES[style]
    messages = [{"role": "system", "content": system}]
    if style == "answer":
        example_nums, example_target, example_reply = ANSWER_EXAMPLE
        messages += [
            {"role": "user", "content": user.format(nums=example_nums, target=example_target)},
            {"role": "assistant", "content": example_reply},
        ]
    messages += [
        {"role": "user", "content": user.format(nums=list(nums), target=target)},
        {"role": "assistant", "content": prefill},
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)


# ----------------------------------------------------------------------------------------------------
# Rewards, TRL's signature. They see any text a model can write: they never raise, hang or run code.
# The prompt ends with the pre-filled tag ("<think>" or "<answer>"): the rewards judge that tag + completion.
# ----------------------------------------------------------------------------------------------------
THINK_FORMAT = re.compile(r"^<think>([^<]*(?:<(?!/?think>)[^<]*)*)</think>\n<answer>([\s\S]*?)</answer>$")
ANSWER_FORMAT = re.compile(r"^<answer>([\s\S]*?)</answer>$")
MAX_EXPRESSION_CHARS = 200  # before parsing: ast.parse of 10^5 nested parentheses would exhaust the stack
MAX_LITERAL = 10**6  # no literal beyond this: keeps every value small (there is no ** to build towers)
BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def assistant_turns(completions, prompts=None) -> list[str]:
    """The pre-filled tag the prompt ends with (the text after its last newline), then the completion.
    Without prompts: Mini-R1's "<think>"."""
    prompts = prompts or ["<think>"] * len(completions)
    return [p.rsplit("\n", 1)[-1] + c for p, c in zip(prompts, completions)]


def format_reward(completions, prompts=None, **kwargs) -> list[float]:
    """1.0 when the assistant's turn is exactly the asked-for format, else 0.0. Mini-R1's rule: a think block,
    a newline, an answer block, nothing more. For the answer-only prompt: an answer block, nothing more.
    Trailing whitespace is allowed."""
    rewards = []
    for turn in assistant_turns(completions, prompts):
        rule = THINK_FORMAT if turn.startswith("<think>") else ANSWER_FORMAT
        rewards.append(1.0 if rule.match(turn.rstrip()) else 0.0)
    return rewards


def safe_eval(expression: str) -> tuple[Fraction, list[int]] | None:
    """The exact value of an arithmetic expression over non-negative integers, + - * / and parentheses, and the
    integers it uses; None for anything else. No eval: the text is parsed with ast and only whitelisted nodes
    are computed, in exact fractions. Division by zero is None (a wrong answer, not a crash)."""
    if len(expression) > MAX_EXPRESSION_CHARS or not re.fullmatch(r"[0-9+\-*/() ]+", expression.strip()):
        return None  # ASCII digits only: no unicode digits, names, calls, **, or other characters
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    used: list[int] = []

    def value(node):
        if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ZeroDivisionError
            return BINARY[type(node.op)](left, right)
        if isinstance(node, ast.Constant) and type(node.value) is int and 0 <= node.value <= MAX_LITERAL:
            used.append(node.value)
            return Fraction(node.value)
        raise ValueError("not allowed")  # unary minus, floats, names, calls, **, ...

    try:
        return value(tree.body), used
    except (ValueError, ZeroDivisionError, RecursionError):
        return None


def parse_answer(turn: str) -> tuple[Fraction, list[int]] | None:
    """The value of the first <answer> block's expression and the integers it uses (safe_eval); None when there
    is no answer block or it holds no valid expression. Two str.find calls: time linear in the text's length
    (a regex search for <answer>(.*?)</answer> rescans the rest of the text from every unclosed opening)."""
    start = turn.find("<answer>")
    end = turn.find("</answer>", start + len("<answer>")) if start >= 0 else -1
    return safe_eval(turn[start + len("<answer>") : end]) if end >= 0 else None


def is_problem(numbers, goal) -> bool:
    """Whether (nums, target) is a Countdown problem a reward can judge: the rewards see every value a dataset
    may hold, and score anything else 0 instead of raising."""
    return (isinstance(numbers, (list, tuple)) and all(type(n) is int for n in numbers)
            and isinstance(goal, (int, Fraction)) and not isinstance(goal, bool))


def equation_reward(completions, target, nums, prompts=None, **kwargs) -> list[float]:
    """1.0 when the first <answer> holds an expression that uses each number of nums exactly once and equals
    target exactly, else 0.0."""
    rewards = []
    for turn, goal, numbers in zip(assistant_turns(completions, prompts), target, nums):
        result = parse_answer(turn) if is_problem(numbers, goal) else None
        right = result is not None and sorted(result[1]) == sorted(numbers) and result[0] == goal
        rewards.append(1.0 if right else 0.0)
    return rewards


def numbers_reward(completions, nums, prompts=None, **kwargs) -> list[float]:
    """The CPU preset's shaping: how well the first <answer> uses the given numbers, right or wrong. For an
    expression with at least one operation, the share of the given numbers it uses, as multisets:
    |used & nums| / max(|used|, |nums|); 0 for anything else. Example, nums [19, 3]: "19 * 3" 1.0 (as is
    "3 + 19"); "19 * 4" 0.5; "3 * 4" (the prompt's example, copied) 0.5; "19 * 3 * 3" 0.67;
    "57" 0.0 (a bare number, even the target); no answer block 0.0.
    Why: credit for the format alone was hacked with bare numbers, and a right answer alone is too rare to give a
    gradient (README.md, "Why the CPU preset is shaped this way")."""
    rewards = []
    for turn, numbers in zip(assistant_turns(completions, prompts), nums):
        result = parse_answer(turn) if is_problem(numbers, 0) else None
        if result is None or len(result[1]) < 2:
            rewards.append(0.0)
            continue
        used = Counter(result[1])
        rewards.append(sum((used & Counter(numbers)).values()) / max(len(result[1]), len(numbers)))
    return rewards


REWARD_FUNCS = {f.__name__: f for f in (format_reward, equation_reward, numbers_reward)}


def reward_weights(preset: dict, settings: dict) -> list[float]:
    """The weight of each reward: the preset's (0 with --reward-model-only), then the reward model's, if any."""
    weights = [0.0 if settings["reward_model_only"] else w for w in preset["rewards"].values()]
    return weights + ([settings["reward_model_weight"]] if settings["reward_model"] else [])


def rewards(preset: dict, settings: dict, device) -> tuple[list[str], list, list[float], list]:
    """(names, reward functions or models, weights, their tokenizers): the preset's rewards, and the reward model
    of --reward-model (with --reward-model-only, the task's rewards stay, logged, at weight 0)."""
    names = list(preset["rewards"])
    funcs = [REWARD_FUNCS[name] for name in names]
    classes = [None] * len(funcs)
    if settings["reward_model"]:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = settings["reward_model"]
        try:
            model = AutoModelForSequenceClassification.from_pretrained(path).to(device)
            tokenizer = AutoTokenizer.from_pretrained(path)
        except OSError as error:
            raise ValueError(f"could not load reward model {path!r}: {str(error).splitlines()[0]}") from None
        function = grpo.reward_model_function(model, tokenizer)  # checks num_labels == 1
        names, funcs, classes = names + [function.__name__], funcs + [model], classes + [tokenizer]
    return names, funcs, reward_weights(preset, settings), classes


# ----------------------------------------------------------------------------------------------------
# Evaluation, plots, samples.
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def greedy_accuracy(model, tokenizer, dataset, style, max_new_tokens, batch_size=16) -> tuple[float, list[str]]:
    """Fraction of problems whose greedy completion earns equation_reward, and the completions."""
    model.eval()
    device = next(model.parameters()).device
    prompts = [make_prompt(tokenizer, n, t, style) for n, t in zip(dataset["nums"], dataset["target"])]
    completions = []
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True, padding_side="left",
                        add_special_tokens=False).to(device)
        out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=grpo.eos_token_ids(model, tokenizer))
        completions += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    scores = equation_reward(completions, dataset["target"], dataset["nums"], prompts=prompts)
    return sum(scores) / max(len(scores), 1), completions


def single_operator_baseline(nums: list, targets: list) -> tuple[float, str]:
    """What a one-operator habit scores: the best accuracy of always +, always -, always * or always /, with the
    numbers in whichever order works (left to right), and that operator. Example: [3, 4] -> 7 is solved by "+"
    (3 + 4), [3, 12] -> 4 by "/" (12 / 3)."""
    def solved(numbers, target, op):
        for order in itertools.permutations(numbers):
            value = Fraction(order[0])
            try:
                for n in order[1:]:
                    value = op(value, Fraction(n))
            except ZeroDivisionError:
                continue
            if value == target:
                return True
        return False

    scores = {sym: sum(solved(n, t, op) for n, t in zip(nums, targets)) / max(len(nums), 1) for sym, op in OPS.items()}
    best = max(scores, key=scores.get)
    return scores[best], best


def plot_curves(history: list[dict], path: Path, reward_names: list[str]):
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, and a notebook's inline backend stays as it is

    steps = [h["step"] for h in history]
    fig = Figure(figsize=(15, 4))
    axes = fig.subplots(1, 3)
    axes[0].plot(steps, [h["reward"] for h in history], label="total reward", linewidth=2)
    for name in reward_names:
        axes[0].plot(steps, [h[f"rewards/{name}"] for h in history], label=name, alpha=0.8)
    axes[0].set(title="reward (mean over the step's completions)", xlabel="step")
    axes[0].legend()
    axes[1].plot(steps, [h["completion_length"] for h in history])
    axes[1].set(title="completion length (tokens)", xlabel="step")
    axes[2].plot(steps, [h["kl"] for h in history])
    axes[2].set(title="KL(pi_theta || pi_ref), k3 estimate", xlabel="step")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def write_samples(path: Path, step: int, rollouts: dict, reward_names: list[str], G: int, prefill: str):
    """Append the first group of completions of the step's batch, with each reward and advantage, to samples.txt."""
    nums, target = rollouts["columns"]["nums"][0], rollouts["columns"]["target"][0]
    with open(path, "a") as f:
        f.write(f"===== step {step}: nums {nums}, target {target}\n")
        for i in range(G):
            scores = ", ".join(f"{n}={v:.2f}" for n, v in zip(reward_names, rollouts["rewards_per_func"][i]))
            f.write(f"--- reward {rollouts['rewards'][i]:.2f} ({scores}), advantage {rollouts['advantages'][i]:+.2f}\n")
            f.write(prefill + rollouts["completions"][i] + "\n")


# ----------------------------------------------------------------------------------------------------
# The run: either trainer, then this project's loop.
# ----------------------------------------------------------------------------------------------------
NO_SIGNAL_STEPS = 3
NO_SIGNAL_WARNING = (
    "warning: in each of the first {n} steps, every group's rewards were all equal (frac_reward_zero_std = 1), so "
    "every advantage was 0 and no step had a signal to learn from. The problems are too hard for this model (all "
    "rewards 0), too easy (all the same), or cannot be solved: check the dataset, or try easier problems, a larger "
    "--num-generations, or a graded reward."
)


def train(args) -> dict:
    """What a run does before anything loads, with either trainer: every value checked, the output directory
    taken (run.lock), and the run's settings read back (--resume) or written (run.json)."""
    if args.save_every < 1 or args.sample_every < 1:
        raise ValueError(f"--save-every and --sample-every must be at least 1 (got {args.save_every}, "
                         f"{args.sample_every}).")
    given = given_settings(args)
    settings = run_settings(given)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun and accelerate launch
    if settings["trainer"] == "grpo" and world_size > 1:
        raise ValueError(f"this loop (grpo.py) runs in one process, and a launcher started {world_size}: run it with "
                         "python alone, or add --trainer trl to train on TRL's GRPOTrainer in several processes.")
    out = Path(args.output_dir)
    check_output_dir(out)
    main_process = os.environ.get("RANK", "0") == "0"  # the others of a multi-process run neither lock nor write
    with run_lock(out) if main_process else contextlib.nullcontext():
        changes = {}
        if args.resume:
            settings, changes = resumed_settings(out, given)
            for flag, old, new in changes.values():
                print(f"--resume: {flag} {new} (the run had {old})")
        elif main_process and held_run(out):
            raise ValueError(f"--output-dir {out} holds a run already ({held_run(out)}): continue it with --resume, or "
                             "choose another --output-dir (or delete this one).")
        if main_process:
            write_json(out / "run.json", settings)
        if settings["trainer"] == "trl":
            return train_with_trl(args, settings)
        return train_with_grpo(args, settings, new_learning_rate="learning_rate" in changes)


def train_with_grpo(args, settings: dict, new_learning_rate: bool = False) -> dict:
    """The run on this project's loop, grpo.grpo_step, one step after another."""
    preset, cfg = build_config(settings)
    out = Path(args.output_dir)
    device = check_device(args.device)
    if args.resume:
        find_checkpoint(out)
    random.seed(cfg.seed)

    prompts_per_step = cfg.generation_batch_size // cfg.num_generations
    train_data, test_data, order = countdown_data(settings["dataset"], preset, cfg)

    native_bf16, why = cpu_bf16(device) if cfg.bf16 else (True, "")
    if not native_bf16:
        print(f"warning: bf16 on this CPU: {why}, far slower than float32 (--no-bf16)")
    # A frozen LoRA base may be bfloat16; trained weights stay float32 (a bf16 weight cannot take a small update)
    dtype = preset.get("dtype") if cfg.use_peft else None
    model, tokenizer = grpo.load_model_and_tokenizer(preset["model"], device=device, dtype=dtype)
    if cfg.use_peft:
        model = grpo.add_lora(model, cfg)  # trains adapters only; pi_ref is the model with them switched off
    ref_model, optimizer, scheduler = grpo.setup(model, cfg)  # pi_ref is the model as loaded, before any resume
    reward_names, reward_funcs, weights, reward_classes = rewards(preset, settings, device)
    print(f"{preset['model']} on {device}; rewards {dict(zip(reward_names, weights))}; {cfg.max_steps} steps of "
          f"{prompts_per_step} prompts x G={cfg.num_generations}; output in {out}")

    start_step, history, evals = 0, [], {}
    if args.resume:
        start_step = load_checkpoint(out, model, optimizer, scheduler, preset["model"])
        if new_learning_rate:
            set_learning_rate(optimizer, scheduler, cfg.learning_rate)
        history = read_history(out / "metrics.jsonl", start_step)
        (out / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
        trim_samples(out / "samples.txt", start_step)
        try:
            evals = json.loads((out / "eval.json").read_text())
        except (OSError, json.JSONDecodeError):  # missing or cut short: the accuracy before is measured again
            evals = {}
        print(f"resumed from step {start_step}")

    if "before" not in evals:
        evals["before"], _ = greedy_accuracy(model, tokenizer, test_data, preset["style"], cfg.max_completion_length)
        print(f"held-out accuracy before training (greedy, {len(test_data)} problems): {evals['before']:.3f}")
        (out / "eval.json").write_text(json.dumps(evals, indent=1))

    bar = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps, desc="GRPO", dynamic_ncols=True)
    def prompts_and_columns(index):
        rows = train_data.select(index)
        prompts = [make_prompt(tokenizer, n, t, preset["style"]) for n, t in zip(rows["nums"], rows["target"])]
        return prompts, {"nums": rows["nums"], "target": rows["target"]}

    for step in bar:
        index = [order[(step * prompts_per_step + i) % len(order)] for i in range(prompts_per_step)]
        extra = random.Random(f"{cfg.seed}-{step}")  # dynamic sampling's extra prompts: the same ones on --resume
        prompts, columns = prompts_and_columns(index)
        metrics, rollouts = grpo.grpo_step(
            model, ref_model, tokenizer, optimizer, scheduler, prompts, reward_funcs, cfg, columns=columns,
            reward_weights=weights, next_prompts=lambda: prompts_and_columns(extra.sample(order, prompts_per_step)),
            reward_processing_classes=reward_classes)
        metrics["step"] = step + 1
        history.append(metrics)
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        bar.set_postfix(reward=f"{metrics['reward']:.3f}", equation=f"{metrics['rewards/equation_reward']:.2f}",
                        len=f"{metrics['completion_length']:.0f}")
        if step + 1 == NO_SIGNAL_STEPS and all(h["frac_reward_zero_std"] == 1 for h in history[:NO_SIGNAL_STEPS]):
            tqdm.write(NO_SIGNAL_WARNING.format(n=NO_SIGNAL_STEPS), file=sys.stderr)
        plot_curves(history, out / "curves.png", reward_names)
        if (step + 1) % args.sample_every == 0 or step == start_step:
            write_samples(out / "samples.txt", step + 1, rollouts, reward_names, cfg.num_generations,
                          STYLES[preset["style"]][2])
        if (step + 1) % args.save_every == 0 or step + 1 == cfg.max_steps:
            save_checkpoint(out, model, tokenizer, optimizer, scheduler, step + 1)

    return finish_run(model, tokenizer, test_data, preset, cfg, out, evals, history)


def finish_run(model, tokenizer, test_data, preset: dict, cfg: grpo.GRPOConfig, out: Path, evals: dict,
               history: list[dict]) -> dict:
    """After training (either trainer): the held-out accuracy, the single-operator baseline, the greedy answers
    (eval_completions.jsonl) and the reward of the first and last fifth of the steps, into eval.json."""
    evals["after"], completions = greedy_accuracy(model, tokenizer, test_data, preset["style"], cfg.max_completion_length)
    baseline, op = single_operator_baseline(test_data["nums"], test_data["target"])
    evals["single_operator_baseline"], evals["single_operator"] = baseline, op
    print(f"held-out accuracy after training (greedy, {len(test_data)} problems): {evals['after']:.3f}; "
          f"answering every problem with '{op}' alone would score {baseline:.3f}")
    prefill = STYLES[preset["style"]][2]
    correct = equation_reward(completions, test_data["target"], test_data["nums"], prompts=[prefill] * len(completions))
    with open(out / "eval_completions.jsonl", "w") as f:  # the greedy answers behind the "after" accuracy
        for row, completion, right in zip(test_data, completions, correct):
            f.write(json.dumps({"nums": row["nums"], "target": row["target"], "completion": prefill + completion,
                                "correct": bool(right)}) + "\n")
    fifth = max(1, len(history) // 5)
    if history:
        evals["reward_first_fifth"] = sum(h["reward"] for h in history[:fifth]) / fifth
        evals["reward_last_fifth"] = sum(h["reward"] for h in history[-fifth:]) / fifth
        print(f"mean total reward: first fifth of the steps {evals['reward_first_fifth']:.3f}, "
              f"last fifth {evals['reward_last_fifth']:.3f}")
    (out / "eval.json").write_text(json.dumps(evals, indent=1))
    return evals


# ----------------------------------------------------------------------------------------------------
# Past one GPU: the same run on TRL's GRPOTrainer (accelerate: many GPUs, DeepSpeed or FSDP; vLLM sampling).
# The same preset, problems in the same order, prompt text, reward functions and weights; the same files out.
# ----------------------------------------------------------------------------------------------------
TRL_FIELDS = {  # each GRPOConfig field: TRL's GRPOConfig field of the same meaning, or None where TRL has none
    "num_generations": "num_generations",
    "generation_batch_size": "generation_batch_size",
    "micro_batch_size": "per_device_train_batch_size",  # and gradient_accumulation_steps, set to match
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "max_prompt_length": None,  # TRL 1.16 does not cut prompts: trl_dataset cuts their text to the same tokens
    "max_completion_length": "max_completion_length",
    "share_prompt": None,  # speed only: TRL encodes the prompt G times, with the same results
    "cache_implementation": "cache_implementation",
    "use_transformers_continuous_batching": "use_transformers_continuous_batching",
    "mask_truncated_completions": "mask_truncated_completions",
    "dynamic_sampling": None,  # must be off
    "dynamic_sampling_rounds": None,  # used only by dynamic_sampling
    "beta": "beta",
    "use_bias_correction_kl": "use_bias_correction_kl",  # passed explicitly: TRL 1.16 defaults it to True
    "epsilon": "epsilon",
    "epsilon_high": "epsilon_high",
    "loss_type": "loss_type",  # of TRL_LOSS_TYPES
    "importance_sampling_level": "importance_sampling_level",
    "trust_region_delta": None,  # DPPO's and DRPO's delta (TRL's `delta` is another bound): no TRL counterpart
    "trust_region_delta_high": None,
    "scale_rewards": "scale_rewards",
    "num_iterations": "num_iterations",
    "learning_rate": "learning_rate",
    "lr_scheduler_type": "lr_scheduler_type",
    "warmup_ratio": "warmup_steps",  # transformers 5: a warmup_steps below 1 is a share of the steps
    "weight_decay": "weight_decay",
    "max_grad_norm": "max_grad_norm",
    "max_steps": "max_steps",  # times num_iterations: TRL counts optimiser steps, mu of them per GRPO step
    "gradient_checkpointing": "gradient_checkpointing",
    "bf16": "bf16",
    "use_fused_loss": None,  # speed only: TRL has its own fused loss (use_liger_kernel), another kernel
    "use_peft": None,  # TRL takes LoRA as the trainer's peft_config (train_with_trl passes grpo.lora_config)
    "lora_r": None,
    "lora_alpha": None,
    "seed": "seed",
}
TRL_LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo", "cispo")
TRL_SPEED_ONLY = ("share_prompt", "use_fused_loss")
TRL_METRICS = {  # what TRL logs -> the name metrics.jsonl uses, where it is the same quantity
    "loss": "loss", "grad_norm": "grad_norm", "learning_rate": "learning_rate", "reward": "reward",
    "reward_std": "reward_std", "frac_reward_zero_std": "frac_reward_zero_std", "kl": "kl", "entropy": "entropy",
    "completions/mean_length": "completion_length", "completions/min_length": "completion_length_min",
    "completions/max_length": "completion_length_max", "completions/clipped_ratio": "truncated_fraction",
    "clip_ratio/low_mean": "clip_ratio/low_mean", "clip_ratio/high_mean": "clip_ratio/high_mean",
    "clip_ratio/region_mean": "clip_ratio/region_mean", "step_time": "step_time",
}


def trl_config(cfg: grpo.GRPOConfig, out: Path, reward_weights: list[float], num_processes: int = 1, **trl_options):
    """TRL's GRPOConfig from this project's, every field mapped as TRL_FIELDS says. A field TRL has no counterpart for
    is an error that names it, unless it changes only the speed (TRL_SPEED_ONLY). trl_options: TRL's own options
    (use_cpu, save_steps, use_vllm, vllm_mode...), passed as they are."""
    import trl

    unmapped = [f.name for f in dataclasses.fields(cfg) if f.name not in TRL_FIELDS]
    if unmapped:  # a new GRPOConfig field must be given its TRL counterpart, or None, above
        raise ValueError(f"GRPOConfig fields {unmapped} are not in TRL_FIELDS: map them before running on TRL.")
    if cfg.loss_type not in TRL_LOSS_TYPES:
        raise ValueError(f"loss_type={cfg.loss_type!r} has no counterpart in TRL's GRPOTrainer (it has "
                         f"{', '.join(TRL_LOSS_TYPES)}); run it with --trainer grpo.")
    if cfg.dynamic_sampling:
        raise ValueError("dynamic_sampling has no counterpart in TRL's GRPOTrainer; run it with --trainer grpo, "
                         "or leave it off.")
    per_pass = cfg.micro_batch_size * num_processes  # completions per forward/backward, over all processes
    if cfg.generation_batch_size % per_pass:
        raise ValueError(f"with TRL, generation_batch_size ({cfg.generation_batch_size}) must be a multiple of "
                         f"micro_batch_size x processes ({cfg.micro_batch_size} x {num_processes}).")
    fields = {theirs: getattr(cfg, ours) for ours, theirs in TRL_FIELDS.items() if theirs is not None}
    fields["max_steps"] = cfg.max_steps * cfg.num_iterations
    if cfg.warmup_ratio >= 1:  # transformers reads warmup_steps >= 1 as a number of steps
        fields["warmup_steps"] = cfg.max_steps * cfg.num_iterations
    return trl.GRPOConfig(
        **fields,
        gradient_accumulation_steps=cfg.generation_batch_size // per_pass,  # one optimiser step per pass over a batch
        reward_weights=reward_weights,
        shuffle_dataset=False,  # the dataset is already in this project's order (trl_dataset)
        optim="adamw_torch",  # torch.optim.AdamW, as grpo.setup
        output_dir=str(out / "trl"),
        logging_steps=1,
        report_to="none",
        **trl_options,
    )


def trl_dataset(tokenizer, train_data, order: list[int], preset: dict, cfg: grpo.GRPOConfig):
    """The problems, in the order this project's loop takes them, as a datasets.Dataset with TRL's prompt column:
    the prompt as plain text (TRL's "standard" format), the very text sample_groups encodes: chat template,
    pre-filled assistant turn, the same max_prompt_length cut. The reward functions then get from TRL what they get
    from grpo.py (prompts and completions as strings, completion_ids, the nums and target columns): the one place
    that could adapt them to TRL has nothing to do."""
    from datasets import Dataset

    per_step = cfg.generation_batch_size // cfg.num_generations
    rows = train_data.select([order[i % len(order)] for i in range(cfg.max_steps * per_step)])
    prompts = [cut_prompt(tokenizer, make_prompt(tokenizer, n, t, preset["style"]), cfg.max_prompt_length)
               for n, t in zip(rows["nums"], rows["target"])]
    extra = len(tokenizer(prompts[0])["input_ids"]) - len(tokenizer(prompts[0], add_special_tokens=False)["input_ids"])
    if extra:  # TRL tokenizes prompts with the tokenizer's special tokens; grpo.py does not add them
        raise ValueError(f"this tokenizer adds {extra} special token(s) to a prompt's text, which grpo.py does not: "
                         "TRL would see other tokens. Use a model whose tokenizer adds none (SmolLM2, Qwen2.5).")
    return Dataset.from_dict({"prompt": prompts, "nums": rows["nums"], "target": rows["target"]})


def cut_prompt(tokenizer, text: str, max_tokens: int) -> str:
    """The text of a prompt's last max_tokens tokens, as sample_groups keeps them (TRL 1.16 cuts no prompt)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    cut = tokenizer.decode(ids[-max_tokens:])
    if tokenizer(cut, add_special_tokens=False)["input_ids"] != ids[-max_tokens:]:
        raise ValueError(f"a prompt of {len(ids)} tokens cut to max_prompt_length={max_tokens} does not encode back "
                         f"to the same tokens; pass --max-prompt-length {len(ids)} or more.")
    return cut


def trl_logger(out: Path, history: list[dict], reward_names: list[str], beta: float):
    """A transformers callback: each TRL log of a training step becomes a metrics.jsonl line, with this project's
    names where TRL logs the same quantity (TRL_METRICS), and curves.png is redrawn."""
    from transformers import TrainerCallback

    class CountdownLog(TrainerCallback):  # a class because transformers' callbacks are
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or "reward" not in (logs or {}):  # a step's log has its rewards
                return
            metrics = {ours: logs[theirs] for theirs, ours in TRL_METRICS.items() if theirs in logs}
            metrics.update({f"rewards/{name}": logs[f"rewards/{name}/mean"] for name in reward_names})
            if beta == 0:  # TRL logs no KL without a KL term; grpo.py logs 0
                metrics["kl"] = 0.0
            metrics["step"] = len(history) + 1
            history.append(metrics)
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            plot_curves(history, out / "curves.png", reward_names)

    return CountdownLog()


def train_with_trl(args, settings: dict) -> dict:
    """The same run on TRL's GRPOTrainer: one process here, or many under `accelerate launch` (README.md)."""
    import trl
    from accelerate import PartialState
    from transformers.trainer_utils import get_last_checkpoint

    preset, cfg = build_config(settings)
    out = Path(args.output_dir)
    device = check_device(args.device)
    random.seed(cfg.seed)
    train_data, test_data, order = countdown_data(settings["dataset"], preset, cfg)
    state = PartialState(cpu=device == "cpu")
    reward_names, reward_funcs, weights, reward_classes = rewards(preset, settings, state.device)
    config = trl_config(cfg, out, weights, state.num_processes, use_cpu=device == "cpu", save_steps=args.save_every,
                        use_vllm=args.use_vllm, vllm_mode=args.vllm_mode)
    print(f"TRL's GRPOTrainer (trl {trl.__version__}) in {state.num_processes} process(es), on {state.device}; without "
          f"grpo.py's own speed-ups ({', '.join(TRL_SPEED_ONLY)}), which change no result")
    dtype = preset.get("dtype") if cfg.use_peft else None  # a bfloat16 base only when it is frozen
    model, tokenizer = grpo.load_model_and_tokenizer(preset["model"], device=state.device, dtype=dtype)
    dataset = trl_dataset(tokenizer, train_data, order, preset, cfg)

    history, evals, resume = [], {}, None
    if args.resume:
        resume = get_last_checkpoint(str(out / "trl")) if (out / "trl").is_dir() else None
        if resume is None:
            raise FileNotFoundError(f"no TRL checkpoint in {out / 'trl'} to resume from: the run stopped before its "
                                    "first one (--save-every); delete it or choose another --output-dir to start again.")
        history = read_history(out / "metrics.jsonl", int(resume.rsplit("-", 1)[1]) // cfg.num_iterations)
        evals = json.loads((out / "eval.json").read_text()) if (out / "eval.json").exists() else {}
    if state.is_main_process:
        (out / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    if "before" not in evals:
        evals["before"], _ = greedy_accuracy(model, tokenizer, test_data, preset["style"], cfg.max_completion_length)
        print(f"held-out accuracy before training (greedy, {len(test_data)} problems): {evals['before']:.3f}")
        if state.is_main_process:
            (out / "eval.json").write_text(json.dumps(evals, indent=1))
    trainer = trl.GRPOTrainer(model=model, reward_funcs=reward_funcs, reward_processing_classes=reward_classes,
                              args=config, train_dataset=dataset, processing_class=tokenizer,
                              peft_config=grpo.lora_config(cfg) if cfg.use_peft else None,
                              callbacks=[trl_logger(out, history, reward_names, cfg.beta)])
    trainer.train(resume_from_checkpoint=resume)
    if not state.is_main_process:
        return evals
    model = trainer.accelerator.unwrap_model(trainer.model)
    return finish_run(model, tokenizer, test_data, preset, cfg, out, evals, history)


# ----------------------------------------------------------------------------------------------------
# Plumbing. The command line: the preset, then any GRPOConfig field (each with its help text).
# ----------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="default: cpu")
    parser.add_argument("--model", help="hub id, local directory, or " + grpo.EMBEDDED_MODEL + " (the preset's by default)")
    parser.add_argument("--dataset", help="hub dataset (e.g. Jiayi-Pan/Countdown-Tasks-3to4) or a .jsonl/.parquet "
                        "file with columns nums and target; default: generate problems offline")
    parser.add_argument("--num-numbers", type=int, nargs="+", help="generated problems: how many numbers (e.g. 3 4)")
    parser.add_argument("--max-number", type=int, help="generated problems: largest number")
    parser.add_argument("--balanced-ops", action="store_true", default=None, dest="balanced",
                        help="generated problems: each operation equally common, so that no one-operator habit scores "
                        "well (2 numbers up to 20: the best single operator scores 0.33 instead of 0.44)")
    parser.add_argument("--eval-size", type=int, help="held-out problems for the greedy accuracy before and after")
    parser.add_argument("--output-dir", default="runs/countdown")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output-dir, with its settings "
                        "(run.json); only --learning-rate, --max-steps and speed-only flags may change")
    parser.add_argument("--save-every", type=int, default=10, help="steps between checkpoints")
    parser.add_argument("--sample-every", type=int, default=5, help="steps between sample dumps to samples.txt")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--reward-model", metavar="DIR_OR_ID", help="add a reward model (sequence classification, "
                        "num_labels=1) to the task's rewards; the held-out accuracy still uses the exact checker")
    parser.add_argument("--reward-model-weight", type=float, help="its weight (default 1)")
    parser.add_argument("--reward-model-only", action="store_true", default=None,
                        help="train on the reward model alone; the task's rewards are still logged, with weight 0")
    parser.add_argument("--trainer", choices=["grpo", "trl"],
                        help="grpo (default): this project's loop (grpo.py), one process; trl: TRL's GRPOTrainer, for "
                        "several processes or GPUs (README.md)")
    parser.add_argument("--use-vllm", action="store_true", help="--trainer trl: sample with vLLM (pip install vllm)")
    parser.add_argument("--vllm-mode", choices=["colocate", "server"], default="colocate",
                        help="--trainer trl --use-vllm: vLLM on the training GPUs, or a `trl vllm-serve` server")
    config = parser.add_argument_group("GRPOConfig fields (override the preset)")
    parsers = {"int": int, "float": float, "float | None": float, "str": str, "str | None": str}  # by annotation
    for field in dataclasses.fields(grpo.GRPOConfig):
        flag, help_text = "--" + field.name.replace("_", "-"), field.metadata["help"]
        if field.type == "bool":  # --bf16 / --no-bf16
            config.add_argument(flag, action=argparse.BooleanOptionalAction, dest="cfg_" + field.name, help=help_text)
        else:
            config.add_argument(flag, type=parsers[field.type], dest="cfg_" + field.name, metavar=field.name.upper(),
                                help=help_text)
    return parser.parse_args(argv)


# What makes a run, beside the GRPOConfig fields: each setting and its flag. run.json in the output directory holds
# them all, and --resume continues with them.
RUN_FLAGS = {"trainer": "--trainer", "preset": "--preset", "model": "--model", "dataset": "--dataset",
             "num_numbers": "--num-numbers", "max_number": "--max-number", "balanced": "--balanced-ops",
             "eval_size": "--eval-size", "reward_model": "--reward-model", "reward_model_weight": "--reward-model-weight",
             "reward_model_only": "--reward-model-only"}


def given_settings(args) -> dict:
    """The settings of a run that the command line gives, None where a flag is left out; config: the GRPOConfig
    fields given."""
    given = {key: getattr(args, key) for key in RUN_FLAGS}
    given["config"] = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    return given


def run_settings(given: dict) -> dict:
    """Every setting of a run: the preset's, then the flags given. The GRPOConfig is built (and so checked) here,
    before anything loads, and stored whole, its defaults filled in."""
    preset = PRESETS[given["preset"] or "cpu"]
    defaults = dict(trainer="grpo", preset="cpu", model=preset["model"], dataset=None, num_numbers=preset["num_numbers"],
                    max_number=preset["max_number"], balanced=False, eval_size=preset["eval_size"], reward_model=None,
                    reward_model_weight=1.0, reward_model_only=False)
    settings = {key: defaults[key] if given[key] is None else given[key] for key in RUN_FLAGS}
    settings["num_numbers"] = list(settings["num_numbers"])
    cfg = grpo.GRPOConfig(**{**preset["config"], **given["config"]})  # raises ValueError on a bad combination
    settings["config"] = dataclasses.asdict(cfg)
    build_config(settings)  # the checks of the other settings
    return settings


def build_config(settings: dict) -> tuple[dict, grpo.GRPOConfig]:
    """The preset (model, prompt style, problems, rewards) with the run's settings in it, and its GRPOConfig."""
    preset = {**PRESETS[settings["preset"]], **{key: settings[key] for key in ("model", "max_number", "eval_size")}}
    preset["num_numbers"], preset["balanced"] = tuple(settings["num_numbers"]), settings["balanced"]
    cfg = grpo.GRPOConfig(**settings["config"])
    if not all(2 <= n <= 6 for n in preset["num_numbers"]) or preset["max_number"] < 1 or preset["eval_size"] < 1:
        raise ValueError("--num-numbers takes values from 2 to 6, and --max-number and --eval-size must be at least 1.")
    if preset["balanced"] and settings["dataset"]:
        raise ValueError("--balanced-ops shapes generated problems only; leave it out with --dataset.")
    if cfg.max_steps < 1:
        raise ValueError(f"--max-steps must be at least 1 (got {cfg.max_steps}).")
    if not math.isfinite(settings["reward_model_weight"]):
        raise ValueError(f"--reward-model-weight must be a finite number (got {settings['reward_model_weight']}).")
    if settings["reward_model_only"] and not settings["reward_model"]:
        raise ValueError("--reward-model-only trains on a reward model alone: name it with --reward-model DIR_OR_ID.")
    weights = reward_weights(preset, settings)
    if not any(weights):
        raise ValueError(f"every reward weight is 0 ({weights}): no completion would score above another, so nothing "
                         "would be learned; give a reward a weight other than 0.")
    return preset, cfg


def check_device(name: str | None) -> str:
    """The device to train on: --device if given and usable, else cuda when there is one, else cpu."""
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name} is not a device; use cuda, cuda:N or cpu.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}, but PyTorch sees no CUDA device here; leave out --device or use cpu.")
    return name


def cpu_bf16(device: str) -> tuple[bool, str]:
    """Whether this device multiplies bfloat16 natively, and how we know: yes on a GPU and on a CPU with AVX-512
    BF16, AMX or Arm's BF16, where bf16 matmuls are about 3x faster than float32; no on any other CPU, where
    bfloat16 is emulated (AVX2 only: about a hundred times slower than float32). Returns (native, why)."""
    if torch.device(device).type != "cpu":
        return True, f"{device} multiplies bfloat16 natively"
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    if flags:
        found = sorted(flags & {"avx512_bf16", "amx_bf16", "bf16"})
        return bool(found), (f"the CPU flags list {', '.join(found)}" if found else
                             "the CPU flags list none of avx512_bf16, amx_bf16, bf16: bfloat16 would be emulated")
    a = torch.randn(256, 256)  # no flags to read (macOS, Windows): time a small matmul in both dtypes

    def seconds(dtype):
        x = a.to(dtype)
        start = time.perf_counter()
        for _ in range(5):
            x @ x
        return time.perf_counter() - start

    seconds(torch.bfloat16)  # warm-up
    ratio = seconds(torch.bfloat16) / seconds(torch.float32)
    return ratio < 1, f"a 256x256 matmul took {ratio:.2f}x as long in bfloat16 as in float32"


def check_output_dir(out: Path) -> None:
    """--output-dir must be a directory this process can write (made if missing), checked before any loading."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"--output-dir {out} is not a writable directory ({error.strerror or error}); "
                         "choose another with --output-dir.") from None


# ----------------------------------------------------------------------------------------------------
# An output directory holds one run: a lock while it runs, its settings in run.json, and on --resume only the
# changes that keep it the same run.
# ----------------------------------------------------------------------------------------------------
RESUME_APPLIED = ("learning_rate", "max_steps")  # --resume takes a new value, and says so
SPEED_ONLY = ("micro_batch_size", "share_prompt", "gradient_checkpointing", "use_fused_loss", "cache_implementation",
              "use_transformers_continuous_batching")  # the same numbers at another speed or memory: taken as well


@contextlib.contextmanager
def run_lock(out: Path):
    """While a run is alive, out/run.lock holds its process id and host. The file is made with O_CREAT | O_EXCL, so
    of two runs started together exactly one gets it; the other stops with an error. A lock whose process has
    ended without removing it (SIGKILL, a power cut) is stale and taken over. (Two runs that both find the same
    stale lock at the same moment could both take it: a window of microseconds.)"""
    lock, me = out / "run.lock", f"{os.getpid()} {socket.gethostname()}"
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            owner = lock.read_text().split() if lock.exists() else []
            pid, host = (int(owner[0]), owner[1]) if len(owner) == 2 and owner[0].isdigit() else (None, "?")
            if pid is not None and host == socket.gethostname() and not process_alive(pid):
                lock.unlink(missing_ok=True)  # stale: its run ended without releasing it
                continue
            raise ValueError(f"--output-dir {out} is in use by another run (process {pid} on {host}): wait for it to "
                             f"end, or choose another --output-dir. If no run is using it, delete {lock}.") from None
    with os.fdopen(fd, "w") as f:
        f.write(me)
    try:
        yield
    finally:
        if lock.exists() and lock.read_text() == me:
            lock.unlink()


def process_alive(pid: int) -> bool:
    if os.name != "posix":  # no signal 0 to ask with (on Windows os.kill(pid, 0) would send Ctrl-C): assume alive
        return True
    try:
        os.kill(pid, 0)  # signal 0: delivers nothing, only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    return True


def held_run(out: Path) -> str | None:
    """What in out shows that a run trained there (its steps or checkpoints), or None. A run that stopped before
    its first step leaves nothing worth keeping, and its run.json and eval.json are written anew."""
    found = [name for name in ("metrics.jsonl", "checkpoint", "checkpoint.old") if (out / name).exists()]
    found += [path.relative_to(out).as_posix() for path in sorted(out.glob("trl/checkpoint-*"))]
    return ", ".join(found) or None


def write_json(path: Path, obj) -> None:
    """Write, then rename: a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def resumed_settings(out: Path, given: dict) -> tuple[dict, list[str]]:
    """The settings of the run in out (run.json), with the changes --resume may make: a new learning rate or number
    of steps, and the speed-only fields. Any other flag given with another value than the run's is an error that
    names both: a step of the resumed run must mean what a step of the first part meant. Returns the settings and
    the changes, {field: (flag, old value, new value)}."""
    path = out / "run.json"
    if not path.exists():  # a run of a version that did not store its settings
        print(f"warning: {path} is missing: the run's settings are taken from this command line as given")
        return run_settings(given), {}
    stored = json.loads(path.read_text())
    settings, changes = copy.deepcopy(stored), {}
    pairs = [(key, RUN_FLAGS[key], value, stored[key], settings) for key, value in given.items() if key != "config"]
    pairs += [(key, "--" + key.replace("_", "-"), value, stored["config"][key], settings["config"])
              for key, value in given["config"].items()]
    for key, flag, value, old, target in pairs:
        if value is None or value == old or (key == "num_numbers" and list(value) == old):
            continue
        if key not in RESUME_APPLIED + SPEED_ONLY:
            raise ValueError(f"--resume continues the run in {out} with its own settings, and {flag} is {value} here "
                             f"but {old} in the run: leave {flag} out to continue it, or start a new run in another "
                             "--output-dir.")
        if key == "learning_rate" and settings["trainer"] == "trl":
            raise ValueError("--trainer trl --resume restores TRL's optimiser and scheduler as they were saved, so "
                             "--learning-rate cannot change there; continue with the run's, or start a new run.")
        target[key] = value
        changes[key] = (flag, old, value)
    build_config(settings)  # the changed settings, checked as a new run's are
    return settings, changes


# ----------------------------------------------------------------------------------------------------
# Checkpoints: written whole or not at all, read back strictly.
# ----------------------------------------------------------------------------------------------------
def save_checkpoint(out: Path, model, tokenizer, optimizer, scheduler, step: int):
    """out/checkpoint: the weights and tokenizer (save_pretrained), and trainer_state.pt with the optimizer,
    the scheduler, the RNG states and the step. Written beside the old one, then swapped in by renames, so that
    a crash at any moment leaves one whole checkpoint (checkpoint, or checkpoint.old during the swap)."""
    from safetensors import SafetensorError
    from transformers.utils import logging as transformers_logging

    tmp, final, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)  # a half-written one from a crash
    transformers_logging.disable_progress_bar()  # no "Writing model shards" bar inside the run's own
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                    "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}, tmp / "trainer_state.pt")
    except (OSError, RuntimeError, SafetensorError) as error:  # a full disk shows as any of the three
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"could not write the checkpoint of step {step} to {tmp} ({str(error).splitlines()[0][:200]}); "
                      "the last checkpoint, if any, is kept: free some space, then continue with --resume.") from None
    finally:
        transformers_logging.enable_progress_bar()
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(out: Path) -> Path:
    """out/checkpoint, or out/checkpoint.old when a crash came in the middle of save_checkpoint's swap."""
    path, old = out / "checkpoint", out / "checkpoint.old"
    if not (path / "trainer_state.pt").exists() and (old / "trainer_state.pt").exists():
        shutil.rmtree(path, ignore_errors=True)
        old.rename(path)
        print(f"resuming from {old}, the checkpoint a crash left while the next one was being swapped in")
    if not (path / "trainer_state.pt").exists():
        raise ValueError(f"--resume: no checkpoint in {path}: the run stopped before its first one (--save-every); "
                         "start again without --resume (delete the directory or choose another --output-dir).")
    return path


def load_checkpoint(out: Path, model, optimizer, scheduler, model_name: str) -> int:
    """The inverse of save_checkpoint: weights, optimizer, scheduler and RNG states back in place; returns the
    step it was saved at."""
    path = find_checkpoint(out)
    damaged = ("is damaged ({}); each save replaces the previous checkpoint, so there is no older one: start "
               "again without --resume (or with another --output-dir).")
    has_adapters = (path / "adapter_model.safetensors").exists()
    if has_adapters != grpo.is_lora(model):
        raise ValueError(f"{path} holds {'LoRA adapters' if has_adapters else 'a whole model'}, from a run "
                         f"{'with' if has_adapters else 'without'} --use-peft: resume it "
                         f"{'with' if has_adapters else 'without'} --use-peft.")
    if grpo.is_lora(model):  # the checkpoint holds the adapters only (peft's save_pretrained)
        load_adapters(path, model, damaged)
    else:
        load_weights(path, model, model_name, damaged)
    try:
        state = torch.load(path / "trainer_state.pt", weights_only=False)
    except Exception as error:  # truncated, overwritten, not a torch file
        raise ValueError(f"{path / 'trainer_state.pt'} " + damaged.format(f"{type(error).__name__}: {error}"[:200])) from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    return state["step"]


def set_learning_rate(optimizer, scheduler, lr: float) -> None:
    """--resume with a new --learning-rate: the restored optimiser and scheduler hold the old one. The schedule
    (transformers' LambdaLR: lr = base_lr x factor(step)) keeps its shape and step, from the new base."""
    if not hasattr(scheduler, "lr_lambdas"):
        raise ValueError(f"--learning-rate cannot change on --resume with a {type(scheduler).__name__} schedule.")
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"], group["lr"] = lr, lr * factor(scheduler.last_epoch)


def trim_samples(path: Path, step: int) -> None:
    """samples.txt back to the checkpoint's step, as metrics.jsonl: the steps after it run again and are written
    again. Its groups start with a line "===== step N: ..."."""
    if not path.exists():
        return
    blocks = re.split(r"(?m)^(?====== step \d+:)", path.read_text())
    path.write_text("".join(b for b in blocks if not b.startswith("===== step") or int(b.split()[2][:-1]) <= step))


def load_weights(path: Path, model, model_name: str, damaged: str) -> None:
    # Through from_pretrained, which reads sharded checkpoints (a 3B model's is), then a strict copy: a
    # checkpoint of another model is an error, not a silent partial load.
    try:
        saved, _ = grpo.load_model_and_tokenizer(str(path), dtype=next(model.parameters()).dtype)
    except Exception as error:
        raise ValueError(f"the model in {path} " + damaged.format(str(error).splitlines()[0][:200])) from None
    try:
        model.load_state_dict(saved.state_dict())
    except RuntimeError as error:
        raise ValueError(f"{path} is not a checkpoint of {model_name}: {str(error)[:300]}") from None


def load_adapters(path: Path, model, damaged: str) -> None:
    """LoRA: the adapters saved in path, into the model's, every one of them (strict, as load_weights)."""
    import peft
    from safetensors.torch import load_file

    try:
        adapters = load_file(path / "adapter_model.safetensors")
    except Exception as error:
        raise ValueError(f"the adapters in {path} " + damaged.format(str(error).splitlines()[0][:200])) from None
    expected = peft.get_peft_model_state_dict(model)
    if set(adapters) != set(expected) or any(adapters[k].shape != expected[k].shape for k in expected):
        raise ValueError(f"{path} does not hold this model's LoRA adapters (another model, rank or target modules).")
    peft.set_peft_model_state_dict(model, adapters)


def read_history(path: Path, step: int) -> list[dict]:
    """The metrics of steps 1..step from metrics.jsonl, for a resume from a checkpoint of that step. Lines a crash
    cut short, and steps after the checkpoint (they will run again), are dropped, and said so."""
    if not path.exists():
        print(f"{path} is missing: the curves will start at step {step + 1}")
        return []
    history, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if record.get("step", step + 1) <= step:
            history.append(record)
        else:
            dropped += 1
    if dropped:
        print(f"{path}: dropped {dropped} line(s) after the checkpoint's step {step} or cut short by the crash; "
              f"kept {len(history)}")
    return history


def main(argv=None):
    args = parse_args(argv)
    try:
        train(args)
    except (ValueError, FileNotFoundError) as error:  # a user's mistake: one line, no traceback
        sys.exit(f"error: {error}")
    except FloatingPointError as error:  # the last checkpoint, if any, is whole
        if (Path(args.output_dir) / "checkpoint").exists():
            sys.exit(f"error: {error} Continue from the last checkpoint with --resume and a lower --learning-rate.")
        sys.exit(f"error: {error} No checkpoint was written yet: start again (another --output-dir) with other values.")
    except OSError as error:  # save_checkpoint's full disk, an unreadable file: said in one line
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        sys.exit(f"interrupted: the last checkpoint is whole; continue from it with --resume --output-dir {args.output_dir}")


if __name__ == "__main__":
    main()
