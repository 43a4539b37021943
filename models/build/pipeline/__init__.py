"""Building the ladder (build time): export, quantize, evaluate, write the manifest."""
