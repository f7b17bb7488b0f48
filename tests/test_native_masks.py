"""``trainer.native_masks``: the compiled Threefry-2x32-20 keep masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import native_masks
from engine.errors import EngineError
from engine.fast_dropout import fast_dropout, keep_mask, keep_multiplier
from engine.loop import train
from tests.conftest import TINY, native_on_and_off, needs_cc


def reference_lanes(count: int, key: int) -> np.ndarray:
    """Threefry-2x32-20 written out in NumPy from the paper's description: the stream's 16-bit lanes."""
    rotations = (13, 15, 26, 6, 17, 29, 16, 24)
    k = [key & 0xFFFFFFFF, key >> 32]
    ks = [np.uint32(k[0]), np.uint32(k[1]), np.uint32(0x1BD11BDA ^ k[0] ^ k[1])]
    blocks = np.arange((count + 3) // 4, dtype=np.uint64)
    x0 = (blocks & np.uint64(0xFFFFFFFF)).astype(np.uint32) + ks[0]
    x1 = (blocks >> np.uint64(32)).astype(np.uint32) + ks[1]
    for r in range(20):
        x0 = x0 + x1
        x1 = ((x1 << np.uint32(rotations[r % 8])) | (x1 >> np.uint32(32 - rotations[r % 8]))) ^ x0
        if r % 4 == 3:
            s = r // 4 + 1
            x0 = x0 + ks[s % 3]
            x1 = x1 + ks[(s + 1) % 3] + np.uint32(s)
    words = np.stack([x0, x1], 1).reshape(-1)
    lanes = np.stack([words & 0xFFFF, words >> 16], 1).reshape(-1)
    return lanes[:count].astype(np.int64)


@pytest.fixture
def native():
    path = native_masks.use_native_masks(True, True)
    assert path is not None and native_masks.active()
    return path


@needs_cc
def test_the_generator_gives_threefrys_known_answers(native):
    library = native_masks.load(native)
    for counter, key, expected in native_masks.KNOWN_ANSWERS:
        assert native_masks.threefry(library, counter[0] | counter[1] << 32, 1, key).tolist() == list(expected)
    # and blocks past one 64-block chunk equal the NumPy reference
    words = native_masks.threefry(library, 0, 150, (0x89ABCDEF, 0x01234567)).numpy()
    lanes = np.stack([words & 0xFFFF, words >> 16], 1).reshape(-1)
    assert np.array_equal(lanes, reference_lanes(600, 0x0123456789ABCDEF))


@needs_cc
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("p", [0.0, 1 / 65536, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("numel", [1, 5, 256, 1003, 4 * 64 * 3 + 7])
def test_masks_are_the_reference_lanes_against_the_threshold(native, dtype, p, numel):
    """Every size (chunks of 256 lanes and a partial one), dtype and rate, including p = 0 and 1:
    element i kept exactly when lane i >= round(p * 65536), under the key torch's generator gave."""
    torch.manual_seed(9)
    key = int(torch.empty((), dtype=torch.int64).random_(-(2**63), None)) % 2**64
    torch.manual_seed(9)
    keep = keep_multiplier((numel,), p, dtype)
    expected = torch.from_numpy(reference_lanes(numel, key) >= round(p * 65536)).to(dtype)
    assert keep.dtype == dtype and torch.equal(keep, expected)


@needs_cc
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_mask_split_over_threads_is_the_one_threads_mask(native, dtype):
    """A mask large enough for two threads (each takes a run of whole 256-lane chunks; the last run
    ends in a partial chunk) is the one-thread mask, lane for lane the reference."""
    numel = 2 * 256 * 256 + 1003
    threads = torch.get_num_threads()
    try:
        masks = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            torch.manual_seed(4)
            masks.append(keep_multiplier((numel,), 0.1, dtype))
    finally:
        torch.set_num_threads(threads)
    torch.manual_seed(4)
    key = int(torch.empty((), dtype=torch.int64).random_(-(2**63), None)) % 2**64
    expected = torch.from_numpy(reference_lanes(numel, key) >= round(0.1 * 65536)).to(dtype)
    assert all(torch.equal(mask, expected) for mask in masks)


