#!/usr/bin/env bash
# Cloud TPU launcher for fluxir-jax: create / setup / run / logs / ssh / stop / delete / status.
# Every subcommand accepts --dry-run, which prints the exact commands instead of running them.
set -euo pipefail

PROG=$(basename "$0")
REPO=$(cd "$(dirname "$0")" && pwd)
SESSION=fluxir

usage() {
  cat <<EOF
Usage: $PROG COMMAND [flags] [-- command ...]

Commands
  create    request the slice(s) as a queued resource (on-demand, or spot with --spot)
  setup     copy this checkout to every worker, create .venv there, pip install ".[tpu]"
  run -- CMD ...
            run CMD (e.g. fluxir train configs/train/fluxir-dev.yaml) on every worker of every
            slice, detached in tmux session '$SESSION', output in ~/fluxir-jax/logs/run-<host>.log
  logs      print the end of every worker's run log (--lines N, default 50)
  ssh [-- CMD ...]
            interactive shell on --node/--worker (default 0/0), or run CMD there
  stop      end the tmux session (the run) on every worker
  delete    delete the queued resource and its TPU VMs
  status    describe the queued resource (state: WAITING_FOR_RESOURCES, ACTIVE, SUSPENDED, ...)

Flags (each may also come from the environment variable in brackets)
  --name NAME                queued resource name; slices are NAME (one) or NAME-0, NAME-1, ...  [NAME]
  --zone ZONE                e.g. us-east5-a                                                  [ZONE]
  --project PROJECT          Google Cloud project (default: gcloud's configured project)    [PROJECT]
  --accelerator-type TYPE    e.g. v5p-32, v6e-8, v5litepod-16, v4-8 (create)       [ACCELERATOR_TYPE]
  --runtime-version VERSION  TPU VM image (create; default by TPU generation)       [RUNTIME_VERSION]
  --spot                     spot capacity: cheaper, can be preempted (create)                [SPOT=1]
  --num-slices N             slices joined over the data-center network (create; default 1) [NUM_SLICES]
  --node N|all               slice for ssh/logs (ssh default 0, logs default all)
  --worker N|all             worker for ssh/logs (ssh default 0, logs default all)
  --env KEY=VALUE            extra environment for run (repeatable), e.g. LIBTPU_INIT_ARGS=...
  --python VERSION           Python for the workers' venv (setup; default 3.11)
  --lines N                  lines of each log (logs; default 50)
  --dry-run                  print the commands, run nothing
  -h, --help                 this text

Example (v5p-32: 16 chips on 4 hosts)
  $PROG create --name fluxir --zone us-east5-a --accelerator-type v5p-32 --spot
  $PROG status --name fluxir --zone us-east5-a          # wait for ACTIVE
  $PROG setup  --name fluxir --zone us-east5-a
  $PROG run    --name fluxir --zone us-east5-a -- fluxir train configs/train/fluxir-dev.yaml
EOF
}

die_usage() {
  echo "$PROG: $1" >&2
  usage >&2
  exit 2
}

# ------------------------------------------------------------------------------ arguments

[[ $# -ge 1 ]] || die_usage "missing COMMAND"
COMMAND=$1
shift
case "$COMMAND" in
  -h | --help) usage; exit 0 ;;
  create | setup | run | logs | ssh | stop | delete | status) ;;
  *) die_usage "unknown command '$COMMAND'" ;;
esac

NAME=${NAME:-}
ZONE=${ZONE:-}
PROJECT=${PROJECT:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
SPOT=${SPOT:-0}
NUM_SLICES=${NUM_SLICES:-1}
NODE=""
WORKER=""
PYTHON_VERSION=3.11
LINES_SHOWN=50
DRY_RUN=0
EXTRA_ENV=()
USER_CMD=()

need_value() { [[ $# -ge 2 && -n "$2" ]] || die_usage "$1 needs a value"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --zone) need_value "$@"; ZONE=$2; shift 2 ;;
    --project) need_value "$@"; PROJECT=$2; shift 2 ;;
    --accelerator-type) need_value "$@"; ACCELERATOR_TYPE=$2; shift 2 ;;
    --runtime-version) need_value "$@"; RUNTIME_VERSION=$2; shift 2 ;;
    --num-slices) need_value "$@"; NUM_SLICES=$2; shift 2 ;;
    --node) need_value "$@"; NODE=$2; shift 2 ;;
    --worker) need_value "$@"; WORKER=$2; shift 2 ;;
    --env) need_value "$@"; EXTRA_ENV+=("$2"); shift 2 ;;
    --python) need_value "$@"; PYTHON_VERSION=$2; shift 2 ;;
    --lines) need_value "$@"; LINES_SHOWN=$2; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; USER_CMD=("$@"); break ;;
    *) die_usage "unknown argument '$1'" ;;
  esac
done

