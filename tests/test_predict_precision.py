"""Prediction precision (auto/no/bf16/fp16 per device) and streamed file prediction (chunks, order,
count, missing texts)."""

from __future__ import annotations

import json
import subprocess
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import engine.predict as predict_module
from engine.backend import resolve_mixed_precision
from engine.config import MixedPrecision
from engine.errors import EngineError
from engine.loop import train
from engine.predict import load_classifier, predict_file, resolve_precision
from engine.sources import DataError
from tests.conftest import PYTHON, ROOT, TINY, compose_cfg, subprocess_env

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("trained")
    train(compose_cfg(run, run / "cache", *TINY, "trainer.max_steps=4"))
    return run


def cpu_bf16(monkeypatch, native: bool) -> None:
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)


def cuda_gpu(monkeypatch, capability: tuple[int, int]) -> None:
    """A GPU of this compute capability: native bf16 from Ampere (8.0), fp16 tensor cores from Volta (7.0)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: capability >= (8, 0))


# ---------------------------------------------------------------------------
# Precision
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("native, expected", [(True, MixedPrecision.bf16), (False, MixedPrecision.no)])
def test_auto_on_cpu_is_bf16_only_where_native(monkeypatch, native, expected):
    cpu_bf16(monkeypatch, native)
    assert resolve_precision("auto", CPU) == expected
    # the same decision as training's mixed_precision=auto
    assert resolve_mixed_precision(MixedPrecision.auto, "cpu") == expected


@pytest.mark.parametrize(
    "capability, inference, training",
    [
        ((9, 0), MixedPrecision.bf16, MixedPrecision.bf16),  # Hopper
        ((8, 0), MixedPrecision.bf16, MixedPrecision.bf16),  # Ampere
        ((7, 5), MixedPrecision.fp16, MixedPrecision.no),  # Turing: fp16 tensor cores, no bf16
        ((7, 0), MixedPrecision.fp16, MixedPrecision.no),  # Volta
        ((6, 1), MixedPrecision.no, MixedPrecision.no),  # Pascal
    ],
)
def test_auto_on_cuda_by_compute_capability(monkeypatch, capability, inference, training):
    cuda_gpu(monkeypatch, capability)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto never picks an emulated precision
        assert resolve_precision("auto", CUDA) == inference
    # the evaluation-only run's backend resolves as prediction does; training never gets fp16 from
    # auto (it would need loss scaling)
    assert resolve_mixed_precision(MixedPrecision.auto, "cuda", inference=True) == inference
    assert resolve_mixed_precision(MixedPrecision.auto, "cuda") == training


@pytest.mark.parametrize("capability", [(8, 0), (7, 5)])
def test_explicit_precision_is_kept(monkeypatch, capability):
    cuda_gpu(monkeypatch, capability)
    assert resolve_precision("no", CUDA) == MixedPrecision.no
    assert resolve_precision("fp16", CUDA) == MixedPrecision.fp16


def test_explicit_bf16_where_it_is_emulated_warns_and_runs(monkeypatch):
    cpu_bf16(monkeypatch, False)
    with pytest.warns(UserWarning, match=r"precision=bf16: cpu has no native bf16, so it is emulated"):
        assert resolve_precision("bf16", CPU) == MixedPrecision.bf16
    cuda_gpu(monkeypatch, (7, 5))
    with pytest.warns(UserWarning, match=r"precision=bf16: cuda has no native bf16"):
        assert resolve_precision("bf16", CUDA) == MixedPrecision.bf16


def test_unknown_precision_is_one_line():
    with pytest.raises(EngineError, match=r"^precision='fp8': choose one of auto, no, bf16, fp16$"):
        resolve_precision("fp8", CPU)


def _linear_output_dtypes(classifier, texts):
    seen = []
    hook = classifier.model.classifier.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    logits = classifier.logits(texts)
    hook.remove()
    return logits, seen


def test_bf16_prediction_computes_in_bf16_and_returns_float32(run_dir, monkeypatch):
    texts = ["A man is playing a guitar.", "Shares rose 5 percent on Monday .", "The cat sat on the mat ."]
    fp32 = load_classifier(run_dir, "cpu", precision="no")
    reference, dtypes = _linear_output_dtypes(fp32, texts)
    assert dtypes == [torch.float32]

    cpu_bf16(monkeypatch, True)  # a CPU with AVX-512 BF16 / AMX: auto picks bf16
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        classifier = load_classifier(run_dir, "cpu")
    assert classifier.precision == MixedPrecision.bf16
    logits, dtypes = _linear_output_dtypes(classifier, texts)
    assert dtypes == [torch.bfloat16]  # the matmuls ran in bf16 autocast
    assert logits.dtype == np.float32 and classifier.probabilities(logits).dtype == np.float32
    np.testing.assert_allclose(logits, reference, atol=5e-2)
    assert not np.array_equal(logits, reference)
    predictions = classifier.predict(texts)
    assert all(isinstance(p, float) for prediction in predictions for p in prediction.probabilities.values())
    assert [sum(p.probabilities.values()) for p in predictions] == pytest.approx([1.0] * 3, abs=1e-6)


def test_auto_here_follows_this_cpu(run_dir):
    classifier = load_classifier(run_dir, "cpu")
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert classifier.precision == (MixedPrecision.bf16 if native else MixedPrecision.no)


def test_cli_precision_key(run_dir, tmp_path):
    def run(precision):
        return subprocess.run(
            [PYTHON, str(ROOT / "predict.py"), f"checkpoint={run_dir}", "text=The cat sat .", f"precision={precision}"],
            capture_output=True,
            text=True,
            env=subprocess_env(),
            timeout=120,
            cwd=tmp_path,
        )

    result = run("bf16")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("label: ")
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert "warning: precision=bf16: cpu has no native bf16, so it is emulated" in result.stderr
    result = run("fp8")  # Hydra checks the key against the schema's enum
    assert result.returncode != 0 and "Invalid value 'fp8', expected one of [auto, no, bf16, fp16]" in result.stderr


# ---------------------------------------------------------------------------
# Files: streamed in chunks, file order and count kept, missing texts named
# ---------------------------------------------------------------------------

WORDS = "the cat sat on a mat while shares rose five percent after the report said a man played guitar".split()


def _pairs(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    text = [" ".join(rng.choice(WORDS, size=rng.integers(1, 30))) for _ in range(n)]
    pair = [" ".join(rng.choice(WORDS, size=rng.integers(1, 30))) for _ in range(n)]
    return pd.DataFrame({"id": [str(i) for i in range(n)], "#1 String": text, "#2 String": pair})


def _write(frame: pd.DataFrame, path):
    if path.suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif path.suffix == ".parquet":
        frame.to_parquet(path)
    else:
        frame.to_csv(path, sep="\t" if path.suffix == ".tsv" else ",", index=False)
    return path


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl", ".parquet"])
def test_a_large_file_is_read_and_predicted_chunk_by_chunk_in_file_order(run_dir, tmp_path, monkeypatch, suffix):
    rows, chunk = 300, 64
    frame = _pairs(rows)
    source = _write(frame, tmp_path / f"big{suffix}")
    classifier = load_classifier(run_dir, "cpu")
    expected = classifier.predict(list(zip(frame["#1 String"], frame["#2 String"], strict=True)), batch_size=1)

    # Spy on what is held at once: the frames read, the rows predicted per call; never the whole file.
    chunk_sizes, predicted_sizes, reader_calls = [], [], []
    real_chunks, real_logits = predict_module.read_chunks, classifier.logits

    def chunks(*args, **kwargs):
        for part in real_chunks(*args, **kwargs):
            chunk_sizes.append(len(part))
            yield part

    def logits(texts, *args, **kwargs):
        predicted_sizes.append(len(texts))
        return real_logits(texts, *args, **kwargs)

    def spy(reader):
        def read(*args, **kwargs):
            reader_calls.append(kwargs.get("chunksize"))
            return reader(*args, **kwargs)

        return read

    def whole_file(*args, **kwargs):
        raise AssertionError("the whole file was read")

    monkeypatch.setattr(predict_module, "read_chunks", chunks)
    monkeypatch.setattr(predict_module, "read_table", whole_file)
    monkeypatch.setattr(pd, "read_csv", spy(pd.read_csv))
    monkeypatch.setattr(pd, "read_json", spy(pd.read_json))
    monkeypatch.setattr(classifier, "logits", logits)

    output = predict_file(
        classifier, source, text_column="#1 String", text_pair_column="#2 String", batch_size=16, chunk_rows=chunk
    )
    assert chunk_sizes == [64, 64, 64, 64, 44]
    assert predicted_sizes == chunk_sizes
    if suffix != ".parquet":
        assert reader_calls == [chunk]
    out_suffix = suffix if suffix != ".parquet" else ".csv"
    assert output == tmp_path / f"big.predictions{out_suffix}"
    if out_suffix == ".jsonl":
        predicted = pd.read_json(output, lines=True)
    else:
        predicted = pd.read_csv(output, sep="\t" if out_suffix == ".tsv" else ",")
    assert len(predicted) == rows
    assert predicted["label"].tolist() == [p.label for p in expected]
    np.testing.assert_allclose(
        predicted["prob_equivalent"], [p.probabilities["equivalent"] for p in expected], atol=1e-5
    )
    assert not list(tmp_path.glob(".*partial"))


def test_the_chunk_reader_parses_as_training_does(run_dir, tmp_path):
    """TSVs read quotes as text (GLUE's strings carry them), CSVs honour them, the word "nan" is text."""
    from engine.config import DataConfig

    tsv = tmp_path / "q.tsv"
    tsv.write_text('text\tpair\n"quoted" start\tnan\nplain\t"x\n')
    frames = list(predict_module.read_chunks(tsv, DataConfig(text_column="text"), 1))
    assert [f["text"].tolist() for f in frames] == [['"quoted" start'], ["plain"]]
    assert frames[0]["pair"].tolist() == ["nan"] and frames[1]["pair"].tolist() == ['"x']
    csv = tmp_path / "q.csv"
    csv.write_text('text,pair\n"a, b",c\n')
    assert next(predict_module.read_chunks(csv, DataConfig(text_column="text"), 10))["text"].tolist() == ["a, b"]


def test_a_row_without_text_is_named_by_its_file_row(run_dir, tmp_path):
    classifier = load_classifier(run_dir, "cpu")
    frame = _pairs(150)
    records = frame.to_dict("records")
    records[69]["#1 String"] = None  # data row 70: in the second chunk of 64
    records[129]["#2 String"] = None
    source = tmp_path / "nulls.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(DataError, match=r"nulls.jsonl: 1 rows with no text in column '#1 String' \(data rows 70\)$"):
        predict_file(
            classifier, source, text_column="#1 String", text_pair_column="#2 String", progress=False, chunk_rows=64
        )
    assert not (tmp_path / "nulls.predictions.jsonl").exists() and not list(tmp_path.glob(".*partial"))

    short = tmp_path / "short.tsv"  # a row with a field missing
    short.write_text("#1 String\t#2 String\na b\tc d\ne f\n")
    with pytest.raises(DataError, match=r"1 rows with no text in column '#2 String' \(data rows 2\)"):
        predict_file(classifier, short, text_column="#1 String", text_pair_column="#2 String", progress=False)


def test_one_output_row_per_input_row_or_nothing(run_dir, tmp_path, monkeypatch):
    classifier = load_classifier(run_dir, "cpu")
    source = _write(_pairs(100), tmp_path / "rows.tsv")
    real_table = classifier.table
    monkeypatch.setattr(classifier, "table", lambda probs: real_table(probs).iloc[:-1])
    with pytest.raises(EngineError, match=r"rows.tsv: data rows 1-64 gave 63 predictions for 64 rows; nothing written"):
        predict_file(
            classifier, source, text_column="#1 String", text_pair_column="#2 String", progress=False, chunk_rows=64
        )
    assert not (tmp_path / "rows.predictions.tsv").exists() and not list(tmp_path.glob(".*partial"))


def test_a_header_only_file_gives_a_header_only_output(run_dir, tmp_path):
    classifier = load_classifier(run_dir, "cpu")
    source = tmp_path / "empty.csv"
    source.write_text("#1 String,#2 String\n")
    output = predict_file(classifier, source, progress=False)
    assert output.read_text().splitlines() == ["label,prob_not_equivalent,prob_equivalent"]
