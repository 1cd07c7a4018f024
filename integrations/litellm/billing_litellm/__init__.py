"""Prepaid billing for a LiteLLM proxy (see README.md)."""
