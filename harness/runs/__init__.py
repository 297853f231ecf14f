"""The life of a run key: executing it (lifecycle), its recorded state (ledger), the claims that
keep two processes off one key (claims), progress lines (progress), tuning before the runs
(tuning), reuse of keys finished in other studies (reuse), trainings shared through
checkpoints (checkpoints), damaged tables repaired (repair), MLflow and results/ made to agree
(reconcile) and the closed-form sampler checks (sampler_checks).

May import: harness.store, harness.study, harness.terminal and ddpm_engine (docs/design.md,
"Layers").
"""
