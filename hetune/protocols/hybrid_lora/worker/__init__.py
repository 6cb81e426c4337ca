"""The worker's side: holds the bundle's integer weights and sees only ciphertexts.

:mod:`.runner` multiplies request bodies by the weights through the session's scheme;
:mod:`.server` serves it over HTTP (FastAPI), :mod:`.ray_serve` on Ray Serve. Nothing
here imports the data owner's code or its secret-key types (tests/test_layout.py).
"""
