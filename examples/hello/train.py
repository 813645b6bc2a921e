"""A tiny experiment: "trains" for a few steps, checkpoints into modeldir, resumes from it.

Run it on the appliance from this folder:

    appliance submit train.py --steps 20 --lr 0.1
    appliance logs -f <printed key>
    appliance results <printed key>

Or with the StudioML client (STUDIOML_HOME=<appliance home>/studioml):

    studio run --queue local_appliance train.py --steps 20 --lr 0.1
"""

import argparse
import json
import os
import signal
import sys
import time


def artifact_dir(tag):
    """Where the runner put artifact `tag` (StudioML's convention: a sibling of the workspace)."""
    mapping = os.environ.get("STUDIOML_ARTIFACT_MAPPING")
    if mapping and os.path.exists(mapping):
        with open(mapping) as f:
            return json.load(f)[tag]
    return os.path.join("..", tag)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--sleep", type=float, default=0.2, help="seconds per step")
    args = p.parse_args()

    modeldir = artifact_dir("modeldir")
    os.makedirs(modeldir, exist_ok=True)
    ckpt = os.path.join(modeldir, "checkpoint.json")
    state = {"step": 0, "w": 0.0}
    if os.path.exists(ckpt):
        with open(ckpt) as f:
            state = json.load(f)
        print(f"resuming from step {state['step']}", flush=True)

    def save():
        tmp = ckpt + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, ckpt)

    def on_sigterm(*_):  # the runner drains: save and stop, the job runs again later
        save()
        print(f"stopping at step {state['step']}, checkpoint saved", flush=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    print(f"hello from experiment {os.environ.get('STUDIOML_EXPERIMENT', '?')} "
          f"(python {sys.version.split()[0]}, lr={args.lr})", flush=True)
    target = 3.0
    while state["step"] < args.steps:
        state["w"] += args.lr * (target - state["w"])  # one gradient step towards the target
        state["step"] += 1
        print(f"step {state['step']:3d}  w={state['w']:.4f}  loss={(target - state['w']) ** 2:.6f}",
              flush=True)
        save()
        time.sleep(args.sleep)

    retval = artifact_dir("retval")
    if os.path.isdir(retval):
        with open(os.path.join(retval, "retval.json"), "w") as f:
            json.dump({"w": state["w"]}, f)
    print("done", flush=True)


if __name__ == "__main__":
    main()
