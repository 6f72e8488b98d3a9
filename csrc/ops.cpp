// Registers the raw-pointer CUDA launchers of csrc/*.cu as torch ops: torch.ops.hydra_kernels_C.*
//
// The namespace is `hydra_kernels_C`, not `hydra_kernels` (the Python custom ops of hydra_kernels.ops own that
// one). This file checks shapes, dtypes, devices, strides and alignment (TORCH_CHECK: the error names the
// argument), allocates outputs and workspaces with the caching allocator, and launches on the current stream.
// Fake (meta) implementations for torch.compile are registered from Python (hydra_kernels/kernels/cuda.py).
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#include "hydra_kernels.h"

namespace {

using at::Tensor;

hydra::DType dtype_of(const Tensor& t, const char* name, bool allow_fp32) {
  switch (t.scalar_type()) {
    case at::kFloat:
      TORCH_CHECK(allow_fp32, name, ": float32 is not supported by this kernel (bfloat16 or float16)");
      return hydra::DType::kFloat32;
    case at::kBFloat16:
      return hydra::DType::kBFloat16;
    case at::kHalf:
      return hydra::DType::kFloat16;
    default:
      TORCH_CHECK(false, name, ": dtype ", t.scalar_type(), " not supported (float32, bfloat16 or float16)");
  }
  return hydra::DType::kFloat32;
}

void check_on(const Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), name, ": must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == device, name, ": on ", t.device(), ", expected ", device,
              " (all inputs must share a device)");
}

void check_f32_vec(const Tensor& t, const char* name, const at::Device& device, int64_t n) {
  check_on(t, name, device);
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, ": must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, ": must be contiguous");
  TORCH_CHECK(t.numel() == n, name, ": expected ", n, " elements, got ", t.numel());
}

void check_aligned16(const Tensor& t, const char* name) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name,
              ": data pointer must be 16-byte aligned (call .clone() on an offset view)");
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "hydra_kernels_C::", what, ": CUDA error: ", cudaGetErrorString(err));
}

void check_launch_shape(int64_t threads, int64_t max_blocks) {
  TORCH_CHECK(threads >= 32 && threads <= 512 && threads % 32 == 0,
              "threads: must be a multiple of 32 in [32, 512], got ", threads);
  TORCH_CHECK(max_blocks >= 1 && max_blocks <= 2147483647, "max_blocks: must be in [1, 2^31 - 1], got ", max_blocks);
}

