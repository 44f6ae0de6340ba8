# MLflow tracking server for docker-compose (service `mlflow`). The official image carries no PostgreSQL driver,
# so this adds psycopg 3, which the backend URI names (postgresql+psycopg://). docker-compose.yml passes
# MLFLOW_IMAGE from its x-mlflow-image pin; both stay at the mlflow version of the project's venv.
ARG MLFLOW_IMAGE=ghcr.io/mlflow/mlflow:v3.17.2
FROM ${MLFLOW_IMAGE}
RUN pip install --no-cache-dir "psycopg[binary]==3.3.9"
