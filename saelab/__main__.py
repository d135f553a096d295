"""`python -m saelab …` — the CLI, also as `torchrun --nproc_per_node N -m saelab sae train …`."""

from saelab.cli import main

main()
