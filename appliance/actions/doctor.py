"""appliance doctor: check cgroups, permissions, ports, the store, NVML, docker."""

from appliance.doctor import check


def register(sub):
    p = sub.add_parser("doctor", help="check what the appliance relies on; each problem with its fix")
    p.set_defaults(func=run)


def run(args) -> int:
    import os

    if os.geteuid() not in (0, _owner(args.home)):
        from appliance.api.member_doctor import member_findings
        from appliance.doctor import Finding

        findings = [Finding(*row) for row in member_findings(args.home)]
    else:
        findings = check(args.home)
    for f in findings:
        print(f"{'ok  ' if f.ok else 'FAIL'} {f.what}: {f.detail}")
    return 0 if all(f.ok for f in findings) else 1


def _owner(home) -> int:
    """Who owns the home (a missing one is about to be the caller's)."""
    import os

    try:
        return home.root.stat().st_uid
    except OSError:
        return os.geteuid()
