"""The Accelerate path: parity with the manual path, several gloo processes, accumulation, bf16."""

from __future__ import annotations

import json

import pytest
import torch

from engine import checkpoint
from engine.backend import ManualBackend, choose_backend
from engine.config import BackendConfig, BackendName, MixedPrecision
from engine.loop import forward_backward, train
from tests.conftest import TINY
from tests.test_model import batch, tiny


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_manual_and_accelerate_give_the_same_losses_and_metric(make_cfg, tmp_path):
    best_manual = train(make_cfg(*TINY, "backend=manual", output_dir=tmp_path / "manual"))
    best_accel = train(make_cfg(*TINY, "backend=accelerate", output_dir=tmp_path / "accel"))
    manual = _lines(tmp_path / "manual" / "train_steps.jsonl")
    accel = _lines(tmp_path / "accel" / "train_steps.jsonl")
    assert len(manual) == len(accel) == 8
    assert [s["loss"] for s in manual] == pytest.approx([s["loss"] for s in accel], rel=1e-5)
    assert [s["lr"] for s in manual] == pytest.approx([s["lr"] for s in accel])
    assert best_manual == best_accel
    assert _lines(tmp_path / "manual" / "metrics.jsonl")[-1]["loss"] == pytest.approx(
        _lines(tmp_path / "accel" / "metrics.jsonl")[-1]["loss"], rel=1e-5
    )


def test_auto_backend_follows_the_launcher(monkeypatch):
    for name in ("WORLD_SIZE", "ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_CPU", "ACCELERATE_DYNAMO_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    assert choose_backend(BackendConfig()) == BackendName.manual
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert choose_backend(BackendConfig()) == BackendName.accelerate
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # `accelerate launch --cpu` on one process
    assert choose_backend(BackendConfig()) == BackendName.accelerate
    assert choose_backend(BackendConfig(name=BackendName.manual)) == BackendName.manual


@pytest.mark.parametrize("weights", [None, [0.3, 2.0, 1.1]])
def test_k_micro_batches_equal_one_k_times_batch(weights):
    backend = ManualBackend(BackendConfig(use_cuda=False), MixedPrecision.no)
    data = batch(n=12, num_labels=3)
    data["labels"] = torch.tensor([0, 0, 0, 0, 0, 1, 1, 2, 0, 0, 1, 2])  # uneven weights per micro-batch

    def grads(micro_batches):
        model = tiny(weights=weights).eval()  # eval: no dropout, so both passes see one function
        forward_backward(model, model, backend, micro_batches)
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    whole = grads([data])
    micro = grads([{k: v[i : i + 3] for k, v in data.items()} for i in range(0, 12, 3)])
    assert whole.keys() == micro.keys()
    for name in whole:
        torch.testing.assert_close(micro[name], whole[name], rtol=1e-4, atol=1e-6, msg=name)


def test_accumulation_run_matches_bigger_batch_on_both_backends(make_cfg, tmp_path):
    """4 micro-batches of 2 step like one batch of 8: same schedule, same first-step loss."""
    common = (*TINY, "model.dropout=0.0", "data.group_by_length=false")
    train(make_cfg(*common, "trainer.batch_size=8", "backend=manual", output_dir=tmp_path / "big"))
    train(
        make_cfg(
            *common,
            "trainer.batch_size=2",
            "trainer.grad_accum_steps=4",
            "backend=accelerate",
            output_dir=tmp_path / "acc",
        )
    )
    big, acc = _lines(tmp_path / "big" / "train_steps.jsonl"), _lines(tmp_path / "acc" / "train_steps.jsonl")
    assert len(big) == len(acc) == 8
    assert [s["loss"] for s in big] == pytest.approx([s["loss"] for s in acc], rel=1e-4)


def test_bf16_and_fp16_runs_on_cpu_are_finite_and_close_to_fp32(make_cfg, tmp_path):
    train(make_cfg(*TINY, "trainer.mixed_precision=bf16", "backend=accelerate", output_dir=tmp_path / "bf16"))
    train(make_cfg(*TINY, "trainer.mixed_precision=bf16", "backend=manual", output_dir=tmp_path / "bf16m"))
    # fp16 on the manual path: the optimizer steps through the grad scaler, the schedule is the torch optimizer's.
    train(make_cfg(*TINY, "trainer.mixed_precision=fp16", "backend=manual", output_dir=tmp_path / "fp16m"))
    train(make_cfg(*TINY, output_dir=tmp_path / "fp32"))
    bf16, fp32 = _lines(tmp_path / "bf16" / "train_steps.jsonl"), _lines(tmp_path / "fp32" / "train_steps.jsonl")
    fp16 = _lines(tmp_path / "fp16m" / "train_steps.jsonl")
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in bf16 + fp16)
    assert [s["loss"] for s in bf16] == pytest.approx([s["loss"] for s in fp32], abs=0.05)
    assert [s["loss"] for s in fp16] == pytest.approx([s["loss"] for s in fp32], abs=0.01)
    assert [s["lr"] for s in fp16] == pytest.approx([s["lr"] for s in fp32])
    # The scaler did step: the head moved as fp32's did (Adam moves it ~lr a step; unmoved it would be ~1e-4 off).
    weights = [checkpoint.load_weights(tmp_path / run / checkpoint.BEST_WEIGHTS) for run in ("fp16m", "fp32")]
    assert (weights[0]["classifier.weight"] - weights[1]["classifier.weight"]).abs().max() < 1e-5
    assert _lines(tmp_path / "bf16m" / "train_steps.jsonl")[0]["loss"] == pytest.approx(bf16[0]["loss"], abs=1e-3)
    # The dev metric too: same loss to 0.02, accuracy within one of the 40 dev rows.
    (dev_bf16,), (dev_fp32,) = _lines(tmp_path / "bf16" / "metrics.jsonl"), _lines(tmp_path / "fp32" / "metrics.jsonl")
    assert dev_bf16["loss"] == pytest.approx(dev_fp32["loss"], abs=0.02)
    assert abs(dev_bf16["accuracy"] - dev_fp32["accuracy"]) <= 1 / 40 + 1e-9


