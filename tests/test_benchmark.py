"""``python -m kdcore.experiment.benchmark --quick`` writes the JSON rows and the Markdown table."""

from __future__ import annotations

import json

import kdcore.experiment.benchmark as benchmark
from kdcore.checkpoint import load_checkpoint

ROW_KEYS = {"name", "size_mb", "params", "median_ms", "p90_ms", "fps"}


def test_quick_benchmark_writes_json_and_markdown(tiny_checkpoints, tmp_path, monkeypatch):
    # The paper-architecture teacher takes seconds to build; its timing code path is the same.
    monkeypatch.setattr(benchmark, "paper_teacher_model", lambda: load_checkpoint(tiny_checkpoints["teacher"])[0])
    out = tmp_path / "benchmark.json"
    args = ["--quick", "--out", str(out), "--threads", "1"]
    args += ["--student", str(tiny_checkpoints["student"]), "--teacher", str(tiny_checkpoints["teacher"])]
    assert benchmark.main(args) == 0

    result = json.loads(out.read_text())
    names = [row["name"] for row in result["rows"]]
    for expected in ("paper architecture", "offline", "PyTorch eager", "ONNX Runtime fp32", "INT8", "live frame"):
        assert any(expected in name for name in names), expected
    assert sum(name.startswith("paper:") for name in names) == 2
    for row in result["rows"]:
        assert ROW_KEYS <= row.keys()
        assert row["median_ms"] > 0 and row["fps"] == 1000 / row["median_ms"]
    assert result["threads"]["torch_num_threads"] == 1 and result["threads"]["onnxruntime_intra_op_threads"] == 1
    assert result["weights"]["student"].startswith("trained")
    assert out.with_suffix(".md").read_text().count("\n|") == len(result["rows"]) + 2  # header + separator
