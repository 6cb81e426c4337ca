"""Worker-side HTTP pieces shared by the protocols' servers: admission (API keys, limits),
session stores (in memory, or signed tokens for Ray Serve replicas) and the FastAPI helpers."""
