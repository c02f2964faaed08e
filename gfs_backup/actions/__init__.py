"""One module per action; the CLI calls these, they call the core."""
