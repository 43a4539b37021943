"""Training the default teacher and distilling its student (build time only: needs torch)."""
