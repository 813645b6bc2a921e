from appliance.cli import command

raise SystemExit(command())
