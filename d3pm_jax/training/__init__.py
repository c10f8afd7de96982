"""Layer 6, the one train loop and what it keeps: state, loss wiring, checkpoints, metrics, preemption, faults.
May import every layer below (math, models, runtime, config, data); never ``evaluation`` or ``cli``."""
