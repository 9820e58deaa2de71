"""Hardware: devices, ONNX export, onnxruntime measurement, latency models.

Modules, one concern each (imported explicitly; this package imports nothing heavy so that an edge board
needs only ray + onnxruntime to run the profiler):

* `devices`   cluster/devices.yaml, nodes labelled `device=<name>` (or the older `device:<name>` resource),
              `ensure_device_present`, `init_local_ray`
* `measure`   onnxruntime timing protocol on the current node (no torch)
* `remote`    `start_profiler(device) -> Profiler`: the measuring actor on the device's node, one per device
* `features`  per-block operator/design features (seed 001 eq. 6)
* `lut`       distinct block configurations, per-block LUT build (parallel across devices, stored as it goes),
              LUT Parquet through raynas.storage
* `latency`   `LatencyModel` (`lut`, `linear`, `flops`, `params`), calibration JSON (raynas.storage),
              `load_latency_model`
* `profiling` end-to-end subnet measurement, calibration on <= 10 subnets, held-out validation
* `profile_all` profile spaces on every device present (pipelines/profile_devices.py)
* `cli`       `raynas profile devices|lut|calibrate|validate`
"""
