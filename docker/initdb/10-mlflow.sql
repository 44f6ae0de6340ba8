-- The MLflow tracking server's database (docker-compose service `mlflow`), beside rltrader's own.
-- Run by the PostgreSQL image on the first start of an empty data volume (files in /docker-entrypoint-initdb.d/).
-- Idempotent, so an existing volume can get it too:
--   docker compose exec -T timescaledb psql -U rltrader -d rltrader < docker/initdb/10-mlflow.sql
SELECT 'CREATE DATABASE mlflow'
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'mlflow')\gexec
