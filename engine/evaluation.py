"""Evaluation: metrics over every sample of a loader, keeping the best checkpoint, and the
evaluation-only run (``trainer.do_train=false checkpoint=...``)."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine import checkpoint, tracking
from engine.config import Config, ProblemType, greater_is_better
from engine.data import load_data, make_collator, restore_order, run_eval_loader
from engine.errors import EngineError
from engine.metrics import compute_metrics, load_metric, per_class_report
from engine.optim import averaged_weights

log = logging.getLogger("engine.loop")


def format_metrics(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def metric_for_best(metrics: dict[str, float], name: str) -> float:
    """``metrics[name]``, or an error naming the metrics that were computed."""
    if name not in metrics:
        raise EngineError(f"trainer.metric_for_best={name!r} is not computed; choose one of {sorted(metrics)}")
    return float(metrics[name])


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module,
    loader: Any,
    backend: Any,
    problem_type: ProblemType,
    progress: bool = False,
    order: np.ndarray | None = None,
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Loss and metrics over every sample of ``loader``, gathered from all processes exactly once.

    Logits and labels come back in data set row order when ``order`` (:func:`engine.data.row_order`
    of the unprepared loader) is given, whatever order the batches ran in.
    """
    from tqdm.auto import tqdm

    classifier = backend.unwrap_model(model)
    model.eval()
    load_metric(problem_type)  # imported once per process (~1 s): outside the timing
    started = time.perf_counter()
    all_logits, all_labels = [], []
    for batch in tqdm(loader, desc="eval", leave=False, disable=not (progress and backend.is_main_process)):
        batch = backend.to_device(batch)
        with backend.autocast():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        all_logits.append(backend.gather_for_metrics(logits.float()))
        all_labels.append(backend.gather_for_metrics(batch["labels"]))
    logits = torch.cat(all_logits)
    labels = torch.cat(all_labels)
    loss = classifier.loss_from_logits(logits, labels)
    logits_np, labels_np = logits.cpu().numpy(), labels.cpu().numpy()
    if order is not None:
        logits_np, labels_np = restore_order(order, logits_np, labels_np)
    metrics = {"loss": float(loss), **compute_metrics(logits_np, labels_np, problem_type)}
    metrics["samples"] = int(labels_np.shape[0])
    metrics["samples_per_s"] = metrics["samples"] / max(time.perf_counter() - started, 1e-9)
    model.train()
    return metrics, logits_np, labels_np


