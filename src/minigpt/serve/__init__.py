"""`minigpt serve`: the FastAPI app (app.py), the OpenAI wire format (openai_api.py), requests on the
continuous batch (slots.py, over minigpt.batching), /metrics (metrics.py), the old import path of
the stop strings (stop_strings.py) and the playground page (static/)."""
