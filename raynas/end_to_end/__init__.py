"""End-to-end pipelines: train (or load) a supernet -> profile the device -> search -> export -> report."""
