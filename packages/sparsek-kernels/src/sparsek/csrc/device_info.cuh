// Per-device facts cached for the host launchers: SM count, compute capability, and whether a kernel's dynamic
// shared memory limit has been raised. All are per device because one process may drive several GPUs (the current
// CUDA device at launch time is the tensors' device; the Python layer makes sure of that).
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

namespace sparsek_device {

constexpr int kCachedDevices = 64;  // devices with an index beyond this are queried on every call

inline int current() {
  int dev = 0;
  cudaGetDevice(&dev);
  return dev;
}

inline int query_attribute(cudaDeviceAttr attr, int dev) {
  int v = 0;
  cudaDeviceGetAttribute(&v, attr, dev);
  return v;
}

// `read(dev)` of the current device, read once per device and kept in `cache` (0 = not read yet, so `read` must
// return a non-zero value).
template <class Read>
inline int cached_per_device(std::atomic<int> (&cache)[kCachedDevices], Read read) {
  const int dev = current();
  const bool cacheable = dev >= 0 && dev < kCachedDevices;
  int v = cacheable ? cache[dev].load(std::memory_order_relaxed) : 0;
  if (v == 0) {
    v = read(dev);
    if (cacheable) cache[dev].store(v, std::memory_order_relaxed);
  }
  return v;
}

// Number of SMs of the current device (at least 1).
inline int num_sms() {
  static std::atomic<int> cache[kCachedDevices] = {};
  return cached_per_device(cache, [](int dev) {
    const int n = query_attribute(cudaDevAttrMultiProcessorCount, dev);
    return n > 0 ? n : 1;
  });
}

// Compute capability major version of the current device (0 when it cannot be read).
inline int major() {
  static std::atomic<int> cache[kCachedDevices] = {};  // stores major + 1
  const int stored = cached_per_device(cache, [](int dev) {
    return query_attribute(cudaDevAttrComputeCapabilityMajor, dev) + 1;
  });
  return stored - 1;
}

// Largest shared memory (static + dynamic, bytes) one CTA may opt in to on the current device.
inline int max_smem_optin() {
  static std::atomic<int> cache[kCachedDevices] = {};
  return cached_per_device(cache, [](int dev) {
    const int n = query_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    return n > 0 ? n : 48 * 1024;
  });
}

// Raises `kernel`'s dynamic shared memory limit to `bytes` on the current device, once per device (the attribute
// belongs to each device's context). `done` is the caller's per-kernel record of devices already set.
inline cudaError_t allow_dynamic_smem(std::atomic<uint64_t>& done, const void* kernel, int bytes) {
  const int dev = current();
  const uint64_t bit = dev >= 0 && dev < kCachedDevices ? uint64_t(1) << dev : 0;
  if (bit && (done.load(std::memory_order_acquire) & bit)) return cudaSuccess;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess && bit) done.fetch_or(bit, std::memory_order_release);
  return err;
}

}  // namespace sparsek_device
