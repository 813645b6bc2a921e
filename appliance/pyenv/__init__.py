"""The experiment's Python environment: a cache of virtualenvs keyed by requirement set.

What a runner uses:
- `requirement_set(pythonenv, pip)`: the request's requirements, checked (BadRequirement).
- `interpreter_for(pythonver, usable)`: the interpreter a venv is built from.
- `VenvCache(...).prepare(lines, python, sv, build_as, progress)`: a `PythonEnv`, built once
  and shared (EnvBuildFailed, Interrupted); `UvCache` is the one uv cache the builds share,
  `BuildUser` who builds, `Progress` where a build reports.
- `system_env(python)`: the configured interpreter as it is (`RunnerSettings.python`): no venv
  is built and `pythonenv`/`config.pip` are ignored.

Inside: requirements.py (the set and its key), interpreter.py, venvs.py (the cache: who
builds, who waits, eviction), locks.py (lock files only root can open), build.py (one build:
uv or pip, private until sealed, then published), bytecode.py (compiled by the workload's
account, never root), uvcache.py (the shared uv cache and its safety rule), progress.py (what
a build reports). No root process ever starts an interpreter in a job's venv.
"""

from appliance.pyenv.build import BuildUser, EnvBuildFailed, Interrupted
from appliance.pyenv.interpreter import interpreter_for
from appliance.pyenv.progress import Progress
from appliance.pyenv.requirements import BadRequirement, RequirementSet, requirement_set
from appliance.pyenv.uvcache import UvCache, uv_binary
from appliance.pyenv.venvs import PythonEnv, VenvCache, system_env

__all__ = ["BadRequirement", "BuildUser", "EnvBuildFailed", "Interrupted", "Progress", "PythonEnv",
           "RequirementSet", "UvCache", "VenvCache", "interpreter_for", "requirement_set", "system_env",
           "uv_binary"]
