# rltrader image for docker-compose: the same CLI as on a laptop, pointed at the compose TimescaleDB.
FROM python:3.11-slim
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1 \
    MLFLOW_DISABLE_TELEMETRY=true PREFECT_SERVER_ANALYTICS_ENABLED=false
WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
COPY flows ./flows
RUN pip install --no-cache-dir .
COPY params.yaml dvc.yaml ./
ENTRYPOINT ["rltrader"]
CMD ["--help"]
