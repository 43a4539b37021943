"""greenroute HTTP service: FastAPI app, settings, schemas, endpoints and the CLI."""
