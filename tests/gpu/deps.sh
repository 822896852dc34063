# Sourced by tests/gpu/run.sh and bench/gpu/run.sh on the GPU machine. Its image has CUDA, NCCL,
# Open MPI and OpenBLAS, but nobody has checked that it has the dev packages of jansson, pcre2,
# libpng and libjpeg. prepare.sh unpacks this machine's (Debian 12) packages into .gpu/deps; when
# the image lacks any of them, the build and the programs use those instead (pkg-config, CMake,
# the compiler and the loader are pointed there; BLIP2_GPU_DEPS=carried forces that, to test it).
# Nothing is installed.
blip2_gpu_deps() {
  local deps=$PWD/.gpu/deps arch=x86_64-linux-gnu
  BLIP2_DEPS_CMAKE=""
  if [ "${BLIP2_GPU_DEPS:-}" != carried ] && pkg-config --exists jansson libpcre2-8 libpng 2>/dev/null &&
    [ -e /usr/include/jpeglib.h ]; then
    echo "C libraries: the image's own"
    return 0
  fi
  if [ ! -d "$deps/usr/lib/$arch" ]; then
    echo "C libraries: missing in the image and not carried (run tests/gpu/prepare.sh, carry .gpu)"
    return 1
  fi
  export PKG_CONFIG_LIBDIR=$deps/usr/lib/$arch/pkgconfig:$deps/usr/share/pkgconfig PKG_CONFIG_SYSROOT_DIR=$deps
  export CPATH=$deps/usr/include/$arch:$deps/usr/include${CPATH:+:$CPATH}
  export LD_LIBRARY_PATH=$deps/usr/lib/$arch${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  BLIP2_DEPS_CMAKE="-DCMAKE_PREFIX_PATH=$deps/usr"
  echo "C libraries: carried, from .gpu/deps"
}

# A time budget for one device call: BLIP2_GPU_DEADLINE=T (a `date +%s` time) caps every step's
# timeout at what is left, and a step that would get under 5 s is skipped, so that one slow step
# never leaves later ones running past the call (device time counts all tries together). Without
# it a step gets its own cap.
blip2_gpu_skipped() { # name: whether BLIP2_GPU_SKIP lists it, or BLIP2_GPU_ONLY is set and does not
  # (names separated by spaces; with BLIP2_GPU_ONLY, configure and build still run)
  case " ${BLIP2_GPU_SKIP:-} " in *" $1 "*) return 0 ;; esac
  [ -z "${BLIP2_GPU_ONLY:-}" ] && return 1
  case " configure build ${BLIP2_GPU_ONLY} " in *" $1 "*) return 1 ;; esac
  return 0
}
blip2_gpu_cap() { # cap_s -> the timeout to use, or nothing (skip)
  local cap=$1 left
  [ -z "${BLIP2_GPU_DEADLINE:-}" ] && { echo "$cap"; return; }
  left=$((BLIP2_GPU_DEADLINE - $(date +%s)))
  [ "$left" -lt "$cap" ] && cap=$left
  [ "$cap" -ge 5 ] && echo "$cap"
}
