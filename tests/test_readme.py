"""The README and the plugin tutorial stay true: the README keeps the two commands a fresh machine
needs, the tutorial's examples (docs/plugins.md) run, and every hook is documented and tested."""

from __future__ import annotations

import re
import types
from pathlib import Path

import torch

import explainkit
from explainkit import hookspecs
from tests.conftest import REPO

README = (REPO / "README.md").read_text()
PLUGINS = (REPO / "docs" / "plugins.md").read_text()

# The set-up-and-run command and the test command, exactly; `.ci/run` runs the test command.
MAIN_COMMAND = (
    'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]" -e plugins/explainkit-gradcam-zoo'
    " && mkdir -p ~/.cache/explainkit && tar -xzf ../shared/data/cifar10-jpeg.tar.gz -C ~/.cache/explainkit"
    " && python -m explainkit explain --method gradcam,gradcam++,captum-gradcam --data-dir ~/.cache/explainkit/cifar10-jpeg"
)
TEST_COMMAND = ". .venv/bin/activate && python -m pytest"


def _hook_names():
    return [name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "explainkit_spec")]


def _bash_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S)]


def test_readme_has_the_two_commands():
    blocks = _bash_blocks(README)
    assert MAIN_COMMAND in blocks, "the README's set-up-and-run command changed or is gone"
    assert TEST_COMMAND in blocks, "the README's test command changed or is gone"


def test_ci_runs_the_readme_test_command():
    assert "python -m pytest" in TEST_COMMAND
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert "python -m pytest" in ci, ".ci/run no longer runs the README's test command"


def test_plugin_example_runs(fresh_plugins, random_model):
    code = re.search(r"<!-- plugin-example -->\s*```python\n(.*?)```", PLUGINS, re.S).group(1)
    module = types.ModuleType("my_cams")
    exec(compile(code, "docs/plugins.md:my_cams", "exec"), module.__dict__)
    fresh_plugins.register(module, name="my_cams")
    assert "maxgradcam" in explainkit.list_explainers()
    maps = explainkit.get_explainer("maxgradcam", random_model)(torch.randn(2, 3, 32, 32))
    assert maps.shape == (2, 32, 32) and maps.max() <= 1


def test_contributions_tutorial_equals_the_builtin(random_model):
    from explainkit.explainers import LayerCAM

    code = re.search(r"<!-- contributions-example -->\s*```python\n(.*?)```", PLUGINS, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "docs/plugins.md:contributions", "exec"), namespace)
    images = torch.randn(3, 3, 32, 32)
    ours = namespace["MyLayerCAM"](random_model, "layer3")
    torch.testing.assert_close(ours(images, targets="all"), LayerCAM(random_model, "layer3")(images, targets="all"))


def test_every_hook_is_documented_and_tested():
    tests = "".join(p.read_text() for p in Path(REPO / "tests").glob("test_*.py"))
    assert _hook_names() == ["register_commands", "register_explainers"]
    for name in _hook_names():
        assert f"`{name}(" in PLUGINS, f"hook {name} is not documented in docs/plugins.md"
        assert f"def {name}(" in tests.replace(f"def {name}(self", f"def {name}(")


def test_readme_images_exist():
    paths = re.findall(r"\]\((docs/images/[^)]+)\)", README)
    assert paths, "the README shows no picture"
    for path in paths:
        assert (REPO / path).is_file(), path


def _example(marker: str, name: str) -> types.ModuleType:
    code = re.search(rf"<!-- {marker} -->\s*```python\n(.*?)```", PLUGINS, re.S).group(1)
    module = types.ModuleType(name)
    exec(compile(code, f"docs/plugins.md:{name}", "exec"), module.__dict__)
    return module


def test_plain_function_plugin_example_runs(fresh_plugins, random_model):
    fresh_plugins.register(_example("function-example", "brightness_plugin"), name="brightness_plugin")
    explainer = explainkit.get_explainer("brightness", random_model)
    images = torch.randn(2, 3, 32, 32)
    result = explainer.explain(images, "topk:2")
    assert result.maps.shape == (2, 2, 32, 32) and result.targets.shape == (2, 2)
    assert torch.equal(explainer(images), explainkit.explainers.base.normalize_maps(images.mean(1).relu()))


def test_command_plugin_example_runs(fresh_plugins, capsys):
    from explainkit.cli import main

    fresh_plugins.register(_example("command-example", "count_plugin"), name="count_plugin")
    assert main(["count-methods"]) == 0
    assert capsys.readouterr().out.strip() == str(len(explainkit.list_explainers()))


def test_task_examples_run():
    from tests import task_models

    code = re.search(r"<!-- task-examples -->\s*```python\n(.*?)```", README, re.S).group(1)
    torch.manual_seed(0)
    names = {
        "segmenter": task_models.segmenter(),
        "detector": task_models.detector(),
        "tagger": task_models.tagger(),
        "embedder": task_models.embedder(),
        "images": torch.rand(2, 3, 64, 64),
        "reference": torch.rand(1, 3, 64, 64),
    }
    exec(compile(code, "README.md:task-examples", "exec"), names)
    assert names["region"].maps.shape == names["region"].target.details["mask"].shape == (2, 64, 64)
    boxes = names["boxes"]
    assert boxes.maps.ndim == 4 and boxes.maps.shape[1] == boxes.target.details["boxes"].shape[1] >= 1
    assert names["tags"].maps.shape[:2] == names["tags"].valid.shape
    assert names["alike"].scores.shape == (2,) and names["finer"].maps.shape == (2, 64, 64)
    assert names["mine"].maps.shape == (2, 64, 64) and bool((names["mine"].maps.amax(dim=(1, 2)) > 0).all())
