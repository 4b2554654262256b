"""The application: the ``vattention`` CLI, its commands and the OpenAI-compatible server."""
