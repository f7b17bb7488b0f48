"""Side-by-side benchmark: the Hugging Face Trainer and this engine on the same job.

    python benchmarks/bench.py --mode short            # 200 steps a side, seed 42
    python benchmarks/bench.py --mode full             # 3 epochs a side, seeds 42 43 44
    python benchmarks/bench.py --mode short --levers   # one row per speed lever, added in turn

Same model (the bundled MiniLM), data (MRPC), batch size, learning rate, epochs and
seed. Each side runs in its own process (so peak RSS is its own), seed by seed in turn;
this machine's fp32 and bf16 matmul rates are measured in the same run. Prints one
table (mean ± sd over the seeds) with the ratio ours / Trainer. Eval samples/s is a
median per run: of three ``trainer.evaluate()`` calls after training, and of our run's
per-epoch evaluations (three in full mode, one in short mode). Not a test: nothing here
asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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


def seconds_since_process_start() -> float:
    import psutil

    return time.time() - psutil.Process().create_time()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_peak(dtype_name: str, size: int = 2048, seconds: float = 1.0, trials: int = 3) -> float:
    """GFLOP/s of a square matmul in ``dtype`` (bf16 through autocast-free native bf16 tensors):
    the best of ``trials`` timed windows, as a peak is (one window read 209 bf16 GFLOP/s on a
    machine that gives 370-410 in every other)."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
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


# One evaluation of MRPC dev takes ~2 s and swings by +-15% on this machine: the Trainer's eval
# rate is the median of this many evaluate() calls, ours the median of the run's per-epoch ones.
EVAL_REPEATS = 3


def run_trainer(args: argparse.Namespace) -> dict:
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

    class FirstStep(TrainerCallback):
        seconds: float | None = None

        def on_step_end(self, *_: object, **__: object) -> None:
            if FirstStep.seconds is None:
                FirstStep.seconds = seconds_since_process_start()

    from engine.config import bundled_minilm_path

    torch.manual_seed(args.seed)
    source = bundled_minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(source)
    train_frame, dev_frame = mrpc_frames()

    def encode(frame):
        data = Dataset.from_dict(
            {
                "a": frame["#1 String"].tolist(),
                "b": frame["#2 String"].tolist(),
                "label": frame["Quality"].astype(int).tolist(),
            }
        )
        return data.map(
            lambda x: tokenizer(x["a"], x["b"], truncation=True, max_length=128),
            batched=True,
            remove_columns=["a", "b"],
        )

    train_set, dev_set = encode(train_frame), encode(dev_frame)
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=2)
    out = tempfile.mkdtemp()
    training = TrainingArguments(
        output_dir=out,
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

    def accuracy(prediction):
        return {"accuracy": float((np.argmax(prediction.predictions, axis=-1) == prediction.label_ids).mean())}

    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=train_set,
        eval_dataset=dev_set,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy,
        callbacks=[FirstStep()],
    )
    started = time.perf_counter()
    result = trainer.train()
    train_seconds = time.perf_counter() - started
    steps = result.global_step
    samples = min(steps * args.batch_size, len(train_set) * args.epochs)
    tokens_per_epoch = sum(len(ids) for ids in train_set["input_ids"])
    tokens = tokens_per_epoch * samples / len(train_set)
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
        "train_seconds": train_seconds,
        "steps": steps,
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
    first_token = "first-token last layer" in (out / "train.log").read_text()
    summary = json.loads((out / "summary.json").read_text())
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out, ignore_errors=True)  # a run dir with a checkpoint per seed and lever otherwise
    return {
        "train_samples_per_s": summary["train_samples_per_s"],
        "tokens_per_s": summary["train_tokens_per_s"],
        # the median over the run's evaluations (one per epoch: 3 in full mode, 1 in short mode)
        "eval_samples_per_s": statistics.median(e["samples_per_s"] for e in evals),
        "dev_accuracy": evals[-1]["accuracy"],
        "train_seconds": summary["wall_seconds"],
        "steps": summary["steps"],
        "peak_rss_mb": peak_rss_mb(),
        "startup_seconds": summary["startup_seconds"],
        "first_token_last_layer": first_token,
    }


