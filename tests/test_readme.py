"""The README stays true: its plugin example runs, and every hook is documented and tested."""

from __future__ import annotations

import re
import types
from pathlib import Path

import torch

import explainkit
from explainkit import hookspecs
from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def _hook_names():
    return [name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "explainkit_spec")]


def test_plugin_example_runs(fresh_plugins, random_model):
    code = re.search(r"<!-- plugin-example -->\s*```python\n(.*?)```", README, re.S).group(1)
    module = types.ModuleType("my_cams")
    exec(compile(code, "README:my_cams", "exec"), module.__dict__)
    fresh_plugins.register(module, name="my_cams")
    assert "maxgradcam" in explainkit.list_explainers()
    maps = explainkit.get_explainer("maxgradcam", random_model)(torch.randn(2, 3, 32, 32))
    assert maps.shape == (2, 32, 32) and maps.max() <= 1


def test_contributions_tutorial_equals_the_builtin(random_model):
    from explainkit.explainers import LayerCAM

    code = re.search(r"<!-- contributions-example -->\s*```python\n(.*?)```", README, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README:contributions", "exec"), namespace)
    images = torch.randn(3, 3, 32, 32)
    ours = namespace["MyLayerCAM"](random_model, "layer3")
    torch.testing.assert_close(ours(images, targets="all"), LayerCAM(random_model, "layer3")(images, targets="all"))


def test_every_hook_is_documented_and_tested():
    tests = "".join(p.read_text() for p in Path(REPO / "tests").glob("test_*.py"))
    assert _hook_names() == ["register_explainers"]
    for name in _hook_names():
        assert f"`{name}(" in README, f"hook {name} is not documented in the README"
        assert f"def {name}(" in tests.replace(f"def {name}(self", f"def {name}(")


def test_readme_images_exist():
    for path in re.findall(r"\]\((docs/images/[^)]+)\)", README):
        assert (REPO / path).is_file(), path
