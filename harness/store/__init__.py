"""Where results are stored: Parquet tables under results/ (tables), the MLflow tracking store
checked and mended without importing MLflow (mlflow_store), a run recorded into both
(tracking), its metric history (history), one finished run's record rebuilt from the other
store (rebuild), and the run states both record (states).

May import: harness.study, harness.terminal and ddpm_engine (docs/design.md, "Layers").
"""
