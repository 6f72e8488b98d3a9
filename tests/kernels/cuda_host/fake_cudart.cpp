// A stand-in for the CUDA runtime (libcudart) on machines without a GPU: tests/kernels/test_cuda_compile.py
// links the nvcc-built objects of csrc/*.cu against this file instead of libcudart, so that their host-side
// launchers run for real and every launch they make is checked and logged instead of executed.
//
// It implements exactly the runtime entry points those objects use (kernel registration, <<<>>> launches,
// cudaLaunchKernelExC, cudaFuncSetAttribute, cudaGetDevice, cudaDeviceGetAttribute, cudaGetLastError) and
// enforces the runtime's launch rules the way the driver does:
//  * more than 48 KiB of dynamic shared memory needs cudaFuncAttributeMaxDynamicSharedMemorySize set, for that
//    very function on that device, to at least the launch's size (else cudaErrorInvalidValue);
//  * grid x <= 2^31 - 1, grid y, z <= 65535, at most 1024 threads per block, every dimension >= 1.
// Each launch prints one line to stdout:
//   launch <kernel name> dev <d> grid <x> <y> <z> block <x> <y> <z> smem <bytes> pdl <0|1> rc <cudaError_t>
// The driver chooses the current device and the device attributes with fake_cuda_set_device / fake_cuda_set_cc.
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <utility>

namespace {

int g_device = 0;
int g_cc_major = 9;
int g_optin = 227 * 1024;
cudaError_t g_last = cudaSuccess;
std::map<const void*, std::string> g_names;                      // host stub -> kernel name
std::map<std::pair<int, const void*>, int> g_max_dyn_smem;       // (device, function) -> opt-in size

struct Config {
  dim3 grid, block;
  size_t smem;
  void* stream;
};
Config g_pushed;

cudaError_t check_and_log(const void* func, dim3 grid, dim3 block, size_t smem, bool pdl) {
  cudaError_t rc = cudaSuccess;
  const auto it = g_max_dyn_smem.find({g_device, func});
  const size_t allowed = it != g_max_dyn_smem.end() && it->second > 48 * 1024 ? it->second : 48 * 1024;
  if (smem > allowed) rc = cudaErrorInvalidValue;
  if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.x > 2147483647u || grid.y > 65535u || grid.z > 65535u) {
    rc = cudaErrorInvalidConfiguration;
  }
  if (block.x < 1 || block.y < 1 || block.z < 1 || block.x * block.y * block.z > 1024u) rc = cudaErrorInvalidConfiguration;
  const auto name = g_names.find(func);
  std::printf("launch %s dev %d grid %u %u %u block %u %u %u smem %zu pdl %d rc %d\n",
              name != g_names.end() ? name->second.c_str() : "?", g_device, grid.x, grid.y, grid.z, block.x, block.y,
              block.z, smem, pdl ? 1 : 0, static_cast<int>(rc));
  if (rc != cudaSuccess) g_last = rc;
  return rc;
}

}  // namespace

extern "C" {

void fake_cuda_set_device(int device) { g_device = device; }
void fake_cuda_set_cc(int major, int smem_optin) {
  g_cc_major = major;
  g_optin = smem_optin;
}

// -------------------------------------------------------------------- registration (static initialisers)
void** __cudaRegisterFatBinary(void*) {
  static void* handle = nullptr;
  return &handle;
}
void __cudaRegisterFatBinaryEnd(void**) {}
void __cudaUnregisterFatBinary(void**) {}
void __cudaRegisterFunction(void**, const char* hostFun, char*, const char* deviceName, int, uint3*, uint3*, dim3*,
                            dim3*, int*) {
  g_names[hostFun] = deviceName;
}

// ------------------------------------------------------------------------------------- <<<>>> launches
unsigned __cudaPushCallConfiguration(dim3 grid, dim3 block, size_t smem, void* stream) {
  g_pushed = Config{grid, block, smem, stream};
  return 0;
}
cudaError_t __cudaPopCallConfiguration(dim3* grid, dim3* block, size_t* smem, void* stream) {
  *grid = g_pushed.grid;
  *block = g_pushed.block;
  *smem = g_pushed.smem;
  std::memcpy(stream, &g_pushed.stream, sizeof(void*));
  return cudaSuccess;
}
cudaError_t __cudaGetKernel(cudaKernel_t* kernel, const void* func) {
  *kernel = reinterpret_cast<cudaKernel_t>(const_cast<void*>(func));
  return cudaSuccess;
}
cudaError_t __cudaLaunchKernel(cudaKernel_t kernel, dim3 grid, dim3 block, void**, size_t smem, cudaStream_t) {
  return check_and_log(reinterpret_cast<const void*>(kernel), grid, block, smem, false);
}

// ------------------------------------------------------------------------------------------ runtime API
cudaError_t cudaLaunchKernelExC(const cudaLaunchConfig_t* config, const void* func, void**) {
  bool pdl = false;
  for (unsigned i = 0; i < config->numAttrs; ++i) {
    if (config->attrs[i].id == cudaLaunchAttributeProgrammaticStreamSerialization) {
      pdl = config->attrs[i].val.programmaticStreamSerializationAllowed != 0;
    }
  }
  return check_and_log(func, config->gridDim, config->blockDim, config->dynamicSmemBytes, pdl);
}

cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  if (value < 0 || value > g_optin) return cudaErrorInvalidValue;
  g_max_dyn_smem[{g_device, func}] = value;
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  *device = g_device;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrComputeCapabilityMajor: *value = g_cc_major; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = g_optin; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = g_last;
  g_last = cudaSuccess;
  return e;
}

}  // extern "C"
