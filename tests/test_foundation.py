"""Config, measurement helpers, stored results and the printed complexity_benchmark facade (chapter 1)."""
import json
import math
import os

import pytest
import torch

from dldna import config
from dldna.attention import attention, naive_attention
from dldna.bench import fit_loglog_slope, growth_table, measure_attention_scaling, peak_memory_mb, time_fn
from dldna.results import load_result, provenance, result_file, save_result


def test_fast_picks_by_environment(monkeypatch):
    monkeypatch.setenv("DLDNA_FAST", "1")
    assert config.is_fast() and config.fast(1000, 10) == 10
    monkeypatch.setenv("DLDNA_FAST", "0")
    assert not config.is_fast() and config.fast(1000, 10) == 1000
    monkeypatch.delenv("DLDNA_FAST")
    assert config.fast("full", "small") == "full"
    monkeypatch.setenv("DLDNA_FAST", "maybe")
    with pytest.raises(ValueError, match="DLDNA_FAST"):
        config.is_fast()


def test_device_and_seeding(monkeypatch):
    monkeypatch.setenv("DLDNA_DEVICE", "cpu")
    assert config.device() == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            config.device("cuda")
    config.seed_everything(123)
    a = torch.randn(5)
    config.seed_everything(123)
    assert torch.equal(a, torch.randn(5))
    with pytest.raises(TypeError, match="seed"):
        config.seed_everything(1.5)


def test_data_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DLDNA_DATA_DIR", str(tmp_path))
    assert config.data_dir() == tmp_path.resolve()
    monkeypatch.setenv("DLDNA_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="DLDNA_DATA_DIR"):
        config.data_dir()


@pytest.mark.parametrize("n", [1, 37, 64])
def test_naive_attention_matches_reference_and_sdpa(n):
    q, k, v = (torch.randn(2, 3, n, 8, dtype=torch.float64) for _ in range(3))
    out = naive_attention(q, k, v)
    torch.testing.assert_close(out, attention(q, k, v), rtol=0, atol=1e-12)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), rtol=0, atol=1e-12)


def test_peak_memory_sees_cpu_tensors():
    # 2**20 float32 = 4 MiB allocated and kept, 8 MiB more transient: the peak is the sum while both live.
    def work():
        kept = torch.ones(2**20)
        transient = torch.ones(2**21)
        return kept + transient[: 2**20]

    peak = peak_memory_mb(work)
    assert 15.9 <= peak <= 16.5, peak


def test_time_fn_and_validation():
    assert time_fn(lambda: sum(range(1000)), warmup=0, repeats=3) > 0
    with pytest.raises(ValueError, match="repeats"):
        time_fn(lambda: None, repeats=0)


def test_fit_loglog_slope_recovers_exponent():
    xs = [64, 128, 256, 512]
    assert fit_loglog_slope(xs, [3 * x**2 for x in xs]) == pytest.approx(2.0)
    assert fit_loglog_slope(xs, [x**1.5 for x in xs]) == pytest.approx(1.5)
    with pytest.raises(ValueError):
        fit_loglog_slope([1, 2], [1, -1])


def test_naive_memory_is_quadratic_and_sdpa_linear_on_cpu():
    lengths = [256, 512, 1024]
    naive = measure_attention_scaling(lengths, "naive", heads=2, head_dim=16, repeats=1)
    sdpa = measure_attention_scaling(lengths, "sdpa", heads=2, head_dim=16, repeats=1)
    naive_slope = fit_loglog_slope(lengths, [r["peak_mb"] for r in naive])
    sdpa_slope = fit_loglog_slope(lengths, [r["peak_mb"] for r in sdpa])
    assert 1.8 < naive_slope < 2.1, naive_slope
    # the fused CPU kernel keeps per-thread tiles, never the (N, N) matrix
    assert sdpa_slope < 1.5, sdpa_slope
    assert sdpa[-1]["peak_mb"] < 0.25 * sdpa[-1]["scores_mb"], sdpa[-1]
    # the naive peak holds at least one full score matrix
    assert all(r["peak_mb"] >= r["scores_mb"] for r in naive)
    table = growth_table(naive)
    assert table[0]["theory"] == 1.0 and table[-1]["theory"] == 16.0


def test_measure_attention_scaling_rejects_bad_arguments():
    with pytest.raises(ValueError, match="seq_lengths"):
        measure_attention_scaling([])
    with pytest.raises(ValueError, match="heads"):
        measure_attention_scaling([8], heads=0)
    with pytest.raises(ValueError, match="impl"):
        measure_attention_scaling([8], impl="magic")


def test_results_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("DLDNA_RESULTS_DIR", str(tmp_path))
    path = save_result("unit_test", {"x": [1, 2]}, "python -m unit", out_dir=tmp_path)
    record = load_result("unit_test")
    assert record["data"] == {"x": [1, 2]} and record["command"] == "python -m unit"
    assert json.loads(path.read_text())["torch"] == torch.__version__
    assert "python -m unit" in provenance(record)
    with pytest.raises(FileNotFoundError):
        load_result("does_not_exist")
    (tmp_path / "weights.pt").write_bytes(b"x")
    assert result_file("weights.pt") == tmp_path / "weights.pt"
    with pytest.raises(FileNotFoundError):
        result_file("missing.pt")
    with pytest.raises(ValueError, match="name"):
        save_result("a/b", {}, "cmd")
    from dldna.results import stored_results

    listed = {row["name"]: row for row in stored_results()}
    assert listed["unit_test"]["command"] == "python -m unit"  # the first search folder wins
    assert "attention_cost_gpu" in listed  # repository results/ is listed too


