"""Which variant should serve this request? Pure: profiles and a budget in, a decision out."""
