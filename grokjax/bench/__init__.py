"""Throughput benchmarks: the JAX step against an eager PyTorch loop of the same step
(`torch_reference`, also the independent reference of the parity tests), timed in
interleaved windows (`core`), and the `grokjax-bench` command (`cli`)."""
