"""On one CUDA GPU: a bf16 run gives finite losses and a plain checkpoint, the manual and Accelerate
backends agree, compile changes no result, and the first-token last layer gives the full model's
logits and gradients with SDPA and flash-attention masks. Every test here skips without CUDA;
``make gpu-check`` (benchmarks/gpu_check.py) runs them, and docs/gpu.md says how to read it."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from engine.loop import train
from tests.conftest import TINY, assert_same_training

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check on one)"),
]


def _native_bf16() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.4 has no emulation to exclude
        return torch.cuda.is_bf16_supported()


needs_bf16 = pytest.mark.skipif(
    torch.cuda.is_available() and not _native_bf16(), reason="this GPU has no native bf16 (Ampere or later)"
)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _ran_on_cuda(run: Path) -> str:
    """The run's log, having checked that it trained on the GPU."""
    log = (run / "train.log").read_text()
    assert re.search(r"\| device cuda", log), log[:2000]
    return log


def assert_plain_checkpoint(run: Path, model_config) -> dict[str, torch.Tensor]:
    """``best_acc_classify.pth`` is the seed recipe's plain ``state_dict``: CPU tensors in the file, fp32
    weights, no wrapper prefix, and it loads strictly into the transformers class built from the config."""
    from omegaconf import OmegaConf
    from transformers import AutoConfig, BertForSequenceClassification

    state = torch.load(run / "best_acc_classify.pth", weights_only=True)  # no map_location: as saved
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    assert {v.device.type for v in state.values()} == {"cpu"}
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    assert not [k for k in state if k.startswith("module.") or "_orig_mod" in k or k.startswith("hf_model.")]
    overrides = OmegaConf.to_container(model_config.config_overrides, resolve=True)
    config = AutoConfig.from_pretrained(model_config.source, num_labels=2, **overrides)
    model = BertForSequenceClassification(config)
    model.load_state_dict(state, strict=True)
    return state


@needs_bf16
@pytest.mark.parametrize("backend", ["manual", "accelerate"])
def test_a_bf16_run_on_cuda_has_finite_losses_and_saves_a_plain_checkpoint(make_cfg, tmp_path, backend):
    cfg = make_cfg(*TINY, "trainer.mixed_precision=bf16", f"backend={backend}", output_dir=tmp_path / backend)
    best = train(cfg)
    run = tmp_path / backend
    log = _ran_on_cuda(run)
    assert "mixed precision bf16" in log
    # The speed wing's CPU-only rows step aside on CUDA.
    applied = re.search(r"speed-ups: (.*)", log)[1]
    assert "fast_dropout" not in applied and "sparse_embedding_grad" not in applied
    steps = _lines(run / "train_steps.jsonl")
    assert [s["step"] for s in steps] == list(range(1, 9))  # 64 rows / 8: no step skipped as non-finite
    assert all(math.isfinite(s["loss"]) and math.isfinite(s["grad_norm"]) for s in steps)
    assert "non-finite" not in log
    (dev,) = _lines(run / "metrics.jsonl")
    assert math.isfinite(dev["loss"]) and dev["samples"] == 40
    assert best == dev["accuracy"]
    assert_plain_checkpoint(run, cfg.model)
    assert json.loads((run / "best_acc_classify.json").read_text())["metric_value"] == best


def test_manual_and_accelerate_agree_on_one_gpu(make_cfg, tmp_path):
    """fp32 (TINY: mixed_precision=no), same seed: the same step losses, dev metric and weights."""
    best_manual = train(make_cfg(*TINY, "backend=manual", output_dir=tmp_path / "manual"))
    best_accel = train(make_cfg(*TINY, "backend=accelerate", output_dir=tmp_path / "accel"))
    for run in ("manual", "accel"):
        _ran_on_cuda(tmp_path / run)
    manual, accel = _lines(tmp_path / "manual" / "train_steps.jsonl"), _lines(tmp_path / "accel" / "train_steps.jsonl")
    assert len(manual) == len(accel) == 8
    # CUDA's attention backward adds in no fixed order: rounding, not the 1e-5 of the CPU test.
    assert [s["loss"] for s in accel] == pytest.approx([s["loss"] for s in manual], rel=1e-4)
    assert [s["lr"] for s in accel] == pytest.approx([s["lr"] for s in manual])
    assert best_manual == best_accel
    assert_same_training(tmp_path / "accel", tmp_path / "manual", evaluations=1, weights_atol=5e-5)


