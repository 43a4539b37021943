"""The executor: requests in, an async stream of events out; continuous batches below HTTP."""
