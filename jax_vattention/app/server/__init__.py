"""An OpenAI-compatible HTTP server over the continuous-batching engine (``vattention serve``).

``app`` builds the FastAPI application, ``engine_loop`` runs the engine in its own thread,
``protocol`` holds the request and response shapes, ``chat`` turns messages into a prompt and
``text`` turns tokens into text as they come. Needs the ``serve`` extra (FastAPI, uvicorn).
"""
