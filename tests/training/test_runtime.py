"""How a run computes: precision=auto follows the hardware's native bf16, and an explicit bf16 without it warns."""
import pytest
import torch

from rmcore.training import runtime
from rmcore.training.runtime import resolve_precision


@pytest.mark.parametrize("amx,avx512_bf16,expected", [(False, False, "fp32"), (True, False, "bf16"),
                                                      (False, True, "bf16")])
def test_precision_auto_follows_native_bf16(monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    precision, why = resolve_precision("auto", torch.device("cpu"))
    assert precision == expected and f"-> {expected}" in why
    assert resolve_precision("fp32", torch.device("cpu"))[0] == "fp32"


def test_explicit_bf16_without_native_bf16_runs_with_a_measured_warning(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(runtime, "bf16_slowdown", lambda: 123.0)
    with pytest.warns(UserWarning, match=r"bf16 matmul measured here is 123x slower than fp32"):
        assert resolve_precision("bf16", torch.device("cpu"))[0] == "bf16"
