"""The environment a submitted project gets: from its own files, in the documented order."""

from __future__ import annotations

import pytest

from appliance.studioml.environment import (ProjectEnvError, from_imports, from_project_files,
                                   imported_modules, own_modules, parse_pyproject,
                                   parse_requirements, parse_uv_lock)

UV_LOCK = '''
version = 1
requires-python = ">=3.11"

[[package]]
name = "demo"
version = "0.1.0"
source = { virtual = "." }
dependencies = [{ name = "requests" }, { name = "torch", extra = ["cuda"] }]

[package.dev-dependencies]
dev = [{ name = "pytest" }]

[[package]]
name = "requests"
version = "2.32.3"
source = { registry = "https://pypi.org/simple" }
dependencies = [{ name = "urllib3" }]

[[package]]
name = "urllib3"
version = "2.2.3"
source = { registry = "https://pypi.org/simple" }

[[package]]
name = "torch"
version = "2.5.1"
source = { registry = "https://pypi.org/simple" }

[package.optional-dependencies]
cuda = [{ name = "nvidia-cudnn" }]

[[package]]
name = "nvidia-cudnn"
version = "9.1"
source = { registry = "https://pypi.org/simple" }

[[package]]
name = "pytest"
version = "8.3.3"
source = { registry = "https://pypi.org/simple" }

[[package]]
name = "helper"
version = "0.1"
source = { git = "https://github.com/x/helper?rev=main#abc" }
'''


def test_uv_lock_sends_what_the_project_reaches_pinned():
    reqs, skipped = parse_uv_lock(UV_LOCK)
    assert reqs == ["nvidia-cudnn==9.1", "requests==2.32.3", "torch==2.5.1", "urllib3==2.2.3"]
    assert skipped == []  # pytest (dev only) and helper (unreached) are not the job's


def test_uv_lock_without_a_project_sends_every_index_package():
    text = UV_LOCK.replace('source = { virtual = "." }', 'source = { registry = "x" }')
    reqs, skipped = parse_uv_lock(text)
    assert "pytest==8.3.3" in reqs and "demo==0.1.0" in reqs
    assert [s[0] for s in skipped] == ["helper"]


@pytest.mark.parametrize("text, expected", [
    ('[project]\nname = "x"\ndependencies = ["numpy>=1.26", "torch==2.5.1"]\n',
     (["numpy>=1.26", "torch==2.5.1"], [])),
    ('[project]\nname = "x"\ndependencies = []\n', ([], [])),
    ('[project]\nname = "x"\ndependencies = ["mylib @ file:///home/me/mylib", "pandas"]\n',
     (["pandas"], [("mylib @ file:///home/me/mylib", "a local path: it only exists here")])),
    ('[project]\nname = "x"\ndynamic = ["dependencies"]\n', None),
    ('[tool.ruff]\nline-length = 100\n', None),
])
def test_pyproject_dependencies(text, expected):
    assert parse_pyproject(text) == expected


FILES = {"requirements.txt": "numpy==1.26.4  # the math\n\n-r more/extra.txt\n"
                             "--index-url https://example/simple\npandas>=2 \\\n  --hash=sha256:ab\n"
                             "-e ./mylib\n./wheels/x.whl\n",
         "more/extra.txt": "scipy\n"}


@pytest.mark.parametrize("text, reqs, skipped", [
    ("", [], []),
    ("# only a comment\n", [], []),
    ("numpy==1.26.4\ntorch; sys_platform == 'linux'\n",
     ["numpy==1.26.4", "torch; sys_platform == 'linux'"], []),
    (FILES["requirements.txt"], ["numpy==1.26.4", "scipy", "pandas>=2"],
     ["-e ./mylib", "./wheels/x.whl"]),
])
def test_requirements_file(text, reqs, skipped):
    got_reqs, got_skipped = parse_requirements(text, FILES.get)
    assert got_reqs == reqs
    assert [s[0] for s in got_skipped] == skipped


@pytest.mark.parametrize("text, message", [
    ("-r missing.txt\n", "line 1: -r missing.txt: no such file"),
    ("numpy\n--global-option=x\n", "line 2"),
])
def test_requirements_file_problems(text, message):
    with pytest.raises(ProjectEnvError, match=message):
        parse_requirements(text, FILES.get)


def test_the_first_source_that_exists_wins():
    def reader(files):
        return files.get

    both = {"requirements.txt": "numpy\n", "pyproject.toml": '[project]\ndependencies = ["torch"]\n'}
    assert from_project_files(reader(both)).source == "pyproject.toml"
    only_tool = {"requirements.txt": "numpy\n", "pyproject.toml": "[tool.black]\n"}
    env = from_project_files(reader(only_tool))
    assert (env.source, env.requirements) == ("requirements.txt", ["numpy"])
    assert from_project_files(reader({**both, "uv.lock": UV_LOCK})).source == "uv.lock"
    assert from_project_files(reader({})) is None
    assert from_project_files(reader({"requirements.txt": ""})).requirements == []


def test_imports_are_read_not_run():
    files = {"train.py": "import os, numpy as np\nfrom torch.nn import Linear\nfrom . import sib\n"
                         "import pkg.model\nraise SystemExit('never run')\n",
             "pkg/model.py": "from sklearn import svm\nimport json\n",
             "broken.py": "def (:\n"}
    assert imported_modules(files) == {"os", "numpy", "torch", "pkg", "sklearn", "json"}
    assert own_modules(files) == {"train", "pkg", "model", "broken"}


@pytest.mark.parametrize("modules, found, source, reqs, missing", [
    # a stdlib-only script: the interpreter leaves stdlib modules out of `found`
    ({"os", "json"}, {}, "none", [], []),
    ({"numpy", "os"}, {"numpy": [["numpy", "1.26.4"]]}, "imports", ["numpy==1.26.4"], []),
    ({"sklearn"}, {"sklearn": [["scikit-learn", "1.5.0"]]}, "imports", ["scikit-learn==1.5.0"], []),
    ({"yaml", "torch"}, {"yaml": [["PyYAML", "6.0"]], "torch": []}, "imports", ["PyYAML==6.0"], ["torch"]),
    ({"studio"}, {"studio": [["studioml", "0.0.49"]]}, "none", [], []),
    ({"google"}, {"google": [["protobuf", "5.0"], ["googleapis-common-protos", "1.6"]]},
     "imports", ["googleapis-common-protos==1.6", "protobuf==5.0"], []),
])
def test_imports_map_to_installed_distributions(modules, found, source, reqs, missing):
    env = from_imports(modules, set(), found)
    assert (env.source, env.requirements, env.missing) == (source, reqs, missing)


def test_a_package_installed_from_a_local_folder_is_not_sent():
    env = from_imports({"mylib", "numpy"}, set(), {"mylib": [["mylib", "0.1", True]],
                                                   "numpy": [["numpy", "2.0", False]]})
    assert env.requirements == ["numpy==2.0"]
    assert env.skipped == [("mylib (imported as mylib)", "installed from a local folder: it only exists here")]


def test_own_modules_are_not_looked_up():
    env = from_imports({"model", "numpy"}, {"model"}, {"numpy": [["numpy", "2.0"]],
                                                       "model": [["model", "9"]]})
    assert env.requirements == ["numpy==2.0"]


def test_the_line_submit_prints():
    assert from_imports(set(), set(), {}).describe() .startswith("environment: none")
    env = from_project_files({"requirements.txt": "a\nb\n"}.get)
    assert env.describe(extra=1) == "environment from requirements.txt: 2 packages, plus 1 from --pip"
