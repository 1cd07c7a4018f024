# One image for the API, the worker and beat; docker-compose.yml picks the command.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY billing billing
COPY workers workers
COPY migrations migrations
RUN pip install --no-cache-dir -e .
ENV DATA_DIR=/app/var
EXPOSE 8000
CMD ["gunicorn", "--bind", "0.0.0.0:8000", "--workers", "4", "--threads", "4", "billing.wsgi:app"]
