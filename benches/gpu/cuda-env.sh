# Sourced by check.sh: points hearth at a CUDA toolkit before the first kernel compiles.
#
#   . benches/gpu/cuda-env.sh
#
# CubeCL compiles every kernel at run time with NVRTC, which needs two things the driver
# does not bring: libnvrtc itself, and the toolkit's headers (cuda_fp16.h, cuda_bf16.h,
# mma.h), passed to NVRTC as CUDA_PATH/include. CubeCL looks only at CUDA_PATH,
# /usr/local/cuda, /opt/cuda and /usr; a toolkit anywhere else (a pip-installed one beside
# PyTorch, say) would end the check at its first kernel. This finds one and exports
# CUDA_PATH, with the folder holding its libnvrtc first on LD_LIBRARY_PATH so that the
# library matches the headers.
#
# Candidates, first match wins: $CUDA_PATH, /usr/local/cuda, /opt/cuda, the folder above
# nvcc, then PyTorch's pip-installed NVIDIA packages (nvidia/cu13, nvidia/cu12).
# HEARTH_CUDA_CANDIDATES (folders, space-separated) replaces that list, for tests.
# Prints one line saying what it chose; returns 1, changing nothing, if no candidate has
# the headers.

hearth_cuda_candidates() {
    if [ -n "${HEARTH_CUDA_CANDIDATES+set}" ]; then
        printf '%s\n' $HEARTH_CUDA_CANDIDATES
        return
    fi
    [ -n "${CUDA_PATH:-}" ] && printf '%s\n' "$CUDA_PATH"
    printf '%s\n' /usr/local/cuda /opt/cuda
    local nvcc
    nvcc=$(command -v nvcc 2>/dev/null) && dirname "$(dirname "$(readlink -f "$nvcc")")"
    python3 - <<'PY' 2>/dev/null
import importlib.util, os
spec = importlib.util.find_spec("nvidia")
for root in (spec.submodule_search_locations if spec else []):
    for name in ("cu13", "cu12", "cuda_runtime"):
        print(os.path.join(root, name))
PY
}

hearth_cuda_env() {
    local dir lib
    while IFS= read -r dir; do
        [ -n "$dir" ] && [ -e "$dir/include/cuda_fp16.h" ] || continue
        export CUDA_PATH=$dir
        # The toolkit's own layouts, then pip's CUDA 12 one (nvrtc in a sibling package).
        for lib in "$dir/lib64" "$dir/lib" "$dir/targets/x86_64-linux/lib" "$dir/../cuda_nvrtc/lib"; do
            if compgen -G "$lib/libnvrtc.so*" >/dev/null; then
                export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
                echo "CUDA toolkit: $dir (headers), $lib (NVRTC)"
                return 0
            fi
        done
        echo "CUDA toolkit: $dir (headers); NVRTC from the loader's own path"
        return 0
    done < <(hearth_cuda_candidates)
    echo "CUDA toolkit: no headers (include/cuda_fp16.h) under any of:" \
        "$(hearth_cuda_candidates | paste -sd' '); so NVRTC cannot compile kernels"
    return 1
}

hearth_cuda_env
