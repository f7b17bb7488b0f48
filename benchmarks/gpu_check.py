"""The GPU check: ``make gpu-check``, or

    python benchmarks/gpu_check.py                     # the three phases below, under 5 minutes
    python benchmarks/gpu_check.py --skip-tests        # phases 2 and 3 only
    python benchmarks/gpu_check.py --ours speedups.compile=true   # phase 3 with compile on our side

On a CUDA machine, three phases, each timed:

1. **tests**: ``pytest -m gpu tests/test_gpu.py`` (a bf16 run's losses and plain checkpoint, the
   manual and Accelerate backends on one GPU, compile on and off, the first-token last layer with
   SDPA and flash-attention masks);
2. **MRPC**: ``python train.py trainer.epochs=1``, the bundled MiniLM: its dev accuracy and
   training samples/s from the run's ``summary.json``;
3. **throughput**: this engine against the HF Trainer at its best (``bf16=True``,
   ``train_sampling_strategy="group_by_length"``: ``benchmarks/bench.py``'s "trainer_best") on a
   bert-base-sized encoder built from config with random weights (so no hub), the same MRPC rows,
   batch size, max_length, seed and data-loader workers: training samples/s, non-pad tokens/s and
   model FLOPs utilisation, 6 x non-embedding parameters a token against the GPU's bf16 dense peak.

Phase 3 runs each side in its own process for ``--epochs`` epochs over the first N MRPC training
rows, N a whole number of batches and N / batch a multiple of our ``trainer.log_every`` (10), so
that no logging window of ours straddles two epochs. The first epoch is warm-up (CUDA start,
kernel choice, compile if asked); the others are timed: the Trainer's by a callback at each
epoch's start and end (after a CUDA sync), ours from its logged windows (``train_steps.jsonl``).
Our run evaluates once, after the last step, outside every window; the Trainer does not evaluate.

Without CUDA it checks that the tests marked ``gpu`` are collected, says so in one line and exits 0.
Not a test: nothing here asserts a speed. docs/gpu.md says how to read the output.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
for _name, _value in OFFLINE.items():
    os.environ.setdefault(_name, _value)

import bench  # noqa: E402  (benchmarks/bench.py: the Trainer's arguments and the MRPC files, shared)

GPU_TESTS = "tests/test_gpu.py"
LOG_EVERY = 10  # our trainer.log_every in phase 3
# A bert-base-sized BERT (110M parameters) from the bundled MiniLM's config and vocabulary: conf/model/tiny.yaml's way.
BERT_BASE = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
}
# Dense bf16 tensor-core peaks in TFLOP/s (NVIDIA datasheets, without 2:4 sparsity), matched by the
# words of torch.cuda.get_device_name(): the first row whose words all appear wins.
PEAK_BF16_TFLOPS: tuple[tuple[tuple[str, ...], float, str], ...] = (
    (("h100", "pcie"), 756.0, "H100 PCIe"),
    (("h100", "nvl"), 835.0, "H100 NVL"),
    (("h100",), 989.0, "H100 SXM"),  # "NVIDIA H100 80GB HBM3"
    (("h200", "nvl"), 835.0, "H200 NVL"),
    (("gh200",), 989.0, "GH200"),
    (("h200",), 989.0, "H200 SXM"),
    (("a100",), 312.0, "A100"),
    (("l40s",), 362.0, "L40S"),
    (("l4",), 121.0, "L4"),
    (("a10g",), 125.0, "A10G"),  # the A10's figure; AWS's A10G may clock lower
    (("a10",), 125.0, "A10"),
    (("4090",), 165.0, "RTX 4090"),  # with fp32 accumulation
)
PHASE_TIMEOUT_S = 360


# --- Pure helpers (tests/test_gpu_check.py runs them on the CPU) -----------------------------


def bf16_peak(device_name: str) -> tuple[float, str] | None:
    """The dense bf16 peak (TFLOP/s) and its row's label for a CUDA device name; None where unknown."""
    words = set(re.findall(r"[a-z0-9]+", device_name.lower()))
    for needed, tflops, label in PEAK_BF16_TFLOPS:
        if set(needed) <= words:
            return tflops, label
    return None


def model_tflops(non_embedding_parameters: int, tokens_per_s: float) -> float:
    """Training TFLOP/s by the usual count: 6 x non-embedding parameters per token (forward 2, backward 4)."""
    return 6 * non_embedding_parameters * tokens_per_s / 1e12


