"""The policies that ship with gfs-backup (TOML files in this folder)."""
