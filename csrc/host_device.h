// LOCALSGD_HOST_DEVICE: `__host__ __device__` when nvcc compiles the including file, nothing otherwise,
// so that plain C++ headers can hold code the CPU side, the kernels and the host-run kernel tests share.
#pragma once

#if defined(__CUDACC__)
#define LOCALSGD_HOST_DEVICE __host__ __device__
#else
#define LOCALSGD_HOST_DEVICE
#endif
