// Owned memory blocks for the batch queue: host memory that is either page-locked (cudaHostAlloc,
// so that cudaMemcpyAsync is truly asynchronous and runs at full PCIe speed) or plain aligned host
// memory (CPU engines: no CUDA call at all), and device memory (cudaMalloc) in CUDA builds.
#pragma once

#include <cstddef>
#include <cstdint>

namespace nvclip {

// Alignment of every staging block and buffer: a multiple of the cache line, of AVX-512 vectors and
// of the 256-byte granularity cudaMalloc guarantees, so host and device offsets stay aligned alike.
constexpr size_t kBufferAlignment = 256;

constexpr size_t align_up(size_t value, size_t alignment) {
  return (value + alignment - 1) / alignment * alignment;
}

enum class HostMemoryKind : int32_t { kAligned = 0, kPinned = 1 };

class HostBuffer {
 public:
  HostBuffer() = default;
  // Throws EngineError naming the call (cudaHostAlloc / aligned_alloc) and the size on failure;
  // kPinned in a build without CUDA throws EngineError.
  HostBuffer(size_t bytes, HostMemoryKind kind);
  ~HostBuffer();
  HostBuffer(HostBuffer&& other) noexcept;
  HostBuffer& operator=(HostBuffer&& other) noexcept;
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;

  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  HostMemoryKind kind() const { return kind_; }

 private:
  void release() noexcept;
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
  HostMemoryKind kind_ = HostMemoryKind::kAligned;
};

#if NVCLIP_WITH_CUDA
// cudaMalloc'ed memory on the current device. Freed with cudaFree (which synchronizes the device:
// allocate once, reuse).
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes);  // throws EngineError naming cudaMalloc and the size
  ~DeviceBuffer();
  DeviceBuffer(DeviceBuffer&& other) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  void release() noexcept;
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
};
#endif

}  // namespace nvclip
