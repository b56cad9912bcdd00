"""bench/profile_torch.py: a step's kernels grouped by kind, ours beside PyTorch's (here PyTorch's CPU operators)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import profile_torch  # noqa: E402


@pytest.mark.parametrize("label, group", [
    ("matmul:matmul_tiled [B_T]", "matrix products"),
    ("matmul:matmul_split_sum [ACCUMULATE]", "matrix products"),
    ("attention:attention_backward_dkv", "attention"),
    ("layernorm:layernorm_param_grads_deferred", "layernorm"),
    ("crossentropy:loss_mean", "cross-entropy"),
    ("embedding:sort_start", "embedding"),
    ("adamw:grad_norm_partial", "optimizer"),
    ("metrics:record_step", "optimizer"),
    ("elementwise:fill", "elementwise"),
    ("layernorm_subgroups:layernorm_backward_sg", "layernorm"),
    ("crossentropy_subgroups:crossentropy_forward_backward_sg", "cross-entropy"),
])
def test_our_kernels_are_grouped_by_their_shader(label, group):
    assert profile_torch.our_group(label, {"A_T": False}) == group


def test_our_batched_products_are_the_attention_backward():
    # ops/attention.py's backward "products" runs on matmul.wgsl's batched products, the only ones with CAUSAL
    assert profile_torch.our_group("matmul:matmul_tiled [A_T]", {"A_T": True, "CAUSAL": 0}) == "attention"
    assert profile_torch.our_group("matmul:matmul_tiled [A_T]", {"A_T": True}) == "matrix products"


@pytest.mark.parametrize("name, group", [
    ("sm90_xmma_gemm_f32f32_f32f32_f32_nn_n_tilesize128x128x8_stage3_warpsize2x2x1_ffma_aligna4_alignc4_execute_kernel",
     "matrix products"),
    ("void cutlass::Kernel2<cutlass_80_simt_sgemm_128x128_8x4_tn_align1>(cutlass_80_simt_sgemm_128x128_8x4_tn_align1"
     "::Params)", "matrix products"),
    ("void splitKreduce_kernel<32, 16, int, float, float, float, float, true, false, false>(cublasSplitKParams<float>, "
     "float const*, float const*, float*, float const*, float const*, float const*, float const*, float*, void*, "
     "long, float*, int*)", "matrix products"),
    ("fmha_cutlassF_f32_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<float, cutlass::arch::Sm80, "
     "true, 64, 64, 64, true, true>::Params)", "attention"),
    ("fmha_cutlassB_f32_aligned_64x64_k64_sm80(PyTorchMemEffAttention::AttentionBackwardKernel<cutlass::arch::Sm80, "
     "float, true, false, true, 64, 64, 64, false>::Params)", "attention"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float>(int, float, float const*, "
     "float const*, float const*, float*, float*, float*)", "layernorm"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, "
     "at::native::(anonymous namespace)::LogSoftMaxForwardEpilogue>(float*, float const*, int)", "cross-entropy"),
    ("void at::native::(anonymous namespace)::embedding_backward_feature_kernel<float, float, long>(long const*, "
     "float const*, float*, int, long, int, int)", "embedding"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
     "FusedAdamMathFunctor<float, 4, (at::native::ADAM_MODE)1, false>>(...)", "optimizer"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl(at::TensorIteratorBase&, "
     "at::native::GeluType)::{lambda()#2}::operator()() const::{lambda(float)#1}, at::detail::Array<char*, 2>>(int, "
     "...)", "elementwise"),
    ("aten::mm", "matrix products"),
    ("aten::native_layer_norm_backward", "layernorm"),
    ("void at::native::(anonymous namespace)::GammaBetaBackwardCUDAKernel_32x32<float, float>(long, long, float "
     "const*, float const*, float const*, float const*, float*, float*)", "layernorm"),
    ("void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<float, float>(long, float, float const*, "
     "float*, float*)", "layernorm"),
    ("void at::native::(anonymous namespace)::compute_grad_weight<float, float, long>(long const*, float const*, "
     "long const*, long, long, long const*, long const*, float*)", "embedding"),
    ("void at::native::(anonymous namespace)::krn_partials_per_segment<long>(long*, long const*, long, long)",
     "embedding"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::NormTwoOps<float, float, "
     "float>, unsigned int, float, 4, 4>>(...)", "optimizer"),
    ("nvjet_tst_256x128_64x4_2x1_v_bz_coopA_TNN", "matrix products"),
])
def test_pytorch_kernels_are_grouped_by_name(name, group):
    assert profile_torch.torch_group(name) == group


def test_it_profiles_both_trainers_side_by_side():
    pytest.importorskip("torch")
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "profile_torch.py"), "--preset", "tiny", "--quick"],
                       capture_output=True, text=True, timeout=600)
    if "no timestamp-query" in r.stderr:
        pytest.skip("this adapter has no timestamp-query")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line for line in r.stdout.splitlines() if line.startswith("| ")}
    for group in profile_torch.GROUPS + ("all",):
        assert group in rows, r.stdout
    cells = [c.strip() for c in rows["all"].split("|")[1:-1]]
    dispatches, ours_ms, kernels, theirs_ms = int(cells[1]), float(cells[2]), float(cells[3]), float(cells[4])
    assert dispatches > 20 and ours_ms > 0 and kernels > 20 and theirs_ms > 0
    # every kind of our kernels is found in a step (the tiny preset has them all), and PyTorch's products
    for group in profile_torch.GROUPS:
        cells = [c.strip() for c in rows[group].split("|")[1:-1]]
        if group != "elementwise":
            assert int(cells[1]) > 0 and float(cells[2]) > 0, rows[group]
    products = [c.strip() for c in rows["matrix products"].split("|")[1:-1]]
    assert float(products[3]) > 0 and float(products[4]) > 0, rows["matrix products"]
    assert "CPU operators" in r.stdout or "CUDA kernels" in r.stdout


class Avg:
    def __init__(self, key, count, **times):
        self.key, self.count = key, count
        for k, v in times.items():
            setattr(self, k, v)


def test_profiled_kernels_take_each_kernels_own_time_per_step():
    evs = [Avg("sgemm_kernel", 10, self_device_time_total=2000.0), Avg("cudaLaunchKernel", 40,
           self_device_time_total=0.0), Avg("old_name_kernel", 4, self_cuda_time_total=500.0)]
    got = profile_torch.profiled_kernels(evs, cuda=True, steps=2)
    assert got == [("sgemm_kernel", 5.0, 1.0), ("old_name_kernel", 2.0, 0.25)]
    cpu = [Avg("aten::mm", 6, self_cpu_time_total=300.0), Avg("aten::linear", 6, self_cpu_time_total=50.0),
           Avg("Optimizer.step#AdamW.step", 1, self_cpu_time_total=80.0)]
    assert profile_torch.profiled_kernels(cpu, cuda=False, steps=3) == [("aten::mm", 2.0, pytest.approx(0.1))]