def parameter_counts() -> tuple[int, int]:
    """MiniLM's non-embedding parameters, and those of them that the first-token last layer
    applies to the first token only (the last layer's query, attention output and feed-forward)."""
    from transformers import AutoModelForSequenceClassification

    from engine.config import bundled_minilm_path

    model = AutoModelForSequenceClassification.from_pretrained(bundled_minilm_path(), num_labels=2)
    total = sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)
    last = model.bert.encoder.layer[-1]
    first_only = (last.attention.self.query, last.attention.output.dense, last.intermediate.dense, last.output.dense)
    return total, sum(p.numel() for module in first_only for p in module.parameters())


def attention_flops_per_token() -> tuple[float, float]:
    """The attention products' FLOPs a non-pad training token, as PaLM's MFU counts them (Chowdhery
    et al. 2022, appendix B: 12 x layers x hidden x T for a sequence of T tokens; Q K^T and the
    weighted sum of V, forward and backward), averaged over MRPC train's tokens (T weighted by the
    tokens it has: sum T^2 / sum T); and that mean length."""
    from transformers import AutoConfig, AutoTokenizer

    from engine.config import bundled_minilm_path

    config = AutoConfig.from_pretrained(bundled_minilm_path())
    tokenizer = AutoTokenizer.from_pretrained(bundled_minilm_path())
    train_frame, _ = mrpc_frames()
    ids = tokenizer(
        train_frame["#1 String"].tolist(), train_frame["#2 String"].tolist(), truncation=True, max_length=128
    )["input_ids"]
    lengths = [len(row) for row in ids]
    mean_length = sum(n * n for n in lengths) / sum(lengths)
    return 12 * config.num_hidden_layers * config.hidden_size * mean_length, mean_length


LEVERS = [
    # (row label, overrides added to the previous row's): each row keeps the levers above it.
    (
        "baseline: random batches, unsorted eval, fp32, per-tensor AdamW, per-element dropout draws, "
        "dense embedding gradient, unfused inference, full last layer, padded evaluation, no length rounding, "
        "clipping as its own pass, autocast's weight casts, layers as modules",
        [
            "data.group_by_length=false",
            "data.sort_eval_by_length=false",
            "trainer.mixed_precision=no",
            "optim.fused=false",
            "trainer.fast_dropout=false",
            "trainer.native_masks=false",
            "trainer.native_softmax=false",
            "trainer.native_attention=false",
            "trainer.native_gelu=false",
            "trainer.sparse_embedding_grad=false",
            "trainer.fused_inference=false",
            "trainer.first_token_last_layer=false",
            "trainer.packed_inference=false",
            "data.pad_to_multiple_of=1",
            "trainer.clip_in_step=false",
            "trainer.native_embedding_adamw=false",
            "trainer.bf16_weights=false",
            "trainer.fused_layers=false",
        ],
    ),
    ("+ fused AdamW", ["optim.fused=null"]),
    ("+ length-grouped training batches", ["data.group_by_length=true"]),
    ("+ length-sorted evaluation batches", ["data.sort_eval_by_length=true"]),
    ("+ bf16 autocast", ["trainer.mixed_precision=bf16"]),
    ("+ fused inference (bias and GELU inside oneDNN matmuls; evaluation only)", ["trainer.fused_inference=null"]),
    ("+ pad to a multiple of 8 (null, the default)", ["data.pad_to_multiple_of=null"]),
    ("+ fast dropout masks", ["trainer.fast_dropout=null"]),
    ("+ compiled Threefry dropout masks (one pass per mask)", ["trainer.native_masks=null"]),
    ("+ compiled attention softmax with its dropout (one pass each way)", ["trainer.native_softmax=null"]),
    (
        "+ the whole training attention in that library (per head: both products, softmax, dropout)",
        ["trainer.native_attention=null"],
    ),
    ("+ GELU from tables over the bf16 values (training)", ["trainer.native_gelu=null"]),
    ("+ sparse embedding gradient in a persistent buffer", ["trainer.sparse_embedding_grad=null"]),
    (
        "+ first-token last layer (the [CLS] token only, after its keys and values)",
        ["trainer.first_token_last_layer=null"],
    ),
    (
        "+ packed evaluation (no padding positions outside attention; evaluation only)",
        ["trainer.packed_inference=null"],
    ),
    ("+ gradient clipping inside the fused AdamW step", ["trainer.clip_in_step=null"]),
    (
        "+ the word embedding's AdamW by rows (untouched rows: the decay only)",
        ["trainer.native_embedding_adamw=null"],
    ),
    (
        "+ linears on bf16 weights from float32 masters (no autocast casts)",
        ["trainer.bf16_weights=null"],
    ),
    (
        "+ each encoder layer one autograd node in training (every default on)",
        ["trainer.fused_layers=null"],
    ),
    ("+ torch.compile (length buckets of 32)", ["trainer.compile=true"]),
]


