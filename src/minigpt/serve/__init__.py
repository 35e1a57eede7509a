"""`minigpt serve`: the FastAPI app (app.py), the OpenAI wire format (openai_api.py), HTTP requests
as jobs on the continuous batch (jobs.py, over minigpt.batching), /metrics (metrics.py) and the
playground page (static/)."""
