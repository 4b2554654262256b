"""`vattention bench profile`: the trace reader keeps only the device's kernels, sorts them into kinds
and sums them per step; on the CPU the command says there is nothing to break down."""

import pytest

from jax_vattention.bench import profile
from jax_vattention.app.cli import main


def synthetic_trace():
    """A GPU process with a stream line and an XLA-ops line over the same time, and a host process."""
    metadata = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 2, "tid": 7, "name": "thread_name", "args": {"name": "Stream #7(Compute)"}},
        {"ph": "M", "pid": 2, "tid": 9, "name": "thread_name", "args": {"name": "XLA Ops"}},
    ]
    kernels = [("sm90_xmma_gemm_bf16bf16", 0, 300), ("nvjet_hsh_64x8_splitK", 300, 100),
               ("decode_attention_kernel", 400, 80), ("loop_add_fusion", 480, 20),
               ("cub::DeviceRadixSortOnesweepKernel", 500, 40), ("MemcpyDtoD", 540, 10)]
    events = [{"ph": "X", "pid": 2, "tid": 7, "ts": ts, "dur": dur, "name": name} for name, ts, dur in kernels]
    events += [{"ph": "X", "pid": 2, "tid": 9, "ts": 0, "dur": 550, "name": "dot.1"},
               {"ph": "X", "pid": 1, "tid": 3, "ts": 0, "dur": 900, "name": "$python step"}]
    return {"traceEvents": metadata + events}


def test_only_the_device_streams_kernels_are_read():
    kernels = profile.device_kernels(synthetic_trace())
    assert [name for name, _, _ in kernels] == ["sm90_xmma_gemm_bf16bf16", "nvjet_hsh_64x8_splitK",
                                                "decode_attention_kernel", "loop_add_fusion",
                                                "cub::DeviceRadixSortOnesweepKernel", "MemcpyDtoD"]


def test_kernels_are_summed_per_step_by_kind_and_the_rest_is_idle():
    kernels = profile.device_kernels(synthetic_trace())
    by_kind, idle, top = profile.breakdown(kernels, steps=2, wall_seconds=0.002)   # 1 ms a step
    assert by_kind == pytest.approx({"matmul": 0.2, "attention": 0.04, "sampling": 0.02, "copy": 0.005,
                                     "other": 0.01})
    assert idle == pytest.approx(1.0 - 0.275)
    assert top[0][:2] == ("sm90_xmma_gemm_bf16bf16", "matmul") and abs(top[0][2] - 0.15) < 1e-12
    assert top[0][3] == 0.5


def test_the_command_runs_on_the_cpu_and_says_there_is_nothing_to_break_down(tmp_path, capsys):
    assert main(["bench", "profile", "--batch", "2", "--context", "32", "--steps", "2",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "vattention bench profile on cpu" in out and "nothing to break down" in out
