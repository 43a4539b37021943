"""Thin route modules: parse, call the service, shape the answer."""
