from types import SimpleNamespace

import pytest
import torch

from llm.training.core import throughput
from llm.training.core.config import Config
from llm.training.core.throughput import ThroughputMonitor, peak_flops, peak_flops_of


def test_throughput_figures_over_a_logging_window(monkeypatch):
    clock = iter([100.0, 101.0, 103.5, 103.5])  # start, after the first step, measuring, re-marking
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: next(clock))
    config = Config.from_dict({"logging": {"log_every_steps": 4}})
    engine = SimpleNamespace(
        config=config, device=torch.device("cpu"), world_size=2, step=0, samples_seen=0, data_wait_s=0.0, aside_s=0.0,
        task=SimpleNamespace(tokens_per_sample=128), raw_model=SimpleNamespace(flops_per_token=lambda t: 1e6),
        logged={},
    )
    engine.log = engine.logged.update
    monitor = ThroughputMonitor(peak_flops_per_device=1e9)
    monitor.on_train_start(engine)
    engine.step, engine.samples_seen, engine.data_wait_s = 1, 64, 0.5
    monitor.on_step_end(engine)  # the first step (compilation) is left out
    assert engine.logged == {}
    engine.step, engine.samples_seen, engine.data_wait_s = 4, 64 + 3 * 64, 0.52
    engine.aside_s = 0.5  # a validation or a save: not training time, so the window is 2 s of training
    monitor.on_step_end(engine)
    m = engine.logged
    assert m["samples_per_s"] == pytest.approx(192 / 2.0)
    assert m["tokens_per_s"] == pytest.approx(96 * 128)
    assert m["step_time_ms"] == pytest.approx(2000 / 3)
    assert m["data_wait_pct"] == pytest.approx(1.0)
    assert m["mfu"] == pytest.approx(96 * 128 * 1e6 / (1e9 * 2))
    assert m["peak_mem_mb"] > 10


def test_a_record_on_the_first_step_after_a_start_measures_that_step_alone(monkeypatch):
    # a resume one step before a record: the record keeps its figures, and the next window starts after it
    clock = iter([10.0, 12.0, 12.0, 13.0, 13.0])
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: next(clock))
    config = Config.from_dict({"logging": {"log_every_steps": 5}})
    engine = SimpleNamespace(config=config, device=torch.device("cpu"), world_size=1, step=4, samples_seen=64,
                             data_wait_s=0.0, aside_s=0.0, task=SimpleNamespace(tokens_per_sample=None), records=[])
    engine.log = engine.records.append
    monitor = ThroughputMonitor()
    monitor.on_train_start(engine)
    engine.step, engine.samples_seen = 5, 80
    monitor.on_step_end(engine)
    engine.step, engine.samples_seen = 10, 160
    monitor.on_step_end(engine)
    assert [(r["samples_per_s"], r["step_time_ms"]) for r in engine.records] == [(8.0, 2000.0), (80.0, 200.0)]


def test_peak_flops_by_device_name():
    assert peak_flops(torch.device("cpu")) is None
    names = {  # as torch.cuda.get_device_name() gives them
        "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
        "NVIDIA H200": 989e12, "NVIDIA H200 NVL": 835e12, "NVIDIA GH200 480GB": 989e12, "NVIDIA A100-SXM4-80GB": 312e12,
        "NVIDIA L40S": 362e12, "NVIDIA L40": 181e12, "NVIDIA L4": 121e12, "Tesla V100-SXM2-16GB": 125e12,
        "NVIDIA B200": 2250e12, "NVIDIA GB200": 2500e12, "NVIDIA H800": 989e12, "NVIDIA H20": 148e12,
        "NVIDIA A800-SXM4-80GB": 312e12, "AMD Instinct MI300X": 1307e12, "AMD Instinct MI355X": 2500e12,
        "NVIDIA H800 PCIe": 756e12, "AMD Instinct MI325X": 1307e12, "AMD Instinct MI250X": 191.5e12,
    }
    for name, peak in names.items():
        assert peak_flops_of(name) == peak, name
    assert peak_flops_of("Some Future GPU") is None
    # a whole word of the name: a small workstation card is no A100, a laptop part or a MIG slice no desktop GPU
    for name in ("NVIDIA RTX A1000", "NVIDIA RTX A1000 6GB Laptop GPU", "NVIDIA GeForce RTX 4090 Laptop GPU",
                 "NVIDIA A100-SXM4-40GB MIG 3g.20gb"):
        assert peak_flops_of(name) is None, name
    assert peak_flops_of("NVIDIA A10") == 125e12 and peak_flops_of("Tesla V100-PCIE-16GB") == 112e12
    assert peak_flops_of("Tesla V100S-PCIE-32GB") == 130e12


def test_the_peak_is_that_of_the_precision_the_matmuls_run_in(monkeypatch):
    assert peak_flops_of("NVIDIA A100-SXM4-80GB", "fp16") == 312e12
    assert peak_flops_of("NVIDIA A100-SXM4-80GB", "fp32", tf32=True) == 156e12  # TensorFloat-32: half of bf16's
    assert peak_flops_of("NVIDIA A100-SXM4-80GB", "fp32") is None  # no tensor core: an fp32 run was put at 5% MFU
    assert peak_flops_of("Tesla V100-SXM2-16GB", "fp32", tf32=True) is None  # no TensorFloat-32 on a V100
    assert peak_flops_of("AMD Instinct MI250X", "fp32", tf32=True) is None  # fp32 matrices at a quarter of bf16's
    assert peak_flops_of("AMD Instinct MI300X", "fp32", tf32=True) == 653.5e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    for training, peak in (({"precision": "bf16"}, 989e12), ({"tf32": True}, 494.5e12), ({}, None)):
        engine = SimpleNamespace(config=Config.from_dict({"training": training}), device=torch.device("cuda"),
                                 step=0, samples_seen=0, data_wait_s=0.0, aside_s=0.0)
        monitor = ThroughputMonitor()
        monitor.on_train_start(engine)
        assert monitor.peak == peak, training
