"""The payment service from the reference comparison, used by the demo, the
crash tests and the benchmark."""