def test_a_sharded_backend_saves_and_restores_its_own_optimizer_shard(tmp_path):
    """Under FSDP each rank's optimizer state is its shard: a state holds one file per rank, and a
    rank restores its own (FSDP itself needs CUDA with this accelerate: on the CPU, --use_fsdp falls
    back to DDP, so this runs the engine's sharded path on one process)."""
    from engine import resume
    from engine.model import build_model
    from tests.test_model import TINY as TINY_MODEL

    class ShardedRank(ManualBackend):
        sharded = True

        def __init__(self, index: int) -> None:
            super().__init__(BackendConfig(use_cuda=False), MixedPrecision.no)
            self.process_index, self.is_main_process = index, index == 0

        def broadcast_object(self, obj):
            return obj

        def wait_for_everyone(self):
            pass

    model = build_model(TINY_MODEL, 2, {0: "a", 1: "b"}, "single_label_classification")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(**batch(n=4, num_labels=2)).loss.backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    progress, config = resume.Progress(global_step=1), {"seed": 1}
    resume.save(tmp_path, ShardedRank(0), progress, model, optimizer, scheduler, {}, config)
    folder, _ = checkpoint.latest_state(tmp_path)
    assert [p.name for p in folder.glob("optimizer*")] == ["optimizer_rank0"]  # rank 1 writes its own, alongside
    checkpoint.write_state_part(folder, resume.optimizer_part(ShardedRank(1)), optimizer.state_dict())
    checkpoint.write_state_part(folder, "rng_rank1", checkpoint.capture_rng())
    fresh = build_model(TINY_MODEL, 2, {0: "a", 1: "b"}, "single_label_classification")
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    fresh_scheduler = torch.optim.lr_scheduler.LambdaLR(fresh_optimizer, lambda step: 1.0)
    resume.restore(folder, ShardedRank(1), config, fresh, fresh_optimizer, fresh_scheduler)
    saved, restored = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
    assert all(torch.equal(saved[i]["exp_avg"], restored[i]["exp_avg"]) for i in saved)
    for name, tensor in model.hf_model.state_dict().items():
        assert torch.equal(fresh.hf_model.state_dict()[name], tensor), name
