"""Layer 7, judging trained runs: likelihood with intervals, generation quality, workdir evaluation, comparison
of processes under equal budgets, and its plots. May import every layer below; never ``cli``."""
