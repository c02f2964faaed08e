from gfs_backup.cli import main

main()
