"""The launchers: where a study's runs execute and how they ended (base.Launcher).

LocalLauncher (local) runs them on slots of this machine (slots). OptunaQueueLauncher
(optuna_queue) enqueues them in a shared Optuna storage (trial_queue) for `harness worker`s
(queue_worker), and works on the queue itself unless told not to. SubmititLauncher
(submitit_launcher) enqueues them the same way and submits a SLURM job array of queue
workers through submitit (or runs those jobs as local processes).

The top layer: may import every folder (report, runs, store, study), harness.terminal and
ddpm_engine; only the top-level modules (cli, commands) import it (docs/design.md, "Layers").
"""