def child(args: argparse.Namespace, side: str, seed: int, ours: list[str]) -> dict:
    """Run one side for one seed in a fresh process; its RESULT line, parsed."""
    command = [
        sys.executable,
        __file__,
        "--side",
        side,
        "--mode",
        args.mode,
        "--batch-size",
        str(args.batch_size),
        "--lr",
        str(args.lr),
        "--seeds",
        str(seed),
        "--ours",
        *ours,
    ]
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


ROWS = [
    ("train samples/s", "train_samples_per_s", "{:.1f}"),
    ("non-pad tokens/s", "tokens_per_s", "{:.0f}"),
    ("eval samples/s", "eval_samples_per_s", "{:.1f}"),
    ("dev accuracy", "dev_accuracy", "{:.4f}"),
    ("peak RSS MB", "peak_rss_mb", "{:.0f}"),
    ("start-up to first step s", "startup_seconds", "{:.1f}"),
]


def cell(runs: list[dict], key: str, fmt: str) -> str:
    mean, std = mean_std([r[key] for r in runs])
    return fmt.format(mean) + (f" ± {fmt.format(std)}" if len(runs) > 1 else "")


def mean_of(runs: list[dict], key: str) -> float:
    return mean_std([r[key] for r in runs])[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["short", "full"], default="short")
    parser.add_argument("--batch-size", type=int, default=16, help="both sides (16: the engine's default config)")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--seeds", type=int, nargs="+", help="default: 42 (short), 42 43 44 (full)")
    parser.add_argument("--side", choices=["trainer", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--ours", nargs="*", default=[], help="extra overrides for our engine (a lever to try)")
    parser.add_argument(
        "--levers", action="store_true", help="instead: one row per speed lever, each added to the ones above"
    )
    args = parser.parse_args()
    args.epochs = 3
    args.max_steps = 200 if args.mode == "short" else None
    seeds = args.seeds or ([42] if args.mode == "short" else [42, 43, 44])

    if args.side:  # a child process: run one side and print its JSON
        args.seed = seeds[0]
        result = run_trainer(args) if args.side == "trainer" else run_ours(args)
        print("RESULT " + json.dumps(result))
        return 0

    import torch

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; mode {args.mode}, batch {args.batch_size}, "
        f"lr {args.lr}, seeds {seeds}, ours {' '.join(args.ours) or '(defaults)'}",
        flush=True,
    )
    peaks = {name: matmul_peak(name) for name in ("fp32", "bf16")}
    print(
        f"matmul peak on this machine: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s", flush=True
    )
    parameters, first_only = parameter_counts()

    def flop_share(runs: list[dict]) -> str:
        """Model FLOPs (6 x non-embedding parameters a non-pad token, as MFU counts them) per
        second against the bf16 peak; where the first-token last layer skipped work, also the
        FLOPs actually performed (its first-token-only parameters cost 6 FLOPs a sample, not a token)."""
        tokens, samples = mean_of(runs, "tokens_per_s"), mean_of(runs, "train_samples_per_s")
        rate = 6 * parameters * tokens / 1e9
        text = f"{rate:.0f} GFLOP/s = {100 * rate / peaks['bf16']:.0f}% of bf16 peak"
        if any(r.get("first_token_last_layer") for r in runs):
            done = 6 * ((parameters - first_only) * tokens + first_only * samples) / 1e9
            text += f" (performed: {done:.0f} GFLOP/s = {100 * done / peaks['bf16']:.0f}%)"
        return text

    if args.levers:
        trainer = [child(args, "trainer", seed, []) for seed in seeds]
        rows, overrides = [], list(args.ours)
        for label, extra in LEVERS:
            overrides = overrides + extra
            rows.append((label, [child(args, "ours", seed, overrides) for seed in seeds]))
        base = mean_of(trainer, "train_samples_per_s"), mean_of(trainer, "eval_samples_per_s")
        print("\n| configuration | train samples/s | × Trainer | eval samples/s | × Trainer | dev acc | FLOP rate |")
        print("|---|---|---|---|---|---|---|")
        for label, runs in [("HF Trainer (its defaults: fused AdamW, fp32)", trainer), *rows]:
            train_rate, eval_rate = mean_of(runs, "train_samples_per_s"), mean_of(runs, "eval_samples_per_s")
            print(
                f"| {label} | {train_rate:.1f} | {train_rate / base[0]:.2f} | {eval_rate:.1f} | "
                f"{eval_rate / base[1]:.2f} | {mean_of(runs, 'dev_accuracy'):.4f} | {flop_share(runs)} |"
            )
        return 0

    results: dict[str, list[dict]] = {"trainer": [], "ours": []}
    for seed in seeds:  # interleaved, so a slow spell of the machine hits both sides
        for side in ("trainer", "ours"):
            # The machine's speed drifts within a run (whole runs move by 5-10% here): the bf16 peak
            # is also measured right before and after each of our runs, for a share against it.
            before = matmul_peak("bf16") if side == "ours" else None
            results[side].append(child(args, side, seed, args.ours))
            if before is not None:
                results[side][-1]["adjacent_bf16_peak"] = (before + matmul_peak("bf16")) / 2
    n = len(seeds)
    print(f"\n| metric (mean{' ± sd' if n > 1 else ''} of {n} seed(s)) | HF Trainer | ours | ours / Trainer |")
    print("|---|---|---|---|")
    for label, key, fmt in ROWS:
        ratio = mean_of(results["ours"], key) / mean_of(results["trainer"], key)
        print(f"| {label} | {cell(results['trainer'], key, fmt)} | {cell(results['ours'], key, fmt)} | {ratio:.2f} |")
    for side in ("trainer", "ours"):
        print(f"{side}: {flop_share(results[side])} on non-pad tokens (model FLOPs: 6 x non-embedding params a token)")
    print(adjacent_share(results["ours"], parameters, first_only))
    attention, mean_length = attention_flops_per_token()
    for side in ("trainer", "ours"):
        rate = (6 * parameters + attention) * mean_of(results[side], "tokens_per_s") / 1e9
        text = f"{side} with the attention products (PaLM's MFU: 6N + 12 x layers x hidden x T a token, "
        text += f"T = {mean_length:.1f}): {rate:.0f} GFLOP/s = {100 * rate / peaks['bf16']:.0f}% of bf16 peak"
        if side == "ours":
            shares = [
                (6 * parameters + attention) * r["tokens_per_s"] / (r["adjacent_bf16_peak"] * 1e9)
                for r in results[side]
            ]
            text += f", {100 * mean_std(shares)[0]:.0f}% of the peaks measured next to each run"
        print(text)
    return 0


def adjacent_share(runs: list[dict], parameters: int, first_only: int) -> str:
    """Our model (and performed) FLOP rate as a share of the bf16 peak measured right before and
    after each run (their mean), averaged over the runs."""
    shares, performed = [], []
    for r in runs:
        model = 6 * parameters * r["tokens_per_s"]
        done = 6 * ((parameters - first_only) * r["tokens_per_s"] + first_only * r["train_samples_per_s"])
        peak = r["adjacent_bf16_peak"] * 1e9
        shares.append(model / peak)
        performed.append((done if r.get("first_token_last_layer") else model) / peak)
    peaks = ", ".join(f"{r['adjacent_bf16_peak']:.0f}" for r in runs)
    return (
        f"ours against the bf16 peak measured right before and after each run ({peaks} GFLOP/s): "
        f"{100 * mean_std(shares)[0]:.0f}% of it in model FLOPs (performed: {100 * mean_std(performed)[0]:.0f}%)"
    )


if __name__ == "__main__":
    sys.exit(main())
