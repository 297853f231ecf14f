"""ddpm-ablate harness: studies, scheduling, tracking and reports around ddpm_engine."""
