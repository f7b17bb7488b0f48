"""Side-by-side benchmark: this engine and the Hugging Face Trainer on the same job.

    python benchmarks/bench.py --mode short     # 200 steps a side, seed 42
    python benchmarks/bench.py --mode full      # 3 epochs a side, seeds 42 43 44
    python benchmarks/bench.py --ab "" "speedups=off"            # interleaved A/B of our engine
    python benchmarks/bench.py --ab "" "speedups.fast_dropout=false" --pairs 3 --epochs 1

Same model (the bundled MiniLM), data (MRPC), batch size, learning rate, epochs and seed. Our
side runs its defaults on the peer's recipe (every pretrained layer kept), not the bundled MiniLM's
own (lr 1e-4, a fresh top layer); evaluation at epoch ends on both sides.
The peer runs twice: at its defaults (fp32, fused AdamW) and at its best on this job, with
its own speed switches on (``train_sampling_strategy="group_by_length"``, and ``bf16=True`` where
the CPU computes bf16 natively: elsewhere bf16 is emulated and slower than fp32, and our engine
trains in fp32 there too).
Each side runs in its own process, seed by seed in turn, so a slow spell of the machine hits
every side. Eval samples/s is a median per run: of three ``trainer.evaluate()`` calls after
training, and of our run's per-epoch evaluations. Not a test: nothing here asserts a speed.

``--ab A B [C ...]`` runs our engine with override sets A, B, ... in turn, ``--pairs`` rounds
(default 3, seeds 42, 43, 44: each round's arms share a seed), and prints each run's train and
eval samples/s and dev accuracy with the ratios to A in the same round.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SIDES = {
    "trainer": "HF Trainer, defaults (fp32)",
    "trainer_best": "HF Trainer at its best (group_by_length, bf16=True where native)",
    "ours": "this engine, defaults",
}
# One evaluation of MRPC dev takes ~1-2 s and swings by +-15%: the Trainer's eval rate is the
# median of this many evaluate() calls, ours the median of the run's per-epoch ones.
EVAL_REPEATS = 3


def seconds_since_process_start() -> float:
    import psutil

    return time.time() - psutil.Process().create_time()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_peak(dtype_name: str, size: int = 2048, seconds: float = 1.0, trials: int = 3) -> float:
    """GFLOP/s of a square matmul in ``dtype``: the best of ``trials`` timed windows."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(trials):
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            a @ b
            count += 1
        best = max(best, 2 * size**3 * count / (time.perf_counter() - started) / 1e9)
    return best


