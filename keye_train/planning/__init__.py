"""Plans without allocating: parameter counts, memory per rank, token budgets."""
