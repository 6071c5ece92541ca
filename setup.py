"""The wheel carries the built-in recipes inside the package (usi/recipes/), copied at build time from
recipes/ at the top of the repository, which stays the one copy people read and edit."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithRecipes(build_py):
    def run(self):
        # setuptools never empties build/lib: a module moved or removed since an earlier build would ship
        # beside its new home (usi/train.py next to usi/training/loop.py). Build the package afresh.
        shutil.rmtree(Path(self.build_lib) / "usi", ignore_errors=True)
        super().run()
        target = Path(self.build_lib) / "usi" / "recipes"
        target.mkdir(parents=True, exist_ok=True)
        recipes = Path(__file__).resolve().parent / "recipes"
        for recipe in sorted(recipes.glob("*.yaml")) + sorted(recipes.glob("tables/*.yaml")):
            (target / recipe.relative_to(recipes)).parent.mkdir(parents=True, exist_ok=True)
            (target / recipe.relative_to(recipes)).write_bytes(recipe.read_bytes())


setup(cmdclass={"build_py": BuildWithRecipes})
