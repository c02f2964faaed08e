"""The backup target and its generations: target checks, the target's filesystem (here or
on a remote host), manifests, the catalog, publishing and deleting generations.
Imports `copying`, `tools`, `transport`, `core` and `retention`."""
