"""Precision capability checks: bf16 refused before anything starts where the hardware only emulates it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pretrain import hardware
from pretrain.compose import ConfigError, load_config

AVX2_ONLY = frozenset({"fpu", "sse2", "avx", "avx2", "fma", "avx512f"})  # e.g. AMD EPYC family 25 model 1


def host_has_native_bf16() -> bool:
    """Independently of pretrain.hardware: the x86/Arm bf16 feature names in /proc/cpuinfo."""
    text = Path("/proc/cpuinfo").read_text()
    words = {w for line in text.splitlines() if line.lower().startswith(("flags", "features")) for w in line.split()}
    return bool(words & {"avx512_bf16", "amx_bf16", "bf16"})


@pytest.mark.parametrize(
    ("flags", "native"),
    [
        (AVX2_ONLY, False),
        (AVX2_ONLY | {"avx512_bf16"}, True),  # Cooper Lake, Zen 4 (EPYC family 25 model 17)
        (AVX2_ONLY | {"amx_bf16", "amx_tile"}, True),  # Sapphire Rapids
        (frozenset({"fp", "asimd", "sve", "bf16"}), True),  # Armv8.6+ (Graviton 3)
        (frozenset({"fp", "asimd"}), False),  # Graviton 2
    ],
)
def test_bf16_is_native_only_with_the_cpu_feature(flags: frozenset[str], native: bool) -> None:
    assert hardware.cpu_flags_have_bf16(flags) is native


def test_this_host_is_judged_by_its_own_flags() -> None:
    """Passes on every host of this machine kind: the expectation comes from /proc/cpuinfo."""
    if host_has_native_bf16():
        assert load_config(["deepspeed.precision=bf16"]).deepspeed.precision == "bf16"
        assert hardware.device_precision_problem("bf16", torch.device("cpu")) == ""
    else:
        with pytest.raises(ConfigError, match=r"^deepspeed.precision: bf16 is not native on this CPU"):
            load_config(["deepspeed.precision=bf16"])
        assert hardware.device_precision_problem("bf16", torch.device("cpu")).startswith("bf16 is not native")
    assert load_config(["deepspeed.precision=bf16", "deepspeed.force_precision=true"]).deepspeed.force_precision
    assert hardware.device_precision_problem("fp32", torch.device("cpu")) == ""


def test_without_native_bf16_the_config_names_what_works(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "cpu_flags", lambda: AVX2_ONLY)
    with pytest.raises(ConfigError) as err:
        load_config(["deepspeed.precision=bf16", "trainer.batch_size=0"])
    problems = dict(err.value.problems)
    assert problems["trainer.batch_size"] == "must be >= 1, got 0"  # reported with it, not instead
    assert problems["deepspeed.precision"].startswith("bf16 is not native on this CPU")
    assert "use deepspeed.precision=fp32, or deepspeed.force_precision=true" in problems["deepspeed.precision"]
    assert "\n" not in problems["deepspeed.precision"]
    # Forced, or on GPU workers (each checks its own device when it builds the engine): accepted.
    assert load_config(["deepspeed.precision=bf16", "deepspeed.force_precision=true"])
    assert load_config(["deepspeed.precision=bf16", "trainer.use_gpu=true"])
    assert load_config(["deepspeed.precision=fp32"])
    # Unreadable flags (not Linux): not refused.
    monkeypatch.setattr(hardware, "cpu_flags", lambda: None)
    assert hardware.cpu_bf16_problem() == ""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_gpu_is_judged_by_its_compute_capability() -> None:
    device = torch.device("cuda", 0)
    major, _ = torch.cuda.get_device_capability(device)
    assert (hardware.device_precision_problem("bf16", device) == "") is (major >= 8)
