"""The efficiency harness on the real embedded model: figures agree with each other and with ``measure``.

Timings are never asserted against targets here (the machine is shared); only what must
hold on any machine: sizes equal the accounting, bytes on disk are the parameter bytes
plus a small header, speedups and FLOP ratios are the ratios of the measured figures
against the baseline, the CSV round-trips, and the CLI gives one-line errors.
"""

import copy

import pytest

from raysparse.cli import main
from raysparse.efficiency import bench, read_csv
from raysparse.errors import RaysparseError
from raysparse.pruning import Selection, get_algorithm, select_mask
from raysparse.structure import Encoder, apply_mask, measure, save_pruned, shrink

SEQ = 16
BATCHES = (1, 2)


@pytest.fixture(scope="module")
def dense(embedded_dir):
    import raysparse

    return raysparse.load_model(str(embedded_dir))


@pytest.fixture(scope="module")
def half(dense):
    enc = Encoder(dense)
    mask = select_mask(get_algorithm("magnitude").score(dense), 0.5, enc.hidden_size, enc.head_dim,
                       Selection(scope="per-layer"))
    return shrink(copy.deepcopy(dense), mask)


@pytest.fixture(scope="module")
def report(dense, half):
    return bench({"dense": dense, "half": half}, BATCHES, SEQ, warmup=2, repeats=9, threads=1, devices=["cpu"],
                 memory=True)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sizes_agree_with_measure_and_disk(report, dense, half):
    for name, model in (("dense", dense), ("half", half)):
        size = measure(model, SEQ)
        for batch in BATCHES:
            row = report.row(name, batch)
            assert (row.total_params, row.encoder_params, row.embedding_params) == \
                (size.total_params, size.encoder_params, size.embedding_params)
            assert row.param_bytes == size.bytes == 4 * size.total_params
            assert row.flops_per_sequence == size.flops_per_sequence
            assert row.encoder_sparsity == pytest.approx(size.encoder_sparsity)
            assert 0 < row.disk_bytes - row.param_bytes < 1_000_000       # safetensors header, config, sidecar
            assert 0.9 * row.param_bytes < row.rss_model_bytes < 1.5 * row.param_bytes + 200e6
            assert row.rss_peak_forward_bytes >= row.rss_baseline_bytes
            assert (row.torch, row.device, row.threads, row.dtype) == (report.environment["torch"], "cpu", 1, "float32")
    assert report.row("half", 1).flop_ratio == pytest.approx(2.0, abs=0.02)
    assert report.row("half", 1).encoder_sparsity == pytest.approx(0.5, abs=1e-3)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_speedups_and_flop_ratios_are_against_the_baseline(report):
    """Speedup is the baseline's median over the model's at the same batch size; the FLOP ratio the
    baseline's FLOPs over the model's: ratios of measured figures, never a timing against a target."""
    for batch in BATCHES:
        base, half = report.row("dense", batch), report.row("half", batch)
        assert (base.speedup, base.flop_ratio, base.speedup_per_flop_ratio) == (1.0, 1.0, 1.0)
        assert half.speedup == pytest.approx(base.median_ms / half.median_ms, rel=1e-12)
        assert half.flop_ratio == pytest.approx(base.flops_per_sequence / half.flops_per_sequence, rel=1e-12)
        assert half.speedup_per_flop_ratio == pytest.approx(half.speedup / half.flop_ratio, rel=1e-12)
        assert half.p10_ms <= half.median_ms <= half.p90_ms and base.p10_ms <= base.median_ms <= base.p90_ms


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_csv_round_trips_and_plot_and_table(report, tmp_path):
    rows = read_csv(report.to_csv(tmp_path / "bench.csv"))
    assert rows == report.rows
    assert len(rows) == 2 * len(BATCHES)
    png = report.plot(tmp_path / "bench.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    table = report.table()
    assert "environment: torch" in table and "half" in table and "speedup/FLOP ratio" in table


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_logs_to_mlflow_only_inside_an_active_run(report, tmp_path, monkeypatch):
    import mlflow

    assert report.log_to_mlflow() is False
    previous = mlflow.get_tracking_uri()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")      # a file store is enough to see what was logged
    mlflow.set_tracking_uri((tmp_path / "mlruns").as_uri())
    try:
        with mlflow.start_run() as run:
            assert report.log_to_mlflow() is True
        logged = mlflow.get_run(run.info.run_id).data
        assert logged.metrics["bench/half/cpu/b2/median_ms"] == report.row("half", 2).median_ms
        assert logged.metrics["bench/half/disk_bytes"] == report.row("half", 2).disk_bytes
        assert logged.params["bench/sequence_length"] == str(SEQ)
        artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "bench")]
        assert {"bench/bench.csv", "bench/bench.png"} <= set(artifacts)
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.mark.timeout(30)
def test_masked_models_are_refused(dense):
    with apply_mask(dense, select_mask(get_algorithm("magnitude").score(dense), 0.5, 384, 32)):
        with pytest.raises(RaysparseError, match="only physically shrunk models"):
            bench({"masked": dense}, devices=["cpu"])


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_cli_runs_on_embedded_and_shrunk_copy(half, tmp_path, capsys):
    folder = save_pruned(half, tmp_path / "half")
    code = main(["bench", "embedded", str(folder), "--batch-sizes", "1,2", "--seq-len", "8", "--repeats", "2",
                 "--warmup", "1", "--threads", "1", "--devices", "cpu", "--no-memory",
                 "--csv", str(tmp_path / "out.csv"), "--plot", str(tmp_path / "out.png")])
    out = capsys.readouterr().out
    assert code == 0
    assert "embedded" in out and "half" in out and "median ms" in out
    rows = read_csv(tmp_path / "out.csv")
    assert [(r.model, r.batch_size) for r in rows] == [("embedded", 1), ("half", 1), ("embedded", 2), ("half", 2)]
    assert rows[0].speedup == 1.0 and rows[1].encoder_params < rows[0].encoder_params
    assert (tmp_path / "out.png").is_file()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("argv, message", [
    (["bench", "/nonexistent/model-folder"], "does not exist"),
    (["bench", "embedded", "--batch-sizes", "0"], "bench.batch_sizes"),
    (["bench", "embedded", "--batch-sizes", "1,x"], "bench.batch_sizes"),
    (["bench", "embedded", "--repeats", "0"], "bench.repeats"),
])
def test_cli_bad_input_is_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
