"""Starting the ranks: torchrun commands for one or many nodes, SLURM batch scripts that run them, and the
preemption protocol between a launcher and the ranks. Knows no config schema beyond the fields it reads;
`keye-train launch ...` (keye_train/cli/launch.py) checks the recipe and calls in here."""
