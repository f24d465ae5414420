"""Tiergate: route each LLM request to a local open model or a closed frontier API."""

__version__ = "0.1.0"
