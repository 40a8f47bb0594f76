"""meterproxy: an OpenAI-compatible reverse proxy that meters every request."""

__version__ = "0.1.0"
