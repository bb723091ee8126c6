"""Thin entry point: `gunicorn app:app`, `flask --app app ...`."""
from web import create_app

app = create_app()
