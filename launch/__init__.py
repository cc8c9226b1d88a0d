"""Starting the ranks: torchrun commands for one or many nodes, and SLURM batch scripts that run them.

`keye-train launch torchrun ...` runs (or, with --dry-run, prints) the torchrun command of this node;
`keye-train launch slurm ...` renders an sbatch script from the recipe and submits it (or prints it)."""
