"""Bytes and file trees copied with their checksums: sha256-1m, sparse copies verified by
reading them back, file-tree export/restore/verify, copies on a remote host. Imports
`tools`, `transport` and `core`."""