def model_flops_utilisation(non_embedding_parameters: int, tokens_per_s: float, peak_tflops: float) -> float:
    """The share of ``peak_tflops`` that :func:`model_tflops` reaches (0.4 = 40%)."""
    return model_tflops(non_embedding_parameters, tokens_per_s) / peak_tflops


def non_embedding_parameters(model: nn.Module) -> int:
    """Parameters outside the embedding tables (word, position, token type and their LayerNorm)."""
    return sum(p.numel() for name, p in model.named_parameters() if "embeddings" not in name)


def timed_rows(available: int, batch_size: int, log_every: int = LOG_EVERY) -> int:
    """The most rows (of ``available``) that make a whole number of batches, that number a multiple of ``log_every``."""
    per_window = batch_size * log_every
    rows = available // per_window * per_window
    if rows == 0:
        raise ValueError(f"{available} rows are fewer than one logging window ({log_every} batches of {batch_size})")
    return rows


def window_rates(records: Iterable[dict], batch_size: int, from_epoch: int = 1) -> tuple[float, float]:
    """Training samples/s and tokens/s over our logged windows (``train_steps.jsonl`` records: step,
    epoch, samples_per_s, tokens_per_s) of epochs ``from_epoch`` on; every batch full, so a window of
    k steps holds k x ``batch_size`` samples."""
    samples = tokens = seconds = 0.0
    previous_step = 0
    for record in records:
        window_samples = (record["step"] - previous_step) * batch_size
        previous_step = record["step"]
        if record["epoch"] < from_epoch:
            continue
        window_seconds = window_samples / record["samples_per_s"]
        samples += window_samples
        tokens += record["tokens_per_s"] * window_seconds
        seconds += window_seconds
    if seconds == 0:
        raise ValueError(f"no logged window in epoch {from_epoch} or later")
    return samples / seconds, tokens / seconds


# --- Phase 3's two sides, each in its own process ---------------------------------------------


def run_ours(args: argparse.Namespace) -> dict:
    import torch
    from hydra import compose, initialize_config_dir

    from engine.config import CONFIG_DIR
    from engine.loop import train

    out = Path(tempfile.mkdtemp(prefix="gpu_check_ours_"))
    steps = args.epochs * args.rows // args.batch_size
    overrides = [
        f"output_dir={out}",
        f"seed={args.seed}",
        "model=tiny",
        "model.name=bert-base-sized",
        *[f"model.config_overrides.{key}={value}" for key, value in BERT_BASE.items()],
        f"data.max_train_samples={args.rows}",
        f"data.max_length={args.max_length}",
        f"data.num_workers={args.workers}",
        f"optim.lr={args.lr}",
        f"trainer.batch_size={args.batch_size}",
        f"trainer.epochs={args.epochs}",
        f"trainer.log_every={LOG_EVERY}",
        f"trainer.eval_every={steps + 1}",  # no evaluation inside the epochs: one after the last step
        "trainer.mixed_precision=bf16",
        "trainer.progress=false",
        "trainer.save_state=false",
        "logger=[jsonl]",
        *args.ours,
    ]
    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        cfg = compose(config_name="config", overrides=overrides)
    train(cfg)
    records = [json.loads(line) for line in (out / "train_steps.jsonl").read_text().splitlines()]
    samples_per_s, tokens_per_s = window_rates(records, args.batch_size)
    log = (out / "train.log").read_text()
    shutil.rmtree(out, ignore_errors=True)  # a 440 MB checkpoint
    return {
        "samples_per_s": samples_per_s,
        "tokens_per_s": tokens_per_s,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "speedups": re.search(r"speed-ups: (.*)", log)[1],
    }