@needs_cc
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("index", [2, 3, 4 * 64 * 2 + 4, 4 * 64 * 2 + 5])  # low / high half; full chunk / tail
def test_a_lane_equal_to_the_threshold_is_kept(native, dtype, index):
    """The threshold set to the value of one lane of the stream (a random p would meet that value
    once in 65536 elements): that element is kept, and every other one decided as in the reference."""
    numel = 4 * 64 * 2 + 7
    torch.manual_seed(21)
    key = int(torch.empty((), dtype=torch.int64).random_(-(2**63), None)) % 2**64
    lanes = reference_lanes(numel, key)
    p = float(lanes[index]) / 65536  # round(p * 65536) == lanes[index]
    torch.manual_seed(21)
    keep = keep_multiplier((numel,), p, dtype)
    assert keep[index].item() == 1
    assert torch.equal(keep, torch.from_numpy(lanes >= lanes[index]).to(dtype))


@needs_cc
def test_masks_drop_at_the_rate_and_follow_torchs_seed(native):
    torch.manual_seed(0)
    keep = keep_mask((1000, 1000), 0.1)
    assert 1 - keep.float().mean().item() == pytest.approx(0.1, abs=0.002)  # 1e6 draws: sd 0.0003
    lanes = keep.flatten()[: 4 * (keep.numel() // 4)].view(-1, 4).float().mean(0)  # each lane of a block
    assert torch.allclose(lanes, torch.full((4,), 0.9), atol=0.004)
    torch.manual_seed(3)
    first, second = keep_mask((257,), 0.3), keep_mask((257,), 0.3)
    after = torch.randint(0, 2**31, (4,))
    torch.manual_seed(3)
    assert torch.equal(keep_mask((257,), 0.3), first) and not torch.equal(first, second)
    # one draw of torch's generator per mask, so seed and resume decide every mask
    torch.manual_seed(3)
    torch.empty(2, dtype=torch.int64).random_(-(2**63), None)
    assert torch.equal(torch.randint(0, 2**31, (4,)), after)


@needs_cc
def test_dropout_with_native_masks_scales_the_kept_elements(native):
    x = torch.randn(6, 7, 33, dtype=torch.bfloat16, requires_grad=True)
    torch.manual_seed(5)
    out = fast_dropout(x, 0.25)
    torch.manual_seed(5)
    keep = keep_mask(x.shape, 0.25)
    assert torch.equal(out, (x.detach().float() * keep * (1 / 0.75)).bfloat16())
    out.backward(torch.ones_like(out))
    assert torch.equal(x.grad, (keep * (1 / 0.75)).bfloat16())


@needs_cc
def test_the_library_is_built_once_and_reused(tmp_path):
    first = native_masks.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert native_masks.build(tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no scratch left behind


def test_without_a_compiler_null_falls_back_and_true_is_an_error(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # nothing cached there
    with pytest.raises(EngineError, match="could not run the C compiler .*no-such-cc"):
        native_masks.use_native_masks(True, True)
    assert native_masks.use_native_masks(None, True) is None and not native_masks.active()
    assert "draws its masks through torch instead" in caplog.text
    torch.manual_seed(0)
    assert 1 - keep_mask((1000, 1000), 0.1).float().mean().item() == pytest.approx(0.1, abs=0.002)
    assert native_masks.use_native_masks(None, False) is None  # fast dropout off: nothing to do
    with pytest.raises(EngineError, match="trainer.fast_dropout is off"):
        native_masks.use_native_masks(True, False)


def test_an_unwritable_cache_falls_back_or_errors(monkeypatch, tmp_path, caplog):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    assert native_masks.use_native_masks(None, True) is None and "through torch instead" in caplog.text
    with pytest.raises(EngineError, match="trainer.native_masks: .*cache"):
        native_masks.use_native_masks(True, True)


def test_a_compile_error_names_the_command_and_its_output(monkeypatch, tmp_path):
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'keep_mask.c:1: something broke' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    with pytest.raises(EngineError, match=r"(?s)failed \(3\):\nkeep_mask.c:1: something broke"):
        native_masks.build(tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())  # nothing half-built is left to load


def test_native_masks_true_without_fast_dropout_is_a_config_error(make_cfg):
    cfg = make_cfg(*TINY, "trainer.native_masks=true", "trainer.fast_dropout=false")
    with pytest.raises(EngineError, match="trainer.native_masks=true .* trainer.fast_dropout=false"):
        train(cfg)


@needs_cc
def test_a_training_run_uses_the_native_masks(make_cfg, tmp_path):
    """On by default with fast dropout on the CPU; logged, and the run trains as with torch's draws
    (the same data, other masks: finite losses, the same number of steps)."""
    runs = native_on_and_off(make_cfg, tmp_path, "native_masks", "native dropout masks: Threefry-2x32-20 from")
    assert len(runs["null"]) == len(runs["false"]) == 8
    assert all(np.isfinite(runs["null"])) and runs["null"] != runs["false"]
