"""appliance doctor: check cgroups, permissions, ports, the store, NVML, docker."""

from appliance.doctor import check


def register(sub):
    p = sub.add_parser("doctor", help="check what the appliance relies on; each problem with its fix")
    p.set_defaults(func=run)


def run(args) -> int:
    from appliance.api.access import owner_only

    if owner_only(args.home, "doctor"):  # a member: what they rely on, through the API
        from appliance.api.member_doctor import member_findings
        from appliance.doctor import Finding

        findings = [Finding(*row) for row in member_findings(args.home)]
    else:
        findings = check(args.home)
    for f in findings:
        print(f"{'ok  ' if f.ok else 'FAIL'} {f.what}: {f.detail}")
    return 0 if all(f.ok for f in findings) else 1

