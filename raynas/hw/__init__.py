"""Hardware: devices, ONNX export, onnxruntime measurement, latency models.

Modules, one concern each (imported explicitly; this package imports nothing heavy so that an edge board
needs only ray + onnxruntime to run the profiler):

* `devices`   cluster/devices.yaml, `device:<name>` resources, `ensure_device_present`, `init_local_ray`
* `measure`   onnxruntime timing protocol on the current node (no torch)
* `remote`    `start_profiler(device) -> Profiler`: the measuring actor pinned to the device's node
* `features`  per-block operator/design features (seed 001 eq. 6)
* `lut`       distinct block configurations, per-block LUT build (parallel across devices), Parquet IO
* `latency`   `LatencyModel` (`lut`, `linear`, `flops`, `params`), calibration file, `load_latency_model`
* `profiling` end-to-end subnet measurement, calibration on <= 10 subnets, held-out validation
* `pipeline`  profile spaces on every device present (pipelines/profile_devices.py)
* `cli`       `raynas profile devices|lut|calibrate|validate`
"""
