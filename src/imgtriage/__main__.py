"""``python -m imgtriage`` (also what ``torchrun -m imgtriage train ...`` runs)."""

from imgtriage.cli.main import main

main()