class BestKeeper:
    """Evaluates on dev and keeps the best checkpoint: ``best_acc_classify.pth`` + ``.json``.

    The best value and step live in the loop's ``progress`` (so a resumed run knows them); the
    best evaluation's logits and labels are kept here for the thresholds and plots at the end.
    With a moving average of the weights (``averaged``, ``trainer.ema_decay``) it is the average
    that is evaluated and saved. It also counts evaluations without improvement for early
    stopping and sets ``progress.early_stopped`` when ``trainer.early_stopping_patience`` runs out.
    """

    def __init__(
        self,
        run_dir: Path,
        config: Config,
        backend: Any,
        labels: Any,
        describe: dict[str, Any],
        averaged: torch.nn.Module | None = None,
    ) -> None:
        self.run_dir, self.config, self.backend, self.labels = run_dir, config, backend, labels
        self.describe = describe  # what the .json says besides the metric and step
        self.averaged = averaged
        t = config.trainer
        self.sign = 1.0 if t.greater_is_better else -1.0
        self.predictions: tuple[np.ndarray, np.ndarray] | None = None
        rule = "from the metric's name" if t.greater_is_better == greater_is_better(t.metric_for_best) else "as set"
        log.info(
            "best checkpoint: the %s %s (trainer.greater_is_better=%s, %s)",
            *("highest" if t.greater_is_better else "lowest", t.metric_for_best, t.greater_is_better, rule),
        )

    def _save(self, weights: dict[str, torch.Tensor], metrics: dict[str, float], epoch: int, step: int) -> None:
        name = self.config.trainer.metric_for_best
        info = {**self.describe, "metric_name": name, "metric_value": metrics[name], "metrics": metrics}
        info.update(epoch=epoch, step=step)
        checkpoint.save_best(self.run_dir, weights, info)

    def state(self) -> dict[str, torch.Tensor]:
        """The best evaluation's logits and labels, for the resumable state (thresholds and plots at the end)."""
        if self.predictions is None:
            return {}
        logits, labels = self.predictions
        return {"best_logits": torch.from_numpy(logits), "best_labels": torch.from_numpy(labels)}

    def restore(self, saved: dict[str, torch.Tensor]) -> None:
        if "best_logits" in saved:
            self.predictions = (saved["best_logits"].numpy(), saved["best_labels"].numpy())

    def missing(self, step: int) -> str | None:
        """What is wrong with the best checkpoint on disk, if it is not the one of ``step``."""
        weights, info = self.run_dir / checkpoint.BEST_WEIGHTS, self.run_dir / checkpoint.BEST_INFO
        if not weights.is_file() or not info.is_file():
            return f"{weights if not weights.is_file() else info} is missing (the best was at step {step})"
        try:
            saved_step = checkpoint.load_info(info).get("step")
        except checkpoint.CheckpointError as error:
            return str(error)
        if saved_step != step:
            return f"{info} describes step {saved_step}, but the best was at step {step}"
        return None

    def check_on_disk(self, progress: Any, model: torch.nn.Module) -> None:
        """After a resume: the best checkpoint the state remembers must be on disk. When the state's
        weights are the best ones it is written again from them; otherwise the resume is refused."""
        if progress.best_value is None:
            return
        problem = self.backend.broadcast_object(
            self.missing(progress.best_step) if self.backend.is_main_process else None
        )
        if problem and progress.best_step == progress.global_step and self.predictions is not None:
            classifier = self.backend.unwrap_model(model)
            with averaged_weights(self.averaged, classifier.hf_model):
                weights = self.backend.state_dict(model)  # every rank: FSDP gathers the shards
            if self.backend.is_main_process:
                logits, gold = self.predictions
                loss = classifier.loss_from_logits(torch.from_numpy(logits), torch.from_numpy(gold))
                metrics = {"loss": float(loss), **compute_metrics(logits, gold, self.labels.problem_type)}
                epoch = progress.epoch - 1 if progress.step_in_epoch == 0 and progress.epoch > 0 else progress.epoch
                self._save(weights, metrics, epoch, progress.global_step)
                log.warning("%s: written again from the resumed state, whose weights are the best", problem)
            problem = None
        if problem:
            raise checkpoint.CheckpointError(
                f"cannot resume: {problem}; the state does not hold the best weights. "
                "Put the best checkpoint back, or start a new run"
            )

    def __call__(self, model, loader, order, progress, tracker, epoch: int) -> dict[str, float]:
        t, step = self.config.trainer, progress.global_step
        hf_model = self.backend.unwrap_model(model).hf_model
        with averaged_weights(self.averaged, hf_model):
            metrics, logits, gold = evaluate(model, loader, self.backend, self.labels.problem_type, t.progress, order)
            value = metric_for_best(metrics, t.metric_for_best)
            best = progress.best_value
            # A non-finite metric, or non-finite weights (checked in save_best), never become "best".
            improved = math.isfinite(value) and (best is None or self.sign * (value - best) > 0)
            # Every rank computed the same metric from the same gathered predictions, so all agree;
            # under FSDP every rank takes part in gathering the weights.
            weights = self.backend.state_dict(model) if improved else None
            if improved and self.backend.is_main_process:
                self._save(weights, metrics, epoch, step)
        if improved:
            progress.best_value, progress.best_step, self.predictions = value, step, (logits, gold)
        tracker.log("eval", {"epoch": epoch, **metrics, "best": progress.best_value, "is_best": improved}, step)
        log.info("eval epoch %d step %d: %s%s", epoch, step, format_metrics(metrics), " (best)" if improved else "")
        if self.backend.is_main_process:
            report = per_class_report(logits, gold, self.labels.problem_type, self.labels.names)
            tracking.append_per_class(self.run_dir, report, step)
        progress.last_eval_step = step
        self._count_patience(progress, value, best)
        self.backend.wait_for_everyone()
        return metrics

    def _count_patience(self, progress: Any, value: float, best: float | None) -> None:
        """Early stopping: an evaluation that beats the best before it by more than
        ``trainer.early_stopping_threshold`` resets the count; any other adds one."""
        t = self.config.trainer
        if t.early_stopping_patience is None:
            return
        beats = math.isfinite(value) and (best is None or self.sign * (value - best) > t.early_stopping_threshold)
        progress.evals_without_improvement = 0 if beats else progress.evals_without_improvement + 1
        if progress.evals_without_improvement >= t.early_stopping_patience:
            progress.early_stopped = True
            log.info(
                "early stopping at step %d: %d evaluations without %s improving by more than %g (best %s at step %d)",
                *(progress.global_step, progress.evals_without_improvement, t.metric_for_best),
                *(t.early_stopping_threshold, progress.best_value, progress.best_step),
            )


def evaluate_checkpoint(config: Config, backend: Any, run_dir: Path) -> float:
    """``trainer.do_train=false checkpoint=...``: the training metric code on ``data.eval_split``,
    in the backend's autocast: ``trainer.mixed_precision=auto`` resolved for inference as
    prediction resolves it (``make_backend(..., inference=True)``)."""
    from engine.model import ClassifierWithLoss, load_hf_model, load_tokenizer

    weights_path, info_path = checkpoint.locate(config.checkpoint)
    info = checkpoint.load_info(info_path)
    hf_model = load_hf_model(weights_path, info)
    problem_type = ProblemType(info["problem_type"])
    names = [info["id2label"][str(i)] for i in range(info["num_labels"])]
    tokenizer = load_tokenizer(info.get("tokenizer") or info["model_source"])
    config.data.problem_type = problem_type
    with backend.main_process_first():
        data = load_data(config.data, tokenizer, with_train=False, label_names=names)
    loader = run_eval_loader(data.eval, config, make_collator(tokenizer, config.data), backend.device)
    model, loader = backend.prepare(ClassifierWithLoss(hf_model, problem_type), loader)
    metrics, _, _ = evaluate(model, loader, backend, problem_type, config.trainer.progress)
    where = {"split": config.data.eval_split, "source": data.sources["validation"], "checkpoint": str(weights_path)}
    result = {**where, "precision": backend.mixed_precision.value, **metrics}  # precision as resolved here
    if backend.is_main_process:
        checkpoint.atomic_write_json(run_dir / "eval_metrics.json", result)
        eval_log = tracking.JsonlLogger(run_dir / tracking.EVAL_METRICS)
        eval_log.log(result, int(info.get("step", 0)))
        eval_log.close()
    log.info("evaluated %s on %s: %s", weights_path, config.data.eval_split, format_metrics(metrics))
    return metric_for_best(metrics, config.trainer.metric_for_best)
