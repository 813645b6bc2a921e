"""appliance doctor: check cgroups, permissions, ports, the store, NVML, docker."""

from appliance.doctor import check


def register(sub):
    p = sub.add_parser("doctor", help="check what the appliance relies on; each problem with its fix")
    p.set_defaults(func=run)


def run(args) -> int:
    findings = check(args.home)
    for f in findings:
        print(f"{'ok  ' if f.ok else 'FAIL'} {f.what}: {f.detail}")
    return 0 if all(f.ok for f in findings) else 1
