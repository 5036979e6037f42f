# Shared set-up for tests/run.sh and launch/quickstart.sh: install the Debian packages
# mlaserve builds against (when missing) and configure + build with CMake, Ninja and ccache.
# Source it; it defines functions and changes nothing by itself.

MLA_PACKAGES=(cmake ninja-build ccache g++ pkg-config python3 clang-format libopenblas-dev
  libspdlog-dev libopenmpi-dev openmpi-bin libgrpc++-dev libprotobuf-dev protobuf-compiler
  protobuf-compiler-grpc libcpp-httplib-dev libssl-dev zlib1g-dev openssl python3-grpcio python3-protobuf
  libpcre2-dev libfmt-dev nlohmann-json3-dev libcli11-dev libyaml-cpp-dev libgtest-dev libgmock-dev
  libboost-dev python3-venv curl python3-matplotlib)

# The Python clients the e2e tests drive the OpenAI-compatible API with, unmodified: the
# official SDK and AIPerf (PyPI), pinned, in .venv at the repository root.
MLA_PYTHON_TOOLS=(openai==3.51.0 aiperf==0.13.0)

mla_install_packages() {
  local missing=()
  for p in "${MLA_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "== installing: ${missing[*]}"
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "need root (or sudo) to install: ${missing[*]}" >&2; return 1; }
    sudo=sudo
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# mla_python_tools: makes .venv with MLA_PYTHON_TOOLS unless it has them already.
mla_python_tools() {
  local stamp=.venv/.mla-tools
  [ -f "$stamp" ] && [ "$(cat "$stamp")" = "${MLA_PYTHON_TOOLS[*]}" ] && return 0
  echo "== installing the Python test tools into .venv: ${MLA_PYTHON_TOOLS[*]}"
  python3 -m venv .venv || return 1
  .venv/bin/pip install -q --disable-pip-version-check "${MLA_PYTHON_TOOLS[@]}" || return 1
  echo "${MLA_PYTHON_TOOLS[*]}" >"$stamp"
}

# mla_configure_and_build BUILD_DIR JOBS [TARGET...]
mla_configure_and_build() {
  local dir=$1 jobs=$2
  shift 2
  mla_install_packages
  if [ ! -f "$dir/build.ninja" ]; then
    echo "== configuring $dir"
    mkdir -p "$dir"
    cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >"$dir/configure.log" 2>&1 ||
      { cat "$dir/configure.log"; return 1; }
    grep -E "mlaserve: CUDA" "$dir/configure.log" || true
  fi
  echo "== building ($jobs jobs)"
  local start=$SECONDS
  ninja -C "$dir" -j "$jobs" "$@" || return 1
  echo "== built in $((SECONDS - start)) s"
}

# mla_stop_cluster COORDINATOR_PID MPIRUN_PID...
# Stops the worker ranks first by signalling them directly (SIGTERM to mpirun itself makes
# Open MPI treat the job as aborted and SIGKILL the ranks a second later; a rank's own SIGTERM
# drains it), then the coordinator, and waits for all of them.
mla_stop_cluster() {
  local coordinator=$1 w
  shift
  for w in "$@"; do pkill -TERM -P "$w" 2>/dev/null || true; done
  for _ in $(seq 300); do
    local alive=0
    for w in "$@"; do kill -0 "$w" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.2
  done
  kill -TERM "$@" "$coordinator" 2>/dev/null || true
  wait "$@" "$coordinator" 2>/dev/null || true
}
