#include "host_memory.h"

#include <cstdlib>
#include <string>
#include <utility>

#include "cuda_util.h"
#include "errors.h"

namespace nvclip {

HostBuffer::HostBuffer(size_t bytes, HostMemoryKind kind) : kind_(kind) {
  const size_t rounded = align_up(bytes == 0 ? 1 : bytes, kBufferAlignment);
  if (kind == HostMemoryKind::kPinned) {
#if NVCLIP_WITH_CUDA
    void* p = nullptr;
    // Portable: pinned for every device's context, not only the one current here (cuda:N engines).
    NVCLIP_CUDA_CHECK(cudaHostAlloc(&p, rounded, cudaHostAllocPortable));
    data_ = static_cast<uint8_t*>(p);
#else
    throw EngineError("pinned host memory needs a CUDA build of nvclip_fast");
#endif
  } else {
    // aligned_alloc needs the size to be a multiple of the alignment: `rounded` is.
    data_ = static_cast<uint8_t*>(std::aligned_alloc(kBufferAlignment, rounded));
    if (data_ == nullptr) {
      throw EngineError("aligned_alloc(" + std::to_string(kBufferAlignment) + ", " +
                        std::to_string(rounded) + ") failed: out of host memory");
    }
  }
  size_ = bytes;
}

HostBuffer::~HostBuffer() { release(); }

HostBuffer::HostBuffer(HostBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)),
      kind_(other.kind_) {}

HostBuffer& HostBuffer::operator=(HostBuffer&& other) noexcept {
  if (this != &other) {
    release();
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
    kind_ = other.kind_;
  }
  return *this;
}

void HostBuffer::release() noexcept {
  if (data_ == nullptr) return;
#if NVCLIP_WITH_CUDA
  if (kind_ == HostMemoryKind::kPinned) {
    cudaFreeHost(data_);  // a destructor cannot report; the block was valid, so this succeeds
  } else {
    std::free(data_);
  }
#else
  std::free(data_);
#endif
  data_ = nullptr;
  size_ = 0;
}

#if NVCLIP_WITH_CUDA

DeviceBuffer::DeviceBuffer(size_t bytes) {
  void* p = nullptr;
  const size_t rounded = align_up(bytes == 0 ? 1 : bytes, kBufferAlignment);
  NVCLIP_CUDA_CHECK(cudaMalloc(&p, rounded));
  data_ = static_cast<uint8_t*>(p);
  size_ = bytes;
}

DeviceBuffer::~DeviceBuffer() { release(); }

DeviceBuffer::DeviceBuffer(DeviceBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
  if (this != &other) {
    release();
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

void DeviceBuffer::release() noexcept {
  if (data_ != nullptr) cudaFree(data_);
  data_ = nullptr;
  size_ = 0;
}

#endif

}  // namespace nvclip