// logits / ref_logits: [B, T, V], last dim contiguous, any B/T strides.
void check_logits(const Tensor& t, const char* name, const at::Device& device) {
  check_on(t, name, device);
  TORCH_CHECK(t.dim() == 3, name, ": expected [B, T, V], got ", t.sizes());
  TORCH_CHECK(t.size(2) == 1 || t.stride(2) == 1, name, ": the vocabulary dimension must be contiguous (stride 1)");
  TORCH_CHECK(t.size(2) > 0, name, ": empty vocabulary");
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> logprobs_fwd(
    const Tensor& logits, const std::optional<Tensor>& ref_logits, const Tensor& targets, double temperature,
    int64_t kl_mode, int64_t ignore_index, int64_t threads, int64_t max_blocks) {
  const at::Device device = logits.device();
  check_logits(logits, "logits", device);
  const hydra::DType dt = dtype_of(logits, "logits", true);
  TORCH_CHECK(kl_mode >= hydra::kKlNone && kl_mode <= hydra::kKlFull, "kl_mode: must be in [0, 4], got ", kl_mode);
  TORCH_CHECK((kl_mode == hydra::kKlNone) == !ref_logits.has_value(),
              "ref_logits: given exactly when kl_mode != 0 (kl='none' goes with ref_logits=None)");
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, "temperature: must be finite and > 0, got ",
              temperature);
  check_launch_shape(threads, max_blocks);
  const int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2), N = B * T;
  if (ref_logits.has_value()) {
    const Tensor& r = *ref_logits;
    check_logits(r, "ref_logits", device);
    TORCH_CHECK(r.sizes() == logits.sizes(), "ref_logits: shape ", r.sizes(), " differs from logits' ", logits.sizes());
    TORCH_CHECK(r.scalar_type() == logits.scalar_type(), "ref_logits: dtype ", r.scalar_type(),
                " differs from logits' ", logits.scalar_type());
  }
  check_on(targets, "targets", device);
  TORCH_CHECK(targets.scalar_type() == at::kLong, "targets: must be int64, got ", targets.scalar_type());
  TORCH_CHECK(targets.is_contiguous() && targets.numel() == N, "targets: must be contiguous with B*T = ", N,
              " elements");

  c10::cuda::CUDAGuard guard(device);
  const auto f32 = logits.options().dtype(at::kFloat);
  const int64_t n_ref = ref_logits.has_value() ? N : 0;
  Tensor logp = at::empty({N}, f32), ref_logp = at::empty({n_ref}, f32), kl = at::empty({n_ref}, f32);
  Tensor entropy = at::empty({n_ref}, f32), stats = at::empty({N, 4}, f32);

  hydra::LogprobsFwdArgs a{};
  a.dtype = dt;
  a.logits = logits.data_ptr();
  a.ref_logits = ref_logits.has_value() ? ref_logits->data_ptr() : nullptr;
  a.targets = targets.data_ptr<int64_t>();
  a.B = B;
  a.T = T;
  a.V = V;
  a.sx_b = logits.stride(0);
  a.sx_t = logits.stride(1);
  a.sr_b = ref_logits.has_value() ? ref_logits->stride(0) : 0;
  a.sr_t = ref_logits.has_value() ? ref_logits->stride(1) : 0;
  a.inv_temperature = static_cast<float>(1.0 / temperature);
  a.kl_mode = static_cast<int>(kl_mode);
  a.ignore_index = ignore_index;
  a.logp = logp.data_ptr<float>();
  a.ref_logp = n_ref ? ref_logp.data_ptr<float>() : nullptr;
  a.kl = n_ref ? kl.data_ptr<float>() : nullptr;
  a.entropy = n_ref ? entropy.data_ptr<float>() : nullptr;
  a.stats = stats.data_ptr<float>();
  a.threads = static_cast<int>(threads);
  a.max_blocks = static_cast<int>(max_blocks);
  check_launch(hydra::logprobs_forward(a, c10::cuda::getCurrentCUDAStream(device.index()).stream()), "logprobs_fwd");
  return {logp, ref_logp, kl, entropy, stats};
}

