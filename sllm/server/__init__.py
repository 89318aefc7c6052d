"""The per-node HTTP server: an OpenAI-compatible FastAPI app (``app.py``), its request
and response shapes (``schemas.py``), the model lifecycle (``models.py``) and the text side
of generation (``text.py``). ``sllm serve`` runs :func:`sllm.server.app.create_app` with
uvicorn. Importing this package imports nothing heavy; import the modules you need.
"""