def test_every_stored_result_names_its_device_date_and_command():
    from dldna.results import stored_results

    rows = stored_results()
    assert len(rows) > 10
    for row in rows:
        assert row["device"] and row["date"] and row["command"].startswith("python"), row


def test_command_line_joins_program_and_arguments_without_a_trailing_space(monkeypatch):
    from dldna.results import command_line

    monkeypatch.setattr("sys.argv", ["bench.py"])
    assert command_line("python bench.py") == "python bench.py"
    monkeypatch.setattr("sys.argv", ["bench.py", "--ns", "1024"])
    assert command_line("python bench.py") == "python bench.py --ns 1024"
    assert command_line("python bench.py", []) == "python bench.py"  # explicit arguments win over sys.argv
    assert command_line("python bench.py", ["--fast"]) == "python bench.py --fast"


def test_stored_gpu_result_has_provenance_and_quadratic_naive_memory():
    record = load_result("attention_cost_gpu")
    assert record["device"].startswith("NVIDIA") and record["command"].startswith("python benchmarks/attention_cost.py")
    slopes = record["data"]["slopes"]
    assert abs(slopes["naive"]["peak_mb"] - 2) < 0.1 and abs(slopes["sdpa"]["peak_mb"] - 1) < 0.1


def test_printed_complexity_benchmark_api():
    from dldna.chapter_09.complexity_benchmark import (
        measure_attention_complexity,
        measure_attention_complexity_gpu,
        measure_mh_attention_complexity_gpu,
        plot_complexity_analysis,
    )

    results = measure_attention_complexity(seq_lengths=[32, 64], hidden_dim=16, batch_size=2)
    assert [r[0] for r in results] == [32, 64]
    assert all(isinstance(mb, float) and mb > 0 and s > 0 for _, mb, s in results)
    # one (2, 64, 64) float32 score matrix is 32 KiB; the peak holds at least that
    assert results[1][1] >= 2 * 64 * 64 * 4 / 2**20
    assert len(measure_attention_complexity_gpu([16], hidden_dim=8)) == 1
    assert len(measure_mh_attention_complexity_gpu([16], hidden_dim=16, num_heads=4)) == 1
    with pytest.raises(ValueError, match="num_heads"):
        measure_mh_attention_complexity_gpu([16], hidden_dim=10, num_heads=4)
    fig = plot_complexity_analysis(results)
    assert len(fig.axes) == 2
    assert math.isfinite(fig.axes[0].get_lines()[0].get_ydata()[0])


def _fake_nvidia_smi(tmp_path, monkeypatch, lines: str):
    fake = tmp_path / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\nprintf '{lines}'\nexec sleep 5\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")


def _sample(monitor, count: int):
    import time

    t0 = time.time()
    with monitor as gpu:
        deadline = time.time() + 5
        while len(gpu.samples) < count and time.time() < deadline:
            time.sleep(0.01)
    return gpu, t0


def test_gpu_monitor_reads_the_clock_and_power_from_nvidia_smi(tmp_path, monkeypatch):
    """A stand-in nvidia-smi prints four samples of (clock, power), one of them unreadable, one without a power
    reading, and a line of the wrong shape; the medians skip what could not be read."""
    import time

    from dldna.bench import GpuMonitor

    _fake_nvidia_smi(tmp_path, monkeypatch, "1980, 650.5\\n[N/A], [N/A]\\n1755, 690.0\\nNo devices\\n1710, [N/A]\\n")
    gpu, t0 = _sample(GpuMonitor(), 3)
    assert [values for _, values in gpu.samples] == [(1980.0, 650.5), (1755.0, 690.0), (1710.0, None)]
    assert gpu.between(t0, time.time()) == {"sm_clock_mhz": 1755.0, "power_w": 670.25}
    assert gpu.between(0, 1) == {"sm_clock_mhz": None, "power_w": None}


def test_gpu_monitor_keeps_the_values_of_other_fields(tmp_path, monkeypatch):
    """A field outside ``GpuMonitor.KEYS`` (what limits the clock) gives the values it took, not a median."""
    import time

    from dldna.bench import GpuMonitor

    _fake_nvidia_smi(tmp_path, monkeypatch, "1980, 0x0\\n1740, 0x4\\n1755, 0x4\\n")
    gpu, t0 = _sample(GpuMonitor(fields=("clocks.sm", "clocks_event_reasons.active")), 3)
    assert gpu.between(t0, time.time()) == {"sm_clock_mhz": 1755.0, "clocks_event_reasons.active": ["0x0", "0x4"]}


def test_gpu_monitor_within_pools_the_samples_of_several_intervals():
    """A row timed in rounds records the medians over all its rounds' samples, and none from between them."""
    from dldna.bench import GpuMonitor

    gpu = GpuMonitor()
    gpu.samples = [(1.0, (1900.0, 600.0)), (2.0, (1500.0, 100.0)), (3.0, (1700.0, 700.0)), (4.0, (1800.0, None))]
    assert gpu.within([(0.5, 1.5), (2.5, 4.5)]) == {"sm_clock_mhz": 1800.0, "power_w": 650.0}
    assert gpu.within([(0.5, 1.5)]) == gpu.between(0.5, 1.5) == {"sm_clock_mhz": 1900.0, "power_w": 600.0}
    assert gpu.within([]) == {"sm_clock_mhz": None, "power_w": None}
