"""Big/little dynamic inference (seed 002): coupled big/little subnets of one supernet, co-trained with a
joint loss, input-adaptive routers, pair search over expected cost, and routed ONNX deployment."""
