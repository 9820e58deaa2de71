#!/usr/bin/env bash
# Join this machine (an edge board) to a raynas Ray cluster as the device NAME.
#
#   RAY_AUTH_TOKEN_PATH=~/raynas.token cluster/join_edge_worker.sh HEAD_ADDRESS DEVICE_NAME [extra `ray start` options...]
#   e.g. RAY_AUTH_TOKEN_PATH=~/raynas.token cluster/join_edge_worker.sh 10.0.0.5:6379 cortex-a57
#
# The node is labelled `device=DEVICE_NAME` (`ray start --labels device=DEVICE_NAME`); raynas places its
# profiler actor there with a label selector, one profiler per device at a time, so measurements on the
# board never overlap. It offers 0 CPUs to ordinary Ray work by default, so training or search tasks are
# never scheduled onto the board and never disturb its timings (pass --num-cpus N to change that).
# DEVICE_NAME must be declared in cluster/devices.yaml on the driver (runtime, threads, batch size).
#
# The cluster is closed: every node and client needs the head's token (token authentication,
# RAY_AUTH_MODE=token). Give it to this script in one of Ray's own ways, highest precedence first:
#   RAY_AUTH_TOKEN=<token>            the token itself (e.g. from a secret store; keep it out of shell history)
#   RAY_AUTH_TOKEN_PATH=<file>        a file holding it (mode 600)
#   ~/.ray/auth_token                 Ray's default file
# Without one the script refuses to start. Copy the token from the head (`ray get-auth-token` there) over
# an encrypted channel (scp/ssh); see cluster/README.md.
#
# The board needs Python with ray, onnxruntime (the build for its accelerator: onnxruntime-gpu for
# CUDA/TensorRT, onnxruntime-openvino for OpenVINO) and raynas; `pip install raynas` or ship the code with
# `ray job submit --working-dir .`. It needs no object-storage credentials: profilers receive the models
# through Ray's object store and write nothing.
set -euo pipefail

usage() { echo "usage: $0 HEAD_ADDRESS DEVICE_NAME [ray start options...]" >&2; exit 2; }
[[ $# -ge 2 ]] || usage
head_address=$1
device=$2
shift 2
[[ -n "$head_address" ]] || usage
# Ray labels follow the Kubernetes label syntax: alphanumerics, '-', '_' and '.', at most 63 characters.
if [[ ! "$device" =~ ^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$ ]]; then
  echo "$0: DEVICE_NAME: '$device' must be 1-63 letters, digits, '.', '_' or '-', starting and ending" \
       "with a letter or digit" >&2
  exit 2
fi

# Token authentication, always on: refuse rather than join an open cluster or fail later in Ray.
if [[ -n "${RAY_AUTH_MODE:-}" && "${RAY_AUTH_MODE}" != "token" ]]; then
  echo "$0: RAY_AUTH_MODE=${RAY_AUTH_MODE}: raynas clusters use token authentication; unset it or set it to 'token'" >&2
  exit 2
fi
if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then
  token_source="RAY_AUTH_TOKEN"
elif [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
  if [[ ! -s "$RAY_AUTH_TOKEN_PATH" ]]; then
    echo "$0: RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH: no token in that file (missing or empty)" >&2
    exit 2
  fi
  token_source="$RAY_AUTH_TOKEN_PATH"
elif [[ -s "$HOME/.ray/auth_token" ]]; then
  token_source="$HOME/.ray/auth_token"
else
  echo "$0: no cluster token: set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a file holding it, or copy it to" \
       "~/.ray/auth_token (on the head: \`ray get-auth-token\`); see cluster/README.md" >&2
  exit 2
fi
export RAY_AUTH_MODE=token

command -v ray >/dev/null || { echo "$0: 'ray' not found: pip install 'ray[default]' onnxruntime" >&2; exit 2; }
"${PYTHON:-python3}" - <<'PY' || { echo "$0: onnxruntime is not importable on this board: pip install onnxruntime" >&2; exit 2; }
import onnxruntime
print(f"onnxruntime {onnxruntime.__version__}, providers {onnxruntime.get_available_providers()}")
PY

num_cpus=(--num-cpus 0)
for arg in "$@"; do [[ "$arg" == --num-cpus* ]] && num_cpus=(); done

echo "joining $head_address as device=$device (token from $token_source)" >&2
exec ray start --address="$head_address" --labels="device=${device}" "${num_cpus[@]}" "$@"
