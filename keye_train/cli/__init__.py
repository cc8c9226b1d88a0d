"""The `keye-train` command line: one module per subcommand, dispatched by main.py."""
