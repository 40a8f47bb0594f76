"""Usage exported as it settles: CloudEvents (one event per request, OpenMeter-compatible),
batched off the request path with its own queue, retried, delivered at least once."""
