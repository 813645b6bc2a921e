"""The planner: a pure function from (config, inventory, previous plan) to a plan of slots.

`model` holds what a plan is (its slots, their JSON, the difference of two plans), `gpu_units`
how GPUs are grouped into GPU slots (whole, several nearest together, shared, MIG), `planner`
the rules that cut the host into slots (its docstring lists them). Nothing here touches the
system; `inventory` says what the host has.
"""

from appliance.plan.model import Plan, PlanDiff, PlanError, Slot, describe_slot, diff_plans
from appliance.plan.planner import make_plan

__all__ = ["Plan", "PlanDiff", "PlanError", "Slot", "describe_slot", "diff_plans", "make_plan"]
