"""The core: configuration and policies, schedules, run history and journal, locks, errors,
time. Imports only the standard library, dateutil and `gfs_backup.retention`."""
