"""The recipe switches: layer-wise lr decay, re-initialised top layers, a moving average of the
weights, early stopping. Each is off by default and changes what it should, and nothing else."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest
import torch
from torch.optim.swa_utils import AveragedModel

import engine.evaluation
from engine import checkpoint, resume
from engine.config import ConfigError, ModelConfig, OptimConfig, ProblemType, bundled_minilm_path, validate
from engine.errors import EngineError
from engine.loop import train
from engine.model import ClassifierWithLoss, build_hf_model, build_model, reinit_top_layers
from engine.optim import build_optimizer, build_scheduler
from tests.conftest import TINY
from tests.test_reliability import _assert_same_run

LABELS = {0: "no", 1: "yes"}
SINGLE = ProblemType.single_label_classification
REAL_EVALUATE = engine.evaluation.evaluate


def _tiny_classifier(make_cfg) -> ClassifierWithLoss:
    return build_model(validate(make_cfg(*TINY)).model, 2, LABELS, SINGLE)


def _records(run: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run / name).read_text().splitlines()]


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.layer_decay=0", "optim.layer_decay must be in (0, 1] or null, got 0.0"),
        ("model.reinit_layers=-1", "model.reinit_layers must be >= 0, got -1"),
        ("trainer.ema_decay=1", "trainer.ema_decay must be in (0, 1) or null, got 1.0"),
        ("trainer.early_stopping_patience=0", "trainer.early_stopping_patience must be >= 1 or null, got 0"),
        ("trainer.early_stopping_threshold=-0.1", "trainer.early_stopping_threshold must be >= 0, got -0.1"),
    ],
)
def test_bad_recipe_values_are_refused_in_one_line(make_cfg, override, message):
    with pytest.raises(ConfigError, match=r"\n  " + re.escape(message) + "$"):
        validate(make_cfg(*TINY, override))


def _recipe(make_cfg, *overrides: str) -> tuple:
    config = validate(make_cfg(*overrides))
    t = config.trainer
    return config.optim.lr, t.eval_every, config.model.reinit_layers, config.optim.layer_decay, t.ema_decay, t.epochs


@pytest.mark.parametrize(
    ("overrides", "recipe"),
    [
        # the bundled MiniLM's own recipe (conf/model/minilm.yaml, measured in docs/recipe.md)
        ((), (1e-4, 0, 1, None, None, 3)),
        # the seed recipe for BERT-base, any local folder, and the tiny test model
        (("model=bert-base-uncased",), (5e-5, 0, 0, None, None, 3)),
        (("model=local", "model.source=/models/any"), (5e-5, 0, 0, None, None, 3)),
        (("model=tiny",), (5e-5, 0, 0, None, None, 3)),
        # GoEmotions: every pretrained layer kept, pos_weight class weights (below)
        (("data=goemotions",), (1e-4, 0, 0, None, None, 3)),
        # the command line wins over the model's recipe
        (("optim.lr=2e-5", "trainer.eval_every=50", "model.reinit_layers=0"), (2e-5, 50, 0, None, None, 3)),
    ],
)
def test_each_model_has_its_recipe_and_the_command_line_wins(make_cfg, overrides, recipe):
    assert _recipe(make_cfg, *overrides) == pytest.approx(recipe)
    weights = validate(make_cfg(*overrides)).loss.class_weights
    assert weights == ("balanced" if overrides == ("data=goemotions",) else None)  # GoEmotions: pos_weight


def test_every_other_switch_is_off_by_default(make_cfg):
    config = validate(make_cfg())
    assert config.optim.layer_decay is None and config.trainer.ema_decay is None
    assert config.trainer.early_stopping_patience is None and config.trainer.early_stopping_threshold == 0.0


def test_layer_decay_gives_each_depth_its_lr_and_the_schedule_scales_each(make_cfg):
    model = _tiny_classifier(make_cfg)  # 2 encoder layers
    optim = OptimConfig(lr=1e-3, weight_decay=0.01, warmup_ratio=0.25, layer_decay=0.5)
    optimizer = build_optimizer(model, optim, torch.device("cpu"))
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    expected_lr = {"classifier": 1e-3, "pooler": 1e-3, "layer.1.": 5e-4, "layer.0.": 2.5e-4, "embeddings": 1.25e-4}
    for name, parameter in model.named_parameters():
        group = group_of.pop(id(parameter))
        lr = next(value for part, value in expected_lr.items() if part in name)
        assert group["lr"] == pytest.approx(lr, rel=1e-15), name
        no_decay = name.endswith(".bias") or "LayerNorm" in name
        assert group["weight_decay"] == (0.0 if no_decay else 0.01), name
    assert not group_of  # every optimized parameter is one of the model's, once
    assert len(optimizer.param_groups) == 8  # 4 depths, each with and without weight decay
    assert optimizer.param_groups[0]["lr"] == 1e-3  # the head first: the loop logs its lr

    # LambdaLR scales each group's own initial lr: 8 steps, 2 of warm-up.
    scheduler = build_scheduler(optimizer, optim, 8)
    initial = [group["initial_lr"] for group in optimizer.param_groups]
    for step, factor in [(1, 0.5), (2, 1.0), (5, 0.5), (7, 1 / 6)]:
        while scheduler.last_epoch < step:
            optimizer.step()
            scheduler.step()
        for group, lr in zip(optimizer.param_groups, initial, strict=True):
            assert group["lr"] == pytest.approx(lr * factor, rel=1e-12)


def test_without_layer_decay_the_groups_are_the_plain_two(make_cfg):
    model = _tiny_classifier(make_cfg)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3), torch.device("cpu"))
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.01, 0.0]
    assert {group["lr"] for group in optimizer.param_groups} == {1e-3}


def test_layer_decay_on_a_model_without_encoder_layers_names_its_class():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    distil = DistilBertForSequenceClassification(DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64))
    with pytest.raises(EngineError, match="DistilBertForSequenceClassification has no encoder layers"):
        build_optimizer(ClassifierWithLoss(distil, SINGLE), OptimConfig(layer_decay=0.9), torch.device("cpu"))


def test_reinit_changes_exactly_the_top_layers_and_the_pooler_of_the_pretrained_model():
    minilm = build_hf_model(ModelConfig(name="minilm", source=bundled_minilm_path()), 2, LABELS, SINGLE)  # 6 layers
    loaded = {name: tensor.clone() for name, tensor in minilm.state_dict().items()}
    torch.manual_seed(0)
    reinit_top_layers(minilm, 2)
    changed = {name for name, tensor in minilm.state_dict().items() if not torch.equal(tensor, loaded[name])}
    top = {
        name for name in loaded if name.startswith(("bert.encoder.layer.4.", "bert.encoder.layer.5.", "bert.pooler."))
    }
    assert torch.equal(loaded["bert.pooler.dense.bias"], torch.zeros(384))  # MiniLM's pooler bias: already 0
    assert changed == top - {"bert.pooler.dense.bias"}
    layer_norm = minilm.bert.encoder.layer[5].output.LayerNorm
    assert torch.equal(layer_norm.weight, torch.ones(384)) and torch.equal(layer_norm.bias, torch.zeros(384))
    assert minilm.bert.encoder.layer[5].output.dense.weight.std().item() == pytest.approx(0.02, rel=0.05)
    with pytest.raises(EngineError, match="model.reinit_layers=7: BertForSequenceClassification has 6 encoder layers"):
        reinit_top_layers(minilm, 7)


def test_ema_best_checkpoint_is_the_average_of_the_steps_weights(make_cfg, tmp_path, monkeypatch):
    """The weights after each of the 8 steps, averaged by hand, are the saved best; its metric is theirs."""
    seen: list[dict[str, torch.Tensor]] = []
    update = AveragedModel.update_parameters

    def recording(self, model):
        seen.append({name: p.detach().clone() for name, p in model.named_parameters()})
        update(self, model)

    monkeypatch.setattr(AveragedModel, "update_parameters", recording)
    run = tmp_path / "run"
    train(make_cfg(*TINY, "trainer.ema_decay=0.9"))  # 8 steps, one evaluation at the end
    assert len(seen) == 8
    average = dict(seen[0])
    for weights in seen[1:]:
        average = {name: 0.9 * average[name] + 0.1 * weights[name] for name in average}

    best = torch.load(run / "best_acc_classify.pth", weights_only=True)
    assert set(average) <= set(best)
    for name, tensor in average.items():
        assert torch.allclose(best[name], tensor, atol=1e-6), name
    live = torch.load(checkpoint.latest_state(run)[0] / checkpoint.MODEL_KEY, weights_only=True)
    assert all(torch.equal(live[name], seen[-1][name]) for name in seen[-1])  # training went on with its own
    assert not torch.equal(best["classifier.weight"], live["classifier.weight"])

    # A plain transformers model takes it strictly, and evaluating it gives the metric the run recorded.
    from transformers import AutoConfig, BertForSequenceClassification

    overrides = validate(make_cfg(*TINY)).model.config_overrides
    plain = BertForSequenceClassification(AutoConfig.from_pretrained(bundled_minilm_path(), num_labels=2, **overrides))
    plain.load_state_dict(best, strict=True)
    info = json.loads((run / "best_acc_classify.json").read_text())
    again = train(make_cfg(*TINY, "trainer.do_train=false", f"checkpoint={run}", output_dir=tmp_path / "eval"))
    assert again == info["metric_value"] == _records(run)[-1]["accuracy"]
    eval_loss = json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())["loss"]
    assert eval_loss == pytest.approx(info["metrics"]["loss"], abs=1e-5)


def test_ema_on_the_accelerate_backend_matches_the_manual_one(make_cfg, tmp_path):
    common = (*TINY, "trainer.ema_decay=0.9", "trainer.eval_every=4")
    for backend in ("manual", "accelerate"):
        train(make_cfg(*common, f"backend={backend}", output_dir=tmp_path / backend))
    manual, accelerate = (
        torch.load(tmp_path / b / "best_acc_classify.pth", weights_only=True) for b in ("manual", "accelerate")
    )
    assert manual.keys() == accelerate.keys()
    assert all(torch.allclose(manual[k], accelerate[k], atol=1e-5) for k in manual)
    evals = [_records(tmp_path / b) for b in ("manual", "accelerate")]
    assert [e["loss"] for e in evals[0]] == pytest.approx([e["loss"] for e in evals[1]], rel=1e-5)


def test_resume_with_every_switch_on_is_bit_exact(make_cfg, tmp_path, monkeypatch):
    """Interrupted by SIGTERM at step 7 and resumed in this process: the same run, EMA state included."""
    common = (
        *TINY,
        "trainer.epochs=2",
        "trainer.eval_every=4",
        "trainer.ema_decay=0.8",
        "optim.layer_decay=0.8",
        "model.reinit_layers=1",
        "trainer.early_stopping_patience=20",
    )
    train(make_cfg(*common, output_dir=tmp_path / "clean"))  # 16 steps
    update = AveragedModel.update_parameters

    def interrupting(self, model):
        update(self, model)
        if int(self.n_averaged) == 7:
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(AveragedModel, "update_parameters", interrupting)
    with pytest.raises(SystemExit) as stopped:
        train(make_cfg(*common, output_dir=tmp_path / "cut"))
    assert stopped.value.code == 143
    assert checkpoint.latest_state(tmp_path / "cut")[0].name == "step_00000007"
    monkeypatch.setattr(AveragedModel, "update_parameters", update)
    train(make_cfg(*common, f"resume={tmp_path / 'cut'}", output_dir=tmp_path / "cut"))

    _assert_same_run(tmp_path / "clean", tmp_path / "cut")
    log = (tmp_path / "cut" / "train.log").read_text()
    assert "re-initialised the top 1 encoder layer(s)" in log and "layer-wise lr decay 0.8" in log
    averages = [
        torch.load(checkpoint.latest_state(r)[0] / resume.EMA_KEY) for r in (tmp_path / "clean", tmp_path / "cut")
    ]
    assert averages[0]["n_averaged"] == averages[1]["n_averaged"] == 16
    assert all(torch.equal(averages[0][name], averages[1][name]) for name in averages[0])


def _script_metric(monkeypatch, name: str, values: list[float], interrupt_at: int | None = None) -> list[float]:
    """Each evaluation reports the next of ``values`` as ``name``; SIGTERM during evaluation ``interrupt_at``."""
    calls = [0]

    def scripted(*args, **kwargs):
        metrics, logits, gold = REAL_EVALUATE(*args, **kwargs)
        calls[0] += 1
        if calls[0] == interrupt_at:
            signal.raise_signal(signal.SIGTERM)
        return {**metrics, name: values.pop(0)}, logits, gold

    monkeypatch.setattr(engine.evaluation, "evaluate", scripted)
    return values


EARLY = (*TINY, "trainer.epochs=3", "trainer.eval_every=2")  # 8 steps an epoch, an evaluation every 2


@pytest.mark.parametrize(
    ("metric", "values"),
    [
        ("accuracy", [0.5, 0.6, 0.55, 0.6, 0.9, 0.9]),  # equal to the best is no improvement
        ("loss", [0.7, 0.6, 0.65, 0.6, 0.1, 0.1]),  # lower is better
    ],
)
def test_early_stopping_stops_after_patience_evaluations_without_improvement(
    make_cfg, monkeypatch, tmp_path, metric, values
):
    _script_metric(monkeypatch, metric, values)
    run = tmp_path / "run"
    best = train(make_cfg(*EARLY, f"trainer.metric_for_best={metric}", "trainer.early_stopping_patience=2"))
    assert best == 0.6
    assert [r["step"] for r in _records(run)] == [2, 4, 6, 8]  # stopped after the 2nd without improvement
    assert _records(run, "train_steps.jsonl")[-1]["step"] == 8
    summary = _summary(run)
    assert (summary["early_stopped"], summary["early_stopped_step"], summary["steps"]) == (True, 8, 8)
    assert (summary["best_value"], summary["best_step"]) == (0.6, 4)
    info = json.loads((run / "best_acc_classify.json").read_text())
    assert (info["metric_value"], info["step"]) == (0.6, 4)
    state, _ = checkpoint.latest_state(run)
    progress = json.loads((state / checkpoint.PROGRESS_FILE).read_text())["progress"]
    assert (progress["global_step"], progress["early_stopped"], progress["evals_without_improvement"]) == (8, True, 2)
    assert "early stopping at step 8: 2 evaluations without" in (run / "train.log").read_text()


def test_early_stopping_threshold_and_a_run_that_never_stops(make_cfg, monkeypatch, tmp_path):
    # +0.04 is within the 0.05 threshold (count 1), +0.06 beats it (reset), +0.02 and +0.01 do not: stop at
    # the 5th evaluation, while the best still follows every improvement.
    _script_metric(monkeypatch, "accuracy", [0.5, 0.54, 0.6, 0.62, 0.63, 0.99])
    overrides = ("trainer.early_stopping_patience=2", "trainer.early_stopping_threshold=0.05")
    assert train(make_cfg(*EARLY, *overrides)) == 0.63
    summary = _summary(tmp_path / "run")
    assert (summary["early_stopped_step"], summary["best_step"]) == (10, 10)

    _script_metric(monkeypatch, "accuracy", [0.5] * 12)
    train(make_cfg(*EARLY, output_dir=tmp_path / "off"))  # no patience: all 24 steps
    summary = _summary(tmp_path / "off")
    assert (summary["early_stopped"], summary["early_stopped_step"], summary["steps"]) == (False, None, 24)


def test_the_early_stopping_count_survives_a_resume(make_cfg, monkeypatch, tmp_path):
    """Patience 3: no improvement after step 2, interrupted at step 4 (count 1); the resumed run stops at 8."""
    values = _script_metric(monkeypatch, "accuracy", [0.5, 0.4, 0.4, 0.4, 0.4, 0.4], interrupt_at=2)
    common = (*EARLY, "trainer.early_stopping_patience=3")
    with pytest.raises(SystemExit):
        train(make_cfg(*common))
    run = tmp_path / "run"
    state, _ = checkpoint.latest_state(run)
    assert json.loads((state / checkpoint.PROGRESS_FILE).read_text())["progress"]["evals_without_improvement"] == 1
    _script_metric(monkeypatch, "accuracy", values)  # the resumed run goes on with the script
    train(make_cfg(*common, f"resume={run}"))
    summary = _summary(run)
    assert (summary["early_stopped_step"], summary["best_step"]) == (8, 2)
    # The state of a stopped run is complete: resuming it again trains nothing more.
    train(make_cfg(*common, f"resume={run}"))
    assert _summary(run)["steps"] == 8
