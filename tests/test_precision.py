"""The precision policy: bf16 autocast on a CPU only where the CPU runs bf16 natively."""

import pytest
import torch

import device

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")


@pytest.mark.parametrize("native", [True, False])
def test_cpu_text_tower_is_bf16_only_with_native_bf16(monkeypatch, native):
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: native)
    assert device.autocast_dtype(CPU, "text") == (torch.bfloat16 if native else None)
    assert device.autocast_dtype(CPU, "image") is None  # depthwise convolutions: fp32 on every CPU
    assert device.autocast_dtype(CPU, "text", enabled=False) is None
    ctx = device.autocast(CPU, "text")
    assert isinstance(ctx, torch.autocast) == native
    line = device.precision_summary(CPU)
    assert line.startswith("precision on cpu: image tower fp32, text tower " + ("bf16" if native else "fp32"))
    assert ("without native bf16" in line) != native


def test_accelerators_and_no_amp(monkeypatch):
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    assert device.autocast_dtype(CUDA, "image") == device.autocast_dtype(CUDA, "text") == torch.bfloat16
    assert device.autocast_dtype(MPS, "image") is None and device.autocast_dtype(MPS, "text") is None
    assert "text tower fp32 (--no_amp)" in device.precision_summary(CPU, enabled=False)


def test_probe_is_onednns_and_false_without_it(monkeypatch):
    assert device.cpu_has_native_bf16() is bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    for answer, native in ((1, True), (0, False)):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda answer=answer: answer)
        assert device.cpu_has_native_bf16() is native

    def missing():
        raise RuntimeError("no oneDNN in this build")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", missing)
    assert device.cpu_has_native_bf16() is False


def test_text_tower_runs_in_the_chosen_dtype(monkeypatch):
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    for native, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(device, "cpu_has_native_bf16", lambda native=native: native)
        with device.autocast(CPU, "text"):
            assert lin(x).dtype == dtype


def test_train_says_what_it_chose_once(tiny_data, tmp_path, capsys, monkeypatch):
    from tiny import train_argv

    import train
    for native in (True, False):
        monkeypatch.setattr(device, "cpu_has_native_bf16", lambda native=native: native)
        capsys.readouterr()
        assert train.main(train_argv(tiny_data, tmp_path / f"run{native}", "--epochs", "1", "--max_steps", "1")) == 0
        said = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("precision on")]
        assert said == [device.precision_summary(CPU)]
        assert ("text tower bf16" in said[0]) == native