Tensor logprobs_bwd(const std::optional<Tensor>& grad_logp, const std::optional<Tensor>& grad_kl,
                    const std::optional<Tensor>& grad_entropy, const Tensor& logits,
                    const std::optional<Tensor>& ref_logits, const Tensor& targets, const Tensor& logp,
                    const Tensor& ref_logp, const Tensor& kl, const Tensor& entropy, const Tensor& stats,
                    double temperature, int64_t kl_mode, int64_t ignore_index, int64_t threads, int64_t max_blocks) {
  const at::Device device = logits.device();
  check_logits(logits, "logits", device);
  const hydra::DType dt = dtype_of(logits, "logits", true);
  TORCH_CHECK(kl_mode >= hydra::kKlNone && kl_mode <= hydra::kKlFull, "kl_mode: must be in [0, 4], got ", kl_mode);
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, "temperature: must be finite and > 0, got ",
              temperature);
  check_launch_shape(threads, max_blocks);
  const int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2), N = B * T;
  // Without a reference only log-probs exist: nothing else can carry a gradient (as in the Triton launcher).
  const bool has_gkl = grad_kl.has_value() && kl_mode != hydra::kKlNone;
  const bool has_gent = grad_entropy.has_value() && kl_mode != hydra::kKlNone;
  const bool need_ref = has_gkl && kl_mode == hydra::kKlFull;
  check_on(targets, "targets", device);
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.is_contiguous() && targets.numel() == N,
              "targets: must be contiguous int64 with B*T = ", N, " elements");
  check_on(stats, "stats", device);
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.is_contiguous() && stats.dim() == 2 && stats.size(0) == N &&
                  stats.size(1) == 4,
              "stats: expected contiguous float32 [", N, ", 4] (what the forward returned)");
  check_aligned16(stats, "stats");
  if (grad_logp.has_value()) check_f32_vec(*grad_logp, "grad_logp", device, N);
  if (has_gkl) {
    check_f32_vec(*grad_kl, "grad_kl", device, N);
    if (need_ref) {
      check_f32_vec(kl, "kl", device, N);
    } else {
      check_f32_vec(logp, "logp", device, N);
      check_f32_vec(ref_logp, "ref_logp", device, N);
    }
  }
  if (has_gent) {
    check_f32_vec(*grad_entropy, "grad_entropy", device, N);
    check_f32_vec(entropy, "entropy", device, N);
  }
  if (need_ref) {
    TORCH_CHECK(ref_logits.has_value(), "ref_logits: needed by the backward of kl='full'");
    check_logits(*ref_logits, "ref_logits", device);
    TORCH_CHECK(ref_logits->sizes() == logits.sizes() && ref_logits->scalar_type() == logits.scalar_type(),
                "ref_logits: must match logits' shape and dtype");
  }

  c10::cuda::CUDAGuard guard(device);
  Tensor dlogits = at::empty({B, T, V}, logits.options());
  hydra::LogprobsBwdArgs a{};
  a.dtype = dt;
  a.logits = logits.data_ptr();
  a.ref_logits = need_ref ? ref_logits->data_ptr() : nullptr;
  a.targets = targets.data_ptr<int64_t>();
  a.B = B;
  a.T = T;
  a.V = V;
  a.sx_b = logits.stride(0);
  a.sx_t = logits.stride(1);
  a.sr_b = need_ref ? ref_logits->stride(0) : 0;
  a.sr_t = need_ref ? ref_logits->stride(1) : 0;
  a.inv_temperature = static_cast<float>(1.0 / temperature);
  a.kl_mode = static_cast<int>(kl_mode);
  a.ignore_index = ignore_index;
  a.grad_logp = grad_logp.has_value() ? grad_logp->data_ptr<float>() : nullptr;
  a.grad_kl = has_gkl ? grad_kl->data_ptr<float>() : nullptr;
  a.grad_entropy = has_gent ? grad_entropy->data_ptr<float>() : nullptr;
  a.logp = (has_gkl && !need_ref) ? logp.data_ptr<float>() : nullptr;
  a.ref_logp = (has_gkl && !need_ref) ? ref_logp.data_ptr<float>() : nullptr;
  a.kl = need_ref ? kl.data_ptr<float>() : nullptr;
  a.entropy = has_gent ? entropy.data_ptr<float>() : nullptr;
  a.stats = stats.data_ptr<float>();
  a.dlogits = dlogits.data_ptr();
  a.threads = static_cast<int>(threads);
  a.max_blocks = static_cast<int>(max_blocks);
  check_launch(hydra::logprobs_backward(a, c10::cuda::getCurrentCUDAStream(device.index()).stream()),
               "logprobs_bwd");
  return dlogits;
}

