"""The appliance's API: a daemon on HOME/run/api.sock and its client (see docs/api.md)."""
