"""GPU energy: readings from a source (NVML, DCGM or a simulated GPU), taken by one sampler
thread, attributed to requests by a pure engine, and exported as joules and tokens per joule."""
