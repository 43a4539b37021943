"""The model ladder: building variants (build time) and running them (serving time, no torch)."""
