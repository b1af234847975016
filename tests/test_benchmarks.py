"""The benchmark helpers that turn tool output into the figures docs/benchmarks.md quotes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

COMMON = Path(__file__).resolve().parents[1] / "benchmarks" / "common.py"


@pytest.fixture(scope="module")
def common():
    spec = importlib.util.spec_from_file_location("bench_common", COMMON)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_common"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules["bench_common"]


# Lines as PyTorch 2.13 (oneDNN v3, "v1" format) and an older oneDNN print them.
LOG = """\
onednn_verbose,v1,info,oneDNN v3.9.1 (commit 1234)
onednn_verbose,v1,primitive,exec,cpu,convolution,brg_conv_fwd:avx512_core_bf16,forward_training,\
src:bf16::blocked:acdb::f0 wei:bf16:a:blocked:AcdB64a2b::f0,attr-scratchpad:user,alg:convolution_direct,\
mb32_ic64oc128_ih37oh37kh3sh1dh0ph1_iw37ow37kw3sw1dw0pw1,14.5
onednn_verbose,v1,primitive,exec,cpu,convolution,jit_bf16:avx512_core_bf16,backward_weights,\
src:bf16::blocked:acdb::f0,attr-scratchpad:user,alg:convolution_direct,mb32_ic3oc16_ih300oh300kh3,12.25
onednn_verbose,exec,cpu,pooling,jit:avx512_core_bf16,forward_training,src_bf16::blocked:acdb:f0,,\
alg:pooling_max,mb32ic16_ih300oh150kh2sh2,6.0
onednn_verbose,v1,primitive,exec,cpu,convolution,brg_conv_fwd:avx512_core_bf16,forward_training,x,y,z,0.5
onednn_verbose,v1,primitive,create:cache_miss,cpu,convolution,brg_conv_fwd,forward_training,x,y,z,99
onednn_verbose,v1,primitive,exec,cpu,reorder,jit:uni,undef,src:bf16 dst:bf16,,,128x64x3x3,not-a-number
BENCH-RESULT {"seconds": [1.0]}
some other output
"""


def test_onednn_times_sums_execution_time_by_kind_and_propagation(common):
    times = common.onednn_times(LOG)
    assert times == {"convolution/forward_training": 15.0, "convolution/backward_weights": 12.25,
                     "pooling/forward_training": 6.0}


def test_onednn_times_of_output_without_verbose_lines_is_empty(common):
    assert common.onednn_times("BENCH-RESULT {}\nhello\n") == {}