def run_trainer(args: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from transformers import (
        AutoConfig,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from engine.config import bundled_minilm_path

    class EpochTimer(TrainerCallback):
        """Seconds spent in the epochs after the first, between CUDA syncs."""

        def __init__(self) -> None:
            self.epoch, self.seconds, self.started = 0, 0.0, 0.0

        def on_epoch_begin(self, *_: object, **__: object) -> None:
            if self.epoch >= 1:
                torch.cuda.synchronize()
                self.started = time.perf_counter()

        def on_epoch_end(self, *_: object, **__: object) -> None:
            if self.epoch >= 1:
                torch.cuda.synchronize()
                self.seconds += time.perf_counter() - self.started
            self.epoch += 1

    torch.manual_seed(args.seed)
    source = bundled_minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(source)
    frame = bench.mrpc_frames()[0].iloc[: args.rows]
    columns = {"a": frame["#1 String"].tolist(), "b": frame["#2 String"].tolist()}
    train_set = Dataset.from_dict({**columns, "label": frame["Quality"].astype(int).tolist()}).map(
        lambda x: tokenizer(x["a"], x["b"], truncation=True, max_length=args.max_length),
        batched=True,
        remove_columns=["a", "b"],
    )
    config = AutoConfig.from_pretrained(source, num_labels=2, **BERT_BASE)
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa")
    out = tempfile.mkdtemp(prefix="gpu_check_trainer_")
    peer = argparse.Namespace(
        batch_size=args.batch_size, lr=args.lr, epochs=args.epochs, max_steps=None, seed=args.seed
    )
    arguments = bench.trainer_arguments(peer, out, best=True, bf16=True)
    arguments.update(use_cpu=False, dataloader_num_workers=args.workers)
    timer = EpochTimer()
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**arguments),
        train_dataset=train_set,
        # multiples of 8, as ours pads (tensor cores like them)
        data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8),
        callbacks=[timer],
    )
    trainer.train()
    shutil.rmtree(out, ignore_errors=True)
    timed_epochs = args.epochs - 1
    tokens = sum(len(ids) for ids in train_set["input_ids"])
    return {
        "samples_per_s": len(train_set) * timed_epochs / timer.seconds,
        "tokens_per_s": tokens * timed_epochs / timer.seconds,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "non_embedding_parameters": non_embedding_parameters(model),
    }


# --- The parent: phases, printing ---------------------------------------------------------------


