"""appliance render: write supervisord.conf, plan.json and the systemd unit without starting."""

import shutil
import sys
from pathlib import Path

from appliance.files import write_atomic
from appliance.lifecycle import prepare
from appliance.plan import describe_slot
from appliance.render import render_unit


def register(sub):
    p = sub.add_parser("render", help="plan the slots and write the configs, without starting anything")
    p.add_argument("--unit", metavar="PATH", help="also write the systemd unit to PATH")
    p.set_defaults(func=run)


def run(args) -> int:
    prepared = prepare(args.home)
    print(f"wrote {args.home.supervisord_conf} and {args.home.plan_file}")
    for slot in prepared.plan.slots:
        print(f"  {describe_slot(slot)}")
    for note in prepared.plan.notes:
        print(f"  note: {note}")
    if args.unit:
        binary = shutil.which("appliance") or str(Path(sys.executable).with_name("appliance"))
        write_atomic(Path(args.unit), render_unit(args.home, prepared.config, binary))
        print(f"wrote {args.unit}")
    return 0