std::tuple<Tensor, Tensor> lora_small_fwd(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                          const Tensor& lora_A, const Tensor& lora_B, c10::ArrayRef<double> scaling,
                                          c10::ArrayRef<int64_t> stream_adapters, int64_t block_m_warps,
                                          int64_t splits) {
  const at::Device device = x.device();
  check_on(x, "x", device);
  const hydra::DType dt = dtype_of(x, "x", false);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x: expected a contiguous [rows, K] tensor, got ", x.sizes());
  const int64_t R = x.size(0), K = x.size(1);
  check_on(weight, "weight", device);
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight: dtype ", weight.scalar_type(), " differs from x's ",
              x.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == K && weight.is_contiguous(),
              "weight: expected a contiguous [N, ", K, "] tensor, got ", weight.sizes());
  const int64_t N = weight.size(0);
  if (bias.has_value()) {
    check_on(*bias, "bias", device);
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->dim() == 1 && bias->size(0) == N &&
                    bias->is_contiguous(),
                "bias: expected a contiguous [", N, "] tensor of x's dtype");
  }
  check_on(lora_A, "lora_A", device);
  check_on(lora_B, "lora_B", device);
  TORCH_CHECK(lora_A.dim() == 3 && lora_A.size(2) == K && lora_A.is_contiguous() &&
                  lora_A.scalar_type() == x.scalar_type(),
              "lora_A: expected a contiguous [n, r, ", K, "] tensor of x's dtype, got ", lora_A.sizes());
  const int64_t n = lora_A.size(0), r = lora_A.size(1);
  TORCH_CHECK(lora_B.dim() == 3 && lora_B.size(0) == n && lora_B.size(1) == N && lora_B.size(2) == r &&
                  lora_B.is_contiguous() && lora_B.scalar_type() == x.scalar_type(),
              "lora_B: expected a contiguous [", n, ", ", N, ", ", r, "] tensor of x's dtype, got ", lora_B.sizes());
  TORCH_CHECK(static_cast<int64_t>(scaling.size()) == n, "scaling: expected one value per adapter (", n, "), got ",
              scaling.size());
  const int64_t S = static_cast<int64_t>(stream_adapters.size());
  TORCH_CHECK(S >= 1 && S <= hydra::kLoraMaxStreams, "stream_adapters: 1 to ", hydra::kLoraMaxStreams,
              " streams supported, got ", S);
  TORCH_CHECK(R % S == 0, "stream_adapters: ", R, " rows do not split into ", S, " equal streams");
  TORCH_CHECK(R <= hydra::kLoraMaxRows, "x: at most ", hydra::kLoraMaxRows, " rows (all streams) supported, got ", R);
  TORCH_CHECK(K > 0 && K % 8 == 0, "x: in_features must be a positive multiple of 8, got ", K);
  TORCH_CHECK(N <= 2147483647 && K <= 2147483647, "weight: dimensions must fit in int32");
  TORCH_CHECK(block_m_warps == 1 || block_m_warps == 2, "block_m_warps: must be 1 or 2, got ", block_m_warps);
  TORCH_CHECK(splits >= 1 && splits <= 1024, "splits: must be in [1, 1024], got ", splits);
  bool any_adapter = false;
  int n_used = 0;
  int64_t used[hydra::kLoraMaxStreams];
  for (int64_t s = 0; s < S; ++s) {
    const int64_t ad = stream_adapters[s];
    TORCH_CHECK(ad >= -1 && ad < n, "stream_adapters: adapter index ", ad, " out of range for ", n,
                " adapters (-1 = base)");
    if (ad < 0) continue;
    any_adapter = true;
    bool seen = false;
    for (int u = 0; u < n_used; ++u) seen = seen || used[u] == ad;
    if (!seen) used[n_used++] = ad;
  }
  if (any_adapter) {
    TORCH_CHECK(r >= 1 && r <= hydra::kLoraMaxRank, "lora_A: rank must be in [1, ", hydra::kLoraMaxRank, "], got ", r);
    check_aligned16(lora_A, "lora_A");
    if (r % 8 == 0) check_aligned16(lora_B, "lora_B");
  }
  check_aligned16(x, "x");
  check_aligned16(weight, "weight");

  c10::cuda::CUDAGuard guard(device);
  const int rank = any_adapter ? static_cast<int>(r) : 0;
  const size_t smem = hydra::lora_small_smem_bytes(static_cast<int>(R), rank, n_used, static_cast<int>(block_m_warps));
  int optin = 0;
  check_launch(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device.index()),
               "lora_small_fwd");
  // + 1 KiB: the kernel's static shared memory also counts against the opt-in limit.
  TORCH_CHECK(smem + 1024 <= static_cast<size_t>(optin), "lora_small_fwd: needs ", smem + 1024,
              " bytes of shared memory per block, the device allows ", optin,
              " (fewer adapters per call, a lower rank or block_m_warps=1)");

  Tensor y = at::empty({R, N}, x.options());
  Tensor xa = at::empty({R, r}, x.options().dtype(at::kFloat));
  if (R == 0 || N == 0) return {y, xa};
  Tensor ws, counters;
  if (splits > 1) {
    const size_t nws = hydra::lora_small_workspace_floats(static_cast<int>(N), static_cast<int>(R),
                                                          static_cast<int>(block_m_warps), static_cast<int>(splits));
    ws = at::empty({static_cast<int64_t>(nws)}, x.options().dtype(at::kFloat));
    counters = at::empty({hydra::lora_small_num_tiles(static_cast<int>(N), static_cast<int>(block_m_warps))},
                         x.options().dtype(at::kInt));
  }
  hydra::LoraSmallArgs a{};
  a.dtype = dt;
  a.x = x.data_ptr();
  a.weight = weight.data_ptr();
  a.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  a.lora_A = any_adapter ? lora_A.data_ptr() : nullptr;
  a.lora_B = any_adapter ? lora_B.data_ptr() : nullptr;
  a.y = y.data_ptr();
  a.xa = xa.data_ptr<float>();
  a.workspace = splits > 1 ? ws.data_ptr<float>() : nullptr;
  a.counters = splits > 1 ? counters.data_ptr<int>() : nullptr;
  a.R = static_cast<int>(R);
  a.N = static_cast<int>(N);
  a.K = static_cast<int>(K);
  a.rank = rank;
  a.n_streams = static_cast<int>(S);
  for (int64_t s = 0; s < S; ++s) {
    a.stream_adapter[s] = static_cast<int>(stream_adapters[s]);
    a.stream_scale[s] = stream_adapters[s] >= 0 ? static_cast<float>(scaling[stream_adapters[s]]) : 0.f;
  }
  a.block_m_warps = static_cast<int>(block_m_warps);
  a.splits = static_cast<int>(splits);
  check_launch(hydra::lora_small_forward(a, c10::cuda::getCurrentCUDAStream(device.index()).stream()),
               "lora_small_fwd");
  return {y, xa};
}

}  // namespace

