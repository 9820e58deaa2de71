"""The hardware-aware NAS pipeline, for `ray job submit`:

    ray job submit --working-dir . -- python pipelines/hw_nas.py --config pipelines/configs/hw_nas_demo.yaml

train (or load) supernet -> profile device -> search on Ray actors -> export ONNX -> report.
Thin on purpose: parse arguments, call the library (raynas.end_to_end.hw_nas).
"""

from __future__ import annotations

import argparse
import json
import sys

from raynas.end_to_end.hw_nas import load_pipeline_config, run_pipeline
from raynas.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="pipeline YAML (see pipelines/configs/hw_nas_*.yaml)")
    parser.add_argument("--run-dir", dest="run_dir", help="override run_dir (a local path or a URI such as "
                        "s3://bucket/prefix; a re-run with the same run_dir resumes from what it holds)")
    args = parser.parse_args(argv)
    try:
        summary = run_pipeline(load_pipeline_config(args.config, args.run_dir))
    except UserError as exc:
        print(f"hw_nas: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
