"""gfs-backup: snapshots turned into real, verified grandfather-father-son backups."""

__version__ = "0.1.0"
