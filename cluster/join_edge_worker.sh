#!/usr/bin/env bash
# Join this machine (an edge board) to a raynas Ray cluster as the device NAME.
#
#   cluster/join_edge_worker.sh HEAD_ADDRESS DEVICE_NAME [extra `ray start` options...]
#   e.g. cluster/join_edge_worker.sh 10.0.0.5:6379 cortex-a57
#
# The node advertises the Ray custom resource `device:DEVICE_NAME` (one unit, so profiling tasks on the
# board run one at a time) and 0 CPUs for ordinary Ray work by default, so training or search tasks are
# never scheduled onto the board and never disturb its timings (pass --num-cpus N to change that).
# DEVICE_NAME must be declared in cluster/devices.yaml on the driver (runtime, threads, batch size).
# The board needs Python with ray, onnxruntime (the build for its accelerator: onnxruntime-gpu for
# CUDA/TensorRT, onnxruntime-openvino for OpenVINO) and raynas; `pip install raynas` or ship the code with
# `ray job submit --working-dir .`.
set -euo pipefail

usage() { echo "usage: $0 HEAD_ADDRESS DEVICE_NAME [ray start options...]" >&2; exit 2; }
[[ $# -ge 2 ]] || usage
head_address=$1
device=$2
shift 2
[[ -n "$head_address" ]] || usage
if [[ ! "$device" =~ ^[A-Za-z0-9._-]+$ ]]; then
  echo "$0: DEVICE_NAME: '$device' must be letters, digits, '.', '_' or '-'" >&2
  exit 2
fi
command -v ray >/dev/null || { echo "$0: 'ray' not found: pip install 'ray[default]' onnxruntime" >&2; exit 2; }
"${PYTHON:-python3}" - <<'PY' || { echo "$0: onnxruntime is not importable on this board: pip install onnxruntime" >&2; exit 2; }
import onnxruntime
print(f"onnxruntime {onnxruntime.__version__}, providers {onnxruntime.get_available_providers()}")
PY

# Ray >= 2.59 protects clusters with a token: a node joins only with the head's token (copy it from the
# head: `ray get-auth-token`) as $RAY_AUTH_TOKEN, in the file $RAY_AUTH_TOKEN_PATH, or in ~/.ray/auth_token.
if [[ -z "${RAY_AUTH_MODE:-}" ]] && { [[ -n "${RAY_AUTH_TOKEN:-}" ]] || [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]] \
     || [[ -s "$HOME/.ray/auth_token" ]]; }; then
  export RAY_AUTH_MODE=token
fi

num_cpus=(--num-cpus 0)
for arg in "$@"; do [[ "$arg" == --num-cpus* ]] && num_cpus=(); done

exec ray start --address="$head_address" --resources="{\"device:${device}\": 1}" "${num_cpus[@]}" "$@"