require() {  # require FLAG VALUE: a missing argument is a usage error
  [[ -n "$2" ]] || die_usage "$COMMAND needs $1 (or the environment variable $(echo "${1#--}" | tr 'a-z-' 'A-Z_'))"
}

require --name "$NAME"
require --zone "$ZONE"
[[ "$NUM_SLICES" =~ ^[1-9][0-9]*$ ]] || die_usage "--num-slices must be a positive integer, got '$NUM_SLICES'"
[[ "$SPOT" == 0 || "$SPOT" == 1 || "$SPOT" == true || "$SPOT" == false ]] || die_usage "SPOT must be 0/1/true/false, got '$SPOT'"
[[ "$SPOT" == true ]] && SPOT=1
[[ "$SPOT" == false ]] && SPOT=0
for kv in "${EXTRA_ENV[@]+"${EXTRA_ENV[@]}"}"; do
  [[ "$kv" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die_usage "--env wants KEY=VALUE, got '$kv'"
done

# ------------------------------------------------------------------------------ helpers

GCLOUD_TPU=(gcloud compute tpus queued-resources)
COMMON=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && COMMON+=(--project="$PROJECT")
REMOTE_DIR='~/fluxir-jax'  # on the workers, relative to the login user's home

run_cmd() {  # print (dry run) or execute one command, given as words
  if [[ $DRY_RUN == 1 ]]; then
    printf '%q ' "$@" | sed 's/ $//'
    echo
  else
    "$@"
  fi
}

on_workers() {  # on_workers NODE WORKER REMOTE_COMMAND
  run_cmd "${GCLOUD_TPU[@]}" ssh "$NAME" "${COMMON[@]}" --node="$1" --worker="$2" --command="$3"
}

default_runtime() {
  case "$1" in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) echo "" ;;
  esac
}

# ------------------------------------------------------------------------------ commands

cmd_create() {
  require --accelerator-type "$ACCELERATOR_TYPE"
  [[ -n "$RUNTIME_VERSION" ]] || RUNTIME_VERSION=$(default_runtime "$ACCELERATOR_TYPE")
  require --runtime-version "$RUNTIME_VERSION"
  local args=("${GCLOUD_TPU[@]}" create "$NAME" "${COMMON[@]}"
    --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION")
  if [[ "$NUM_SLICES" == 1 ]]; then
    args+=(--node-id="$NAME")
  else
    args+=(--node-count="$NUM_SLICES" --node-prefix="$NAME")
  fi
  [[ $SPOT == 1 ]] && args+=(--spot)
  run_cmd "${args[@]}"
  [[ $DRY_RUN == 1 ]] || echo "$PROG: requested; '$PROG status --name $NAME --zone $ZONE' shows when it is ACTIVE" >&2
}

cmd_setup() {
  local archive="${TMPDIR:-/tmp}/fluxir-jax-$NAME.tgz"
  run_cmd tar -czf "$archive" -C "$REPO" --exclude=./.git --exclude=./.venv --exclude=./.cache \
    --exclude='__pycache__' --exclude='*.egg-info' --exclude=./out .
  run_cmd "${GCLOUD_TPU[@]}" scp "$archive" "$NAME:fluxir-jax.tgz" "${COMMON[@]}" --node=all --worker=all
  local remote="set -e; mkdir -p $REMOTE_DIR && tar -xzf ~/fluxir-jax.tgz -C $REMOTE_DIR && cd $REMOTE_DIR"
  # uv brings its own Python (Ubuntu 22.04 TPU VM images ship 3.10; the package needs >= 3.11).
  remote+=" && (python3 -m pip install --user -q uv || curl -LsSf https://astral.sh/uv/install.sh | sh)"
  remote+=" && ~/.local/bin/uv venv -q --python $PYTHON_VERSION .venv"
  remote+=" && ~/.local/bin/uv pip install -q --python .venv/bin/python -c constraints.txt '.[tpu]'"
  remote+=" && .venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'"
  on_workers all all "$remote"
}

launcher_script() {  # the script each worker runs inside tmux
  local cmd env_line=""
  cmd=$(printf '%q ' "${USER_CMD[@]}")
  for kv in "${EXTRA_ENV[@]+"${EXTRA_ENV[@]}"}"; do
    env_line+=" ${kv%%=*}=$(printf '%q' "${kv#*=}")"
  done
  cat <<EOF
cd "\$HOME/fluxir-jax"
export PATH="\$HOME/fluxir-jax/.venv/bin:\$PATH" PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR="\$HOME/fluxir-jax/.cache/jax"${env_line:+
export$env_line}
exec ${cmd% } > "logs/run-\$(hostname).log" 2>&1
EOF
}

cmd_run() {
  [[ ${#USER_CMD[@]} -gt 0 ]] || die_usage "run needs the command after '--' (e.g. -- fluxir train CONFIG)"
  # One process per worker; jax.distributed.initialize() finds the other hosts on Cloud TPU.
  local remote="mkdir -p $REMOTE_DIR/logs && cat > $REMOTE_DIR/logs/launch.sh <<'FLUXIR_EOF'
$(launcher_script)
FLUXIR_EOF
(tmux kill-session -t $SESSION 2>/dev/null || true) && tmux new-session -d -s $SESSION bash $REMOTE_DIR/logs/launch.sh"
  on_workers all all "$remote"
}

cmd_logs() {
  on_workers "${NODE:-all}" "${WORKER:-all}" "tail -v -n $LINES_SHOWN $REMOTE_DIR/logs/run-*.log"
}

cmd_ssh() {
  local args=("${GCLOUD_TPU[@]}" ssh "$NAME" "${COMMON[@]}" --node="${NODE:-0}" --worker="${WORKER:-0}")
  if [[ ${#USER_CMD[@]} -gt 0 ]]; then
    args+=(--command="$(printf '%q ' "${USER_CMD[@]}" | sed 's/ $//')")
  fi
  run_cmd "${args[@]}"
}

cmd_stop() {
  on_workers all all "tmux kill-session -t $SESSION 2>/dev/null || true"
}

cmd_delete() {
  run_cmd "${GCLOUD_TPU[@]}" delete "$NAME" "${COMMON[@]}" --force --quiet
}

cmd_status() {
  run_cmd "${GCLOUD_TPU[@]}" describe "$NAME" "${COMMON[@]}"
}

"cmd_$COMMAND"
