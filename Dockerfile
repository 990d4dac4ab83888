# syntax=docker/dockerfile:1
# The broadcast server image. Build: docker build -t broadcast-server .
# Run with docker-compose.yml (Kafka, PostgreSQL, Redis); the same image runs `broadcast-server migrate`.

FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv
ENV PATH="/opt/venv/bin:$PATH"

WORKDIR /src
COPY requirements/runtime.txt requirements/runtime.txt
# every package pinned and hash-checked from the lock; then the project itself, resolving nothing
RUN pip install --require-hashes -r requirements/runtime.txt
COPY . .
RUN pip install --no-deps --no-build-isolation .


FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH="/opt/venv/bin:$PATH"

RUN groupadd --system --gid 10001 broadcast \
    && useradd --system --uid 10001 --gid broadcast --home-dir /app --no-create-home broadcast \
    && mkdir -p /app \
    && chown broadcast:broadcast /app

COPY --from=build /opt/venv /opt/venv

WORKDIR /app
USER broadcast

EXPOSE 8080

HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health/live', timeout=3)"]

CMD ["broadcast-server", "run", "--host", "0.0.0.0", "--port", "8080"]
