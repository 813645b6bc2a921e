"""appliance image build: build the docker backend's runner image locally (no registry needed)."""

from appliance.config import load_config


def register(sub):
    p = sub.add_parser("image", help="build the runner image for isolation.backend = \"docker\"")
    actions = p.add_subparsers(dest="image_action", metavar="build", required=True)
    b = actions.add_parser("build", help="build the runner image from this host's Python and the appliance",
                           description="Build the runner image locally from the host's Python, the appliance "
                                       "and its dependencies, with `docker import`: no image registry is "
                                       "needed. The tag is isolation.docker_image unless --tag is given.")
    b.add_argument("--tag", help="image tag (default: isolation.docker_image from the config)")
    b.set_defaults(func=run_build)


def run_build(args) -> int:
    from appliance.image import build_image
    from appliance.slot.docker_slot import docker_problems

    problems = docker_problems()
    if problems:
        from appliance.actions import UserError

        raise UserError("cannot build the image: " + "; ".join(problems))
    tag = args.tag or load_config(args.home.config_file).isolation.docker_image
    image_id = build_image(tag, progress=lambda line: print(line, flush=True))
    print(f"built {tag} ({image_id[:19]}); `appliance up` uses it when isolation.backend = \"docker\"")
    return 0
