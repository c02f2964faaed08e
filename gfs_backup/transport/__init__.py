"""Running commands here or on a remote host: the Runner (local subprocess or SSH through
paramiko, the only module that imports it) and SSH host keys. Imports only `core`."""
