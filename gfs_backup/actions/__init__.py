"""One module per action (run, restore, verify, drill, prune, plan, status, ...): the CLI
calls these. Imports `backends`, `target`, `copying`, `tools`, `transport`, `core`, `retention`."""