def mrpc_frames():
    import pandas as pd

    def read(name: str):
        return pd.read_csv(
            ROOT / "data/mrpc" / name, sep="\t", quoting=3, encoding="utf-8-sig", dtype=str, keep_default_na=False
        )

    return read("train.tsv"), read("dev.tsv")


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 / AMX), as our ``mixed_precision=auto`` asks."""
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def trainer_arguments(args: argparse.Namespace, output_dir: str, best: bool, bf16: bool = True) -> dict:
    """The peer's TrainingArguments: the same job; ``best`` adds its own speed switches: length
    grouping, and ``bf16=True`` where ``bf16`` (the CPU computes it natively; emulated bf16 is
    slower than fp32, so there the peer's best is fp32, as ours is)."""
    arguments = dict(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64,
        learning_rate=args.lr,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps or -1,
        warmup_steps=0.1,
        weight_decay=0.01,
        seed=args.seed,
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        logging_steps=50,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    if best:
        arguments.update(bf16=bf16, train_sampling_strategy="group_by_length")
    return arguments


def run_trainer(args: argparse.Namespace, best: bool) -> dict:
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from engine.config import bundled_minilm_path

    class FirstStep(TrainerCallback):
        seconds: float | None = None

        def on_step_end(self, *_: object, **__: object) -> None:
            if FirstStep.seconds is None:
                FirstStep.seconds = seconds_since_process_start()

    torch.manual_seed(args.seed)
    source = bundled_minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(source)

    def encode(frame):
        columns = {"a": frame["#1 String"].tolist(), "b": frame["#2 String"].tolist()}
        data = Dataset.from_dict({**columns, "label": frame["Quality"].astype(int).tolist()})
        return data.map(
            lambda x: tokenizer(x["a"], x["b"], truncation=True, max_length=128),
            batched=True,
            remove_columns=["a", "b"],
        )

    train_set, dev_set = (encode(frame) for frame in mrpc_frames())
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=2)
    out = tempfile.mkdtemp()

    def accuracy(prediction):
        return {"accuracy": float((np.argmax(prediction.predictions, axis=-1) == prediction.label_ids).mean())}

    trainer = Trainer(
        model=model,
        args=TrainingArguments(**trainer_arguments(args, out, best, bf16=native_bf16())),
        train_dataset=train_set,
        eval_dataset=dev_set,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy,
        callbacks=[FirstStep()],
    )
    started = time.perf_counter()
    result = trainer.train()
    train_seconds = time.perf_counter() - started
    samples = min(result.global_step * args.batch_size, len(train_set) * args.epochs)
    tokens = sum(len(ids) for ids in train_set["input_ids"]) * samples / len(train_set)
    eval_rates = []
    for _ in range(EVAL_REPEATS):
        started = time.perf_counter()
        metrics = trainer.evaluate()
        eval_rates.append(len(dev_set) / (time.perf_counter() - started))
    shutil.rmtree(out, ignore_errors=True)
    return {
        "train_samples_per_s": samples / train_seconds,
        "tokens_per_s": tokens / train_seconds,
        "eval_samples_per_s": statistics.median(eval_rates),
        "dev_accuracy": metrics["eval_accuracy"],
        "peak_rss_mb": peak_rss_mb(),
        "startup_seconds": FirstStep.seconds,
    }


def run_ours(args: argparse.Namespace) -> dict:
    from hydra import compose, initialize_config_dir

    from engine.config import CONFIG_DIR
    from engine.loop import train

    out = Path(tempfile.mkdtemp())
    overrides = [
        f"output_dir={out}",
        f"seed={args.seed}",
        f"trainer.batch_size={args.batch_size}",
        f"optim.lr={args.lr}",
        f"trainer.epochs={args.epochs}",
        # the peer's recipe: evaluation at epoch ends, every pretrained layer kept (not MiniLM's own)
        "trainer.eval_every=0",
        "model.reinit_layers=0",
        "trainer.progress=false",
        "trainer.log_every=50",
        "trainer.save_state=false",
        "logger=[jsonl]",
        *args.ours,
    ]
    if args.max_steps:
        overrides.append(f"trainer.max_steps={args.max_steps}")
    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        cfg = compose(config_name="config", overrides=overrides)
    train(cfg)
    summary = json.loads((out / "summary.json").read_text())
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out, ignore_errors=True)
    return {
        "train_samples_per_s": summary["train_samples_per_s"],
        "tokens_per_s": summary["train_tokens_per_s"],
        "eval_samples_per_s": statistics.median(e["samples_per_s"] for e in evals),
        "dev_accuracy": evals[-1]["accuracy"],
        "best_dev_accuracy": summary["best_value"],
        "peak_rss_mb": peak_rss_mb(),
        "startup_seconds": summary["startup_seconds"],
    }


def child(args: argparse.Namespace, side: str, seed: int, ours: list[str]) -> dict:
    """Run one side for one seed in a fresh process; its RESULT line, parsed."""
    command = [sys.executable, __file__, "--side", side, "--seeds", str(seed), "--ours", *ours]
    command += ["--batch-size", str(args.batch_size), "--lr", str(args.lr), "--epochs", str(args.epochs)]
    command += ["--max-steps", str(args.max_steps or 0)]
    done = subprocess.run(command, capture_output=True, text=True)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{side} (seed {seed}) failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    result = json.loads(line[len("RESULT ") :])
    print(f"  {side} seed {seed} {' '.join(ours)}: {json.dumps(result)}", flush=True)
    return result


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def cell(runs: list[dict], key: str, fmt: str) -> str:
    mean, std = mean_std([r[key] for r in runs])
    return fmt.format(mean) + (f" ± {fmt.format(std)}" if len(runs) > 1 else "")


def mean_of(runs: list[dict], key: str) -> float:
    return mean_std([r[key] for r in runs])[0]


ROWS = [
    ("train samples/s", "train_samples_per_s", "{:.1f}"),
    ("non-pad tokens/s", "tokens_per_s", "{:.0f}"),
    ("eval samples/s", "eval_samples_per_s", "{:.1f}"),
    ("dev accuracy (last epoch)", "dev_accuracy", "{:.4f}"),
    ("peak RSS MB", "peak_rss_mb", "{:.0f}"),
    ("start-up to first step s", "startup_seconds", "{:.1f}"),
]


def comparison_table(results: dict[str, list[dict]]) -> str:
    n = len(results["ours"])
    lines = [
        f"| metric (mean{' ± sd' if n > 1 else ''} of {n} seed(s)) | {' | '.join(SIDES[s] for s in results)} "
        "| ours / Trainer defaults | ours / Trainer at its best |",
        "|---" * (len(results) + 3) + "|",
    ]
    for label, key, fmt in ROWS:
        cells = " | ".join(cell(results[side], key, fmt) for side in results)
        ours = mean_of(results["ours"], key)
        ratios = [ours / mean_of(results[peer], key) for peer in ("trainer", "trainer_best")]
        lines.append(f"| {label} | {cells} | {ratios[0]:.2f} | {ratios[1]:.2f} |")
    return "\n".join(lines)


