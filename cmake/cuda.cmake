# CUDA backend switch. AUTO: on when nvcc is found. Where it is on it must compile; GPU tests
# print "skipped: no GPU" where the machine has none.
set(BLIP2_HAVE_CUDA OFF)
if(BLIP2_CUDA STREQUAL "AUTO" OR BLIP2_CUDA STREQUAL "ON")
  include(CheckLanguage)
  if(NOT CMAKE_CUDA_COMPILER)
    find_program(BLIP2_NVCC nvcc PATHS /usr/local/cuda/bin)
    if(BLIP2_NVCC)
      set(CMAKE_CUDA_COMPILER ${BLIP2_NVCC})
    endif()
  endif()
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(BLIP2_HAVE_CUDA ON)
  elseif(BLIP2_CUDA STREQUAL "ON")
    message(FATAL_ERROR "BLIP2_CUDA=ON but no CUDA compiler (nvcc) was found")
  endif()
endif()

if(BLIP2_HAVE_CUDA)
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES 90) # H100 / H200
  endif()
  # One CUDA runtime in the process: the shared one cuBLAS uses (CMake's default would add
  # cudart_static to every CUDA-linked target next to the libcudart.so that cuBLAS brings).
  set(CMAKE_CUDA_RUNTIME_LIBRARY Shared)
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)
  # The CUDA backend: device discovery, the per-thread context, the ops and the blip2_cuda_ops table.
  # PUBLIC BLIP2_HAVE_CUDA=1 lets C code that links it (tests, runtime) register the backend.
  add_library(blip2_cuda STATIC kernels/cuda/device.cu kernels/cuda/context.cu kernels/cuda/ops.cu
    kernels/cuda/gemv.cu kernels/cuda/attention_paged.cu
    kernels/cuda/attention_mma.cu kernels/cuda/attention_fa.cu kernels/cuda/graph.cu)
  set_target_properties(blip2_cuda PROPERTIES
    CUDA_STANDARD 17 CUDA_STANDARD_REQUIRED ON CUDA_EXTENSIONS OFF
    POSITION_INDEPENDENT_CODE ON)
  target_compile_options(blip2_cuda PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall>)
  target_link_libraries(blip2_cuda PUBLIC CUDA::cudart CUDA::cublasLt CUDA::cublas)
  target_compile_definitions(blip2_cuda PUBLIC BLIP2_HAVE_CUDA=1)
  message(STATUS "blip2: CUDA backend ON (${CMAKE_CUDA_COMPILER})")
else()
  message(STATUS "blip2: CUDA backend OFF")
endif()
