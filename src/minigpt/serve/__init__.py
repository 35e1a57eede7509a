"""`minigpt serve`: the FastAPI app (app.py), the OpenAI wire format (openai_api.py), request slots
(slots.py), stop strings (stop_strings.py) and the playground page (static/)."""
