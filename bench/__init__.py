import os

# OpenMP's threads spin while they wait for work. When loader workers or threads share the cores
# with a model training on the CPU (--cpus, the CPU path) that spinning cost 20-30 % of end-to-end
# images/s here, and nothing without workers (docs/plan.md). libgomp reads this once, when torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
