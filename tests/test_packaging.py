"""setup.py ships every package of the source tree (a package left out of PACKAGES installs
without it: a plain `pip install .` then fails at import)."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _setup_list(name):
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and node.targets[0].id == name:
            return ast.literal_eval(node.value)
    raise AssertionError(f"setup.py defines no {name}")


def test_every_package_of_the_tree_is_in_setup_packages():
    found = {"fastcontrast." + ".".join(p.parent.relative_to(ROOT / "fastcontrast").parts)
             for p in (ROOT / "fastcontrast").rglob("__init__.py")}
    found = {name.rstrip(".") for name in found}
    assert found <= set(_setup_list("PACKAGES")), sorted(found - set(_setup_list("PACKAGES")))