TORCH_LIBRARY(hydra_kernels_C, m) {
  m.def(
      "logprobs_fwd(Tensor logits, Tensor? ref_logits, Tensor targets, float temperature, int kl_mode, "
      "int ignore_index, int threads, int max_blocks) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "logprobs_bwd(Tensor? grad_logp, Tensor? grad_kl, Tensor? grad_entropy, Tensor logits, Tensor? ref_logits, "
      "Tensor targets, Tensor logp, Tensor ref_logp, Tensor kl, Tensor entropy, Tensor stats, float temperature, "
      "int kl_mode, int ignore_index, int threads, int max_blocks) -> Tensor");
  m.def(
      "lora_small_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float[] scaling, "
      "int[] stream_adapters, int block_m_warps, int splits) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(hydra_kernels_C, CUDA, m) {
  m.impl("logprobs_fwd", &logprobs_fwd);
  m.impl("logprobs_bwd", &logprobs_bwd);
  m.impl("lora_small_fwd", &lora_small_fwd);
}

// A Python module entry point so that `import hydra_kernels._C` (setup.py build) and the JIT loader both work;
// the ops themselves are registered by the static initialisers above when the library is loaded.
#ifdef TORCH_EXTENSION_NAME
#define HK_CONCAT_(a, b) a##b
#define HK_CONCAT(a, b) HK_CONCAT_(a, b)
#define HK_STR_(a) #a
#define HK_STR(a) HK_STR_(a)
PyMODINIT_FUNC HK_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, HK_STR(TORCH_EXTENSION_NAME),
                                          "hydra_kernels CUDA kernels, registered as torch.ops.hydra_kernels_C.*", -1,
                                          nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
#endif
