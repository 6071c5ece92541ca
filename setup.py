"""The wheel carries the built-in recipes inside the package (usi/recipes/), copied at build time from
recipes/ at the top of the repository, which stays the one copy people read and edit."""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithRecipes(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / "usi" / "recipes"
        target.mkdir(parents=True, exist_ok=True)
        for recipe in sorted(Path(__file__).resolve().parent.joinpath("recipes").glob("*.yaml")):
            (target / recipe.name).write_bytes(recipe.read_bytes())


setup(cmdclass={"build_py": BuildWithRecipes})