def test_compile_on_and_off_give_the_same_metric_and_a_plain_checkpoint(make_cfg, tmp_path):
    """fp32, no dropout (compiled dropout draws other masks), lr 1e-3 so that 8 steps move the loss
    (by ~0.01 from step 3 on, against a run that does not learn), lengths in 32-token buckets up to 64."""
    common = (
        *TINY,
        "speedups=off",
        "model.dropout=0.0",
        "optim.lr=1e-3",
        "data.max_length=64",
        "data.pad_to_multiple_of=32",
        "trainer.eval_batch_size=8",  # 40 dev rows: full batches, one eval graph a bucket
    )
    on, off = tmp_path / "compiled", tmp_path / "eager"
    cfg = make_cfg(*common, "speedups.compile=true", output_dir=on)
    best_on = train(cfg)
    best_off = train(make_cfg(*common, output_dir=off))
    assert "speed-ups: compile\n" in _ran_on_cuda(on)
    assert "speed-ups: none\n" in _ran_on_cuda(off)
    steps_on, steps_off = _lines(on / "train_steps.jsonl"), _lines(off / "train_steps.jsonl")
    assert len(steps_on) == len(steps_off) == 8
    assert [s["loss"] for s in steps_on] == pytest.approx([s["loss"] for s in steps_off], abs=1e-3)
    (dev_on,), (dev_off,) = _lines(on / "metrics.jsonl"), _lines(off / "metrics.jsonl")
    assert dev_on["loss"] == pytest.approx(dev_off["loss"], abs=1e-3)
    assert abs(best_on - best_off) <= 1 / 40 + 1e-9  # at most one of the 40 dev rows
    compiled = assert_plain_checkpoint(on, cfg.model)
    assert compiled.keys() == torch.load(off / "best_acc_classify.pth", weights_only=True).keys()


def _first_token_pair(attn: str):
    """A random BERT classifier on the GPU (dropout off) and a copy whose last layer computes the first token only.

    Weights drawn 10x wider than BERT's 0.02: at 0.02 attention is near uniform, and ignoring the
    padding mask moves the logits by 0.2%, within bf16 rounding; at 0.2 it moves them by ~40%
    (measured on the CPU), while bf16 against fp32 differs by ~2%."""
    from transformers import BertConfig, BertForSequenceClassification

    from engine.speedups.first_token import FirstTokenLayer, last_layer
    from tests.test_speedup_first_token import _pair

    sizes = {"hidden_size": 64, "intermediate_size": 128, "initializer_range": 0.2}
    full, first = _pair(BertForSequenceClassification, BertConfig, attn, **sizes)
    full, first = full.cuda().train(), first.cuda().train()
    assert isinstance(last_layer(first), FirstTokenLayer) and not isinstance(last_layer(full), FirstTokenLayer)
    return full, first


def _padded_inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 100, (5, 24), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 13:] = 0
    mask[3, 20:] = 0  # padded rows: the first token must not attend to the padding
    return {"input_ids": ids.cuda(), "attention_mask": mask.cuda()}


def _relative_error(have: torch.Tensor, want: torch.Tensor, floor: float = 0.0) -> float:
    """``|have - want| / |want|`` (Frobenius norms), the denominator at least ``floor``."""
    have, want = have.detach().float(), want.detach().float()
    return float((have - want).norm() / max(float(want.norm()), floor, 1e-30))


@pytest.mark.parametrize(
    ("attn", "autocast"),
    [
        ("sdpa", False),
        pytest.param("sdpa", True, marks=needs_bf16),
        pytest.param("flash_attention_2", True, marks=needs_bf16),
    ],
    ids=["sdpa-fp32", "sdpa-bf16", "flash_attention_2-bf16"],
)
def test_first_token_layer_gives_the_full_models_logits_and_gradients_on_cuda(attn, autocast, monkeypatch):
    """SDPA takes a 4-D mask (the layer keeps the first query's row), flash attention a 2-D one (the
    layer passes it whole); either way the logits and every gradient are the full model's."""
    if attn == "flash_attention_2":
        from transformers.utils import is_flash_attn_2_available

        if not (is_flash_attn_2_available() and torch.cuda.get_device_capability() >= (8, 0)):
            pytest.skip("flash_attn is not installed for this GPU (pip install flash-attn; Ampere or later)")
    # Exact fp32 matmuls: an engine run earlier in this process may have turned TF32 on.
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    full, first = _first_token_pair(attn)
    inputs = _padded_inputs()
    weights = torch.arange(3.0, device="cuda")
    results = []
    for model in (full, first):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            logits = model(**inputs).logits
        (logits.float() * weights).sum().backward()
        results.append(logits.float())
    want, have = results
    assert have.shape == (5, 3) and torch.isfinite(have).all()
    # fp32: the same products over fewer rows, by kernels that may add in another order; bf16: two
    # roundings of the last layer, below the ~2% between bf16 and fp32. A mask ignored: ~40%.
    tolerance = 5e-2 if autocast else 1e-4
    assert _relative_error(have, want) < tolerance
    gradients = [
        (name, a.grad, b.grad) for (name, a), b in zip(full.named_parameters(), first.parameters(), strict=True)
    ]
    assert all((a is None) == (b is None) for _, a, b in gradients)
    # A gradient that is zero in exact arithmetic (the key bias: softmax ignores a constant) is
    # rounding noise in both models: measured against a floor of 1e-3 of the largest gradient.
    floor = 1e-3 * max(float(a.norm()) for _, a, _ in gradients if a is not None)
    for name, a, b in gradients:
        if a is not None:
            assert _relative_error(b, a, floor) < (5e-2 if autocast else 1e-3), name
