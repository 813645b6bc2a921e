"""The appliance's API: a daemon on HOME/run/api.sock and its client (see docs/api.md).

Its names live here, where a client finds them without importing the body types of protocol.py
(a quick `appliance submit` is timed)."""

API_VERSION = "v1"
PREFIX = "/" + API_VERSION
SOCKET_NAME = "api.sock"