def child_env() -> dict[str, str]:
    env = {**os.environ, **OFFLINE, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def side(args: argparse.Namespace, name: str) -> dict | None:
    """Run one side of phase 3 in a fresh process; its RESULT, or None (having printed why)."""
    command = [sys.executable, __file__, "--side", name, "--rows", str(args.rows), "--epochs", str(args.epochs)]
    command += ["--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--lr", str(args.lr)]
    command += ["--seed", str(args.seed), "--workers", str(args.workers), "--ours", *args.ours]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=child_env(), timeout=PHASE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        print(f"   {name}: no result within {PHASE_TIMEOUT_S} s")
        return None
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        print(f"   {name} failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        return None
    return json.loads(line[len("RESULT ") :])


def phase_tests() -> bool:
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", GPU_TESTS]
    print(f"== 1/3 tests: {' '.join(command[1:])}", flush=True)
    try:
        return subprocess.run(command, cwd=ROOT, env=child_env(), timeout=PHASE_TIMEOUT_S).returncode == 0
    except subprocess.TimeoutExpired:
        print(f"   not done within {PHASE_TIMEOUT_S} s")
        return False


def phase_mrpc(epochs: int) -> bool:
    with tempfile.TemporaryDirectory(prefix="gpu_check_mrpc_") as folder:
        run = Path(folder) / "run"
        overrides = [f"trainer.epochs={epochs}", "trainer.progress=false", "trainer.save_state=false"]
        print(f"== 2/3 MRPC, the bundled MiniLM: python train.py {' '.join(overrides)}", flush=True)
        command = [sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={run}"]
        try:
            done = subprocess.run(
                command, cwd=folder, capture_output=True, text=True, env=child_env(), timeout=PHASE_TIMEOUT_S
            )
        except subprocess.TimeoutExpired:
            print(f"   not done within {PHASE_TIMEOUT_S} s")
            return False
        if done.returncode != 0 or not (run / "summary.json").is_file():
            print(f"   failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
            return False
        summary = json.loads((run / "summary.json").read_text())
        log = (run / "train.log").read_text()
    for line in log.splitlines():
        if "| device " in line or "speed-ups:" in line:
            print(f"   {line.split('] - ', 1)[-1]}")
    print(
        f"   dev {summary['best_metric']} {summary['best_value']:.4f} (best of the run); "
        f"{summary['train_samples_per_s']:.0f} training samples/s, {summary['train_tokens_per_s']:,.0f} non-pad tokens/s "
        f"(the whole run, first steps included); first optimizer step {summary['startup_seconds']:.1f} s after start"
    )
    return True


def phase_throughput(args: argparse.Namespace, peak: tuple[float, str] | None) -> bool:
    args.rows = timed_rows(len(bench.mrpc_frames()[0]), args.batch_size)
    print(
        f"== 3/3 throughput, a bert-base-sized encoder (random weights), bf16: MRPC's first {args.rows} rows, "
        f"batch {args.batch_size}, max_length {args.max_length}, {args.workers} loader workers, "
        f"{args.epochs} epochs (the first is warm-up), seed {args.seed}",
        flush=True,
    )
    ours, trainer = side(args, "ours"), side(args, "trainer")
    if ours is None or trainer is None:
        return False
    parameters = trainer["non_embedding_parameters"]
    flops_header = f"TFLOP/s (6 x {parameters / 1e6:.1f}M non-embedding params a token)"
    mfu_header = f"MFU ({peak[1]} bf16 dense peak {peak[0]:.0f} TFLOP/s)" if peak else "MFU (peak unknown)"
    print(f"| side | training samples/s | non-pad tokens/s | {flops_header} | {mfu_header} | peak GPU memory GiB |")
    print("|---|---|---|---|---|---|")
    rows = [
        (f"this engine (speed-ups: {ours['speedups']}) {' '.join(args.ours)}".rstrip(), ours),
        ("HF Trainer, bf16=True, group_by_length", trainer),
    ]
    for label, result in rows:
        tflops = model_tflops(parameters, result["tokens_per_s"])
        mfu = f"{100 * model_flops_utilisation(parameters, result['tokens_per_s'], peak[0]):.1f}%" if peak else "-"
        print(
            f"| {label} | {result['samples_per_s']:.0f} | {result['tokens_per_s']:,.0f} | {tflops:.1f} | {mfu} "
            f"| {result['peak_gib']:.1f} |"
        )
    print(f"   this engine / HF Trainer: {ours['samples_per_s'] / trainer['samples_per_s']:.2f}x training samples/s")
    return True


def no_cuda() -> int:
    """On a machine without CUDA: the GPU tests must still be collected; one line, exit 0."""
    import torch

    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", GPU_TESTS]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=child_env())
    collected = [line for line in done.stdout.splitlines() if "::" in line]
    if done.returncode != 0 or not collected:
        print(f"gpu-check: collecting {GPU_TESTS} failed (exit {done.returncode}):\n{done.stdout[-3000:]}{done.stderr}")
        return 1
    print(
        f"gpu-check: no CUDA device here (torch {torch.__version__}), nothing run; "
        f"the {len(collected)} tests marked gpu in {GPU_TESTS} are collected and skip on this machine"
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-tests", action="store_true", help="skip phase 1 (the pytest run)")
    parser.add_argument("--mrpc-epochs", type=int, default=1, help="phase 2's epochs")
    parser.add_argument("--batch-size", type=int, default=32, help="phase 3, both sides")
    parser.add_argument("--max-length", type=int, default=128, help="phase 3, both sides")
    parser.add_argument("--epochs", type=int, default=3, help="phase 3: the first is warm-up, the rest timed")
    parser.add_argument("--workers", type=int, default=2, help="phase 3: data-loader workers, both sides")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--ours", nargs="*", default=[], help="phase 3: extra overrides for our side")
    parser.add_argument("--side", choices=["ours", "trainer"], help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first is warm-up")

    if args.side:  # a child process of phase 3
        result = run_ours(args) if args.side == "ours" else run_trainer(args)
        print("RESULT " + json.dumps(result))
        return 0

    import torch

    if not torch.cuda.is_available():
        return no_cuda()
    started = time.perf_counter()
    name = torch.cuda.get_device_name()
    peak = bf16_peak(name)
    print(
        f"gpu-check: {name} (compute capability {'.'.join(map(str, torch.cuda.get_device_capability()))}), "
        f"torch {torch.__version__}, CUDA {torch.version.cuda}; "
        + (f"bf16 dense peak {peak[0]:.0f} TFLOP/s ({peak[1]})" if peak else "peak unknown: MFU skipped"),
        flush=True,
    )
    phases = []
    if not args.skip_tests:
        phases.append(("tests", phase_tests))
    phases += [("MRPC", lambda: phase_mrpc(args.mrpc_epochs)), ("throughput", lambda: phase_throughput(args, peak))]
    failed = []
    for label, phase in phases:
        phase_started = time.perf_counter()
        ok = phase()
        print(f"   {label}: {'ok' if ok else 'FAILED'} in {time.perf_counter() - phase_started:.0f} s", flush=True)
        if not ok:
            failed.append(label)
    total = time.perf_counter() - started
    verdict = f"FAILED: {', '.join(failed)}" if failed else "all phases passed"
    print(
        f"gpu-check: {verdict} in {total:.0f} s" + (" (over the 5 minutes it is meant to take)" if total > 300 else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
