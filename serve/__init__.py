"""serve: the OpenAI-compatible HTTP API and web chat page of llava_ft.

Start it with `llava_ft serve MODEL ...` (see `llava_ft/commands/serve.py`) or build the app yourself with
`llava_ft.serve.app.create_app(chat_model, model_name, ...)` and run it with uvicorn. Needs the `serve` extra
(`pip install llava_ft[serve]`: fastapi, uvicorn).
"""
