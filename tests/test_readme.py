"""The README's two commands are what CI and users run: keep them and their claims true."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def first_block() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.search(r"```bash\n(.*?)```", text, re.S).group(1).strip().splitlines()


def test_readme_starts_with_the_quickstart_and_the_test_command():
    setup, tests = first_block()
    assert setup == "pip install -e . && usi quickstart"
    assert tests == "pip install -e '.[test]' -c .ci/constraints.txt && pytest"


def test_the_test_command_pins_what_the_suite_passed_with_and_the_main_install_does_not():
    pins = {}
    for line in (REPO / ".ci" / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[name.lower().replace("_", "-")] = version
    for package in ("torch", "torchvision", "timm", "numpy", "pillow", "pytest", "pytest-xdist", "webdataset",
                    "simplejpeg", "safetensors", "pyyaml"):
        assert package in pins, f"constraints.txt does not pin {package}"
    assert "usi" not in pins  # the project itself is installed from the checkout
    # the main install keeps ranges: no exact pin in the project's own dependencies
    assert "==" not in (REPO / "pyproject.toml").read_text()
    newest = (REPO / ".ci" / "newest").read_text()
    (install,) = [line for line in newest.splitlines() if "pip install --quiet -e '.[test]'" in line]
    assert " -c " not in install  # .ci/newest tries the newest releases: no constraints


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert "sed -n 2p" in ci and 'eval "$cmd"' in ci and "set -euo pipefail" in ci


def test_readme_names_every_module_of_the_package():
    text = (REPO / "README.md").read_text()
    for path in (REPO / "usi").rglob("*.py"):
        if path.name not in ("__init__.py", "__main__.py", "errors.py", "progress.py"):
            assert path.name in text, f"README architecture section misses {path.name}"


def readme_command(start: str) -> list[str]:
    """The README's inline `usi train ...` example that starts with `start`, split as a shell would."""
    import shlex

    text = " ".join((REPO / "README.md").read_text().split())  # inline examples wrap across lines
    return shlex.split(re.search(re.escape(start) + r"[^`]*", text).group(0))[3:]  # after `usi train recipe`


def test_the_ensemble_and_feature_examples_are_valid_recipes():
    import timm
    import torch

    from usi import recipe as R
    ensemble = readme_command("usi train recipes/usi.yaml model.name=resnet50 teacher.name=resnet101")
    tree = R.read_yaml(REPO / "recipes" / "usi.yaml")
    for item in ensemble:
        R.set_dotted(tree, *R.parse_override(item))
    recipe = R.from_dict(tree)  # not validated: the example's weight files do not exist here
    assert [t.name for t in recipe.teachers()] == ["resnet101", "convnext_base", "vit_base_patch16_224"]
    feature = R.load(REPO / "recipes" / "usi.yaml", readme_command(
        "usi train recipes/usi.yaml model.name=resnet50 features.student"))
    with torch.device("meta"):  # the named modules exist in the student and in the default teacher
        student, teacher = timm.create_model("resnet50"), timm.create_model(feature.teacher.name.split(".")[0])
    assert feature.features.student in dict(student.named_modules())
    assert feature.features.teacher in dict(teacher.named_modules())