def non_embedding_parameters() -> int:
    from transformers import AutoModelForSequenceClassification

    from engine.config import bundled_minilm_path

    model = AutoModelForSequenceClassification.from_pretrained(bundled_minilm_path(), num_labels=2)
    return sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)


def ab(args: argparse.Namespace) -> int:
    """Interleaved A/B of our engine: in each round every arm runs once (A, B, C, ...), one process
    a run; round i uses seed ``seeds[i % len(seeds)]`` for every arm, so each pair shares a seed."""
    arms = [shlex.split(arm) for arm in args.ab]
    names = [arm or "(defaults)" for arm in args.ab]
    print(
        f"A/B, {args.pairs} rounds, {args.epochs} epoch(s), seeds {args.seeds}; A = {names[0]}; "
        + "; ".join(f"{chr(66 + i)} = {name}" for i, name in enumerate(names[1:]))
    )
    rounds = []
    for index in range(args.pairs):
        seed = args.seeds[index % len(args.seeds)]
        rounds.append([child(args, "ours", seed, arm) for arm in arms])
    print("\n| arm | round (seed) | train samples/s | × A | eval samples/s | × A | dev accuracy | A's dev accuracy |")
    print("|---|---|---|---|---|---|---|---|")
    summary = []
    for arm in range(len(arms)):
        train_ratios, eval_ratios = [], []
        for index, runs in enumerate(rounds):
            base, run = runs[0], runs[arm]
            train_ratios.append(run["train_samples_per_s"] / base["train_samples_per_s"])
            eval_ratios.append(run["eval_samples_per_s"] / base["eval_samples_per_s"])
            print(
                f"| {chr(65 + arm)} {names[arm]} | {index + 1} ({args.seeds[index % len(args.seeds)]}) "
                f"| {run['train_samples_per_s']:.1f} | {train_ratios[-1]:.3f} | {run['eval_samples_per_s']:.1f} "
                f"| {eval_ratios[-1]:.3f} | {run['dev_accuracy']:.4f} | {base['dev_accuracy']:.4f} |"
            )
        if arm:
            summary.append(
                f"{chr(65 + arm)} / A ({names[arm]}): train {statistics.median(train_ratios):.3f} "
                f"(median of {len(train_ratios)}; mean {mean_std(train_ratios)[0]:.3f}), "
                f"eval {statistics.median(eval_ratios):.3f} (median; mean {mean_std(eval_ratios)[0]:.3f})"
            )
    print("\n".join(summary))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["short", "full"], default="short")
    parser.add_argument("--batch-size", type=int, default=16, help="every side (16: the engine's default config)")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--epochs", type=int, help="default 3 (1 for --ab)")
    parser.add_argument("--max-steps", type=int, help="default: 200 in short mode, none in full mode and --ab")
    parser.add_argument("--seeds", type=int, nargs="+", help="default: 42 (short), 42 43 44 (full, --ab)")
    parser.add_argument("--side", choices=list(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--ours", nargs="*", default=[], help="extra overrides for our engine")
    parser.add_argument("--ab", nargs="+", metavar="ARM", help="interleaved A/B: override sets of ours, A first")
    parser.add_argument("--pairs", type=int, default=3, help="A/B rounds (--ab)")
    args = parser.parse_args()
    args.epochs = args.epochs or (1 if args.ab else 3)
    if args.max_steps is None:
        args.max_steps = 200 if args.mode == "short" and not args.ab else None
    args.seeds = args.seeds or ([42] if args.mode == "short" and not args.ab else [42, 43, 44])

    if args.side:  # a child process: run one side and print its JSON
        args.seed = args.seeds[0]
        result = run_ours(args) if args.side == "ours" else run_trainer(args, best=args.side == "trainer_best")
        print("RESULT " + json.dumps(result))
        return 0

    import torch

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch_size}, lr {args.lr}, "
        f"epochs {args.epochs}, max steps {args.max_steps}, seeds {args.seeds}, ours {' '.join(args.ours) or '(defaults)'}",
        flush=True,
    )
    if args.ab:
        return ab(args)
    precision = "bf16" if native_bf16() else "fp32"
    peak = matmul_peak(precision)
    print(f"native bf16: {native_bf16()}; {precision} matmul peak on this machine: {peak:.0f} GFLOP/s", flush=True)
    results: dict[str, list[dict]] = {side: [] for side in SIDES}
    for seed in args.seeds:  # interleaved, so a slow spell of the machine hits every side
        for side in SIDES:
            results[side].append(child(args, side, seed, args.ours if side == "ours" else []))
    print()
    print(comparison_table(results))
    parameters = non_embedding_parameters()
    for side, label in SIDES.items():
        rate = 6 * parameters * mean_of(results[side], "tokens_per_s") / 1e9
        print(
            f"{label}: {rate:.0f} GFLOP/s = {100 * rate / peak:.0f}% of the {precision} peak (6 x non-embedding params a token)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
