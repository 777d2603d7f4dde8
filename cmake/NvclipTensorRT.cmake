# TensorRT: only the headers are needed at build time; libnvinfer is dlopen'ed at run time, so one
# wheel serves machines with and without TensorRT. Headers are searched under TensorRT_ROOT.
set(NVCLIP_WITH_TENSORRT OFF)
set(NVCLIP_TENSORRT_VERSION "")
set(NVCLIP_TENSORRT_MAJOR 0)  # 0: no headers (the library loader still builds, with every supported major)
if(NOT NVCLIP_TENSORRT STREQUAL "OFF")
  if(NOT NVCLIP_WITH_CUDA)
    if(NVCLIP_TENSORRT STREQUAL "ON")
      message(FATAL_ERROR "NVCLIP_TENSORRT=ON needs the CUDA build (NVCLIP_CUDA)")
    endif()
  else()
    find_path(NVCLIP_TENSORRT_INCLUDE_DIR NvInferVersion.h
              HINTS ${TensorRT_ROOT} $ENV{TensorRT_ROOT}
              PATH_SUFFIXES include include/x86_64-linux-gnu)
    if(NVCLIP_TENSORRT_INCLUDE_DIR AND EXISTS "${NVCLIP_TENSORRT_INCLUDE_DIR}/NvInferRuntime.h")
      # NvInferVersion.h defines NV_TENSORRT_MAJOR either as a number or (10.x/11.x) through
      # TRT_MAJOR_ENTERPRISE; read whichever holds the digits.
      file(STRINGS "${NVCLIP_TENSORRT_INCLUDE_DIR}/NvInferVersion.h" _trt_lines
           REGEX "#define (NV_TENSORRT|TRT)_(MAJOR|MINOR|PATCH)(_ENTERPRISE)? +[0-9]+")
      foreach(_part MAJOR MINOR PATCH)
        set(_trt_${_part} "")
        foreach(_line IN LISTS _trt_lines)
          if(_line MATCHES "#define (NV_TENSORRT|TRT)_${_part}(_ENTERPRISE)? +([0-9]+)")
            set(_trt_${_part} "${CMAKE_MATCH_3}")
          endif()
        endforeach()
      endforeach()
      if(_trt_MAJOR STREQUAL "")
        message(FATAL_ERROR "Could not read the TensorRT version from ${NVCLIP_TENSORRT_INCLUDE_DIR}/NvInferVersion.h")
      endif()
      set(NVCLIP_WITH_TENSORRT ON)
      set(NVCLIP_TENSORRT_VERSION "${_trt_MAJOR}.${_trt_MINOR}.${_trt_PATCH}")
      set(NVCLIP_TENSORRT_MAJOR "${_trt_MAJOR}")
    elseif(NVCLIP_TENSORRT STREQUAL "ON")
      message(FATAL_ERROR "NVCLIP_TENSORRT=ON but NvInferRuntime.h was not found (set TensorRT_ROOT)")
    endif()
  endif()
endif()
message(STATUS "nvclip_fast: TensorRT ${NVCLIP_WITH_TENSORRT} ${NVCLIP_TENSORRT_VERSION}")
