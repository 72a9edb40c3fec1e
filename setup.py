"""setuptools puts no ``.pth`` file into site-packages by itself; this adds ``hf_weightforces.pth``
(the zero-code switch's start-up hook, docs/zero-code.md) to every wheel's root, which pip
installs into site-packages.  Everything else is in pyproject.toml.

* a wheel (``pip install .``): ``build_py`` copies it to ``build_lib``, the wheel's root;
* an editable wheel (``pip install -e .``, PEP 660): setuptools' ``editable_wheel`` points the
  ``install`` command's ``install_lib`` at the unpacked editable wheel, where it writes the files
  that are installed as they are (data, scripts); the ``.pth`` goes there too.

Where neither happens (an old setuptools, a ``--target`` install), ``hf-weightforces run`` still
works: it puts ``hf_weightforces/_hook/sitecustomize.py`` on the child's ``PYTHONPATH``.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = Path(__file__).resolve().parent / "hf_weightforces" / "_hook" / "hf_weightforces.pth"


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            target = getattr(self.distribution.get_command_obj("install"), "install_lib", None)
            if not target:
                self.warn(f"{PTH.name} not installed (no editable wheel folder): HF_WEIGHTFORCES=1 has no effect, "
                          "`hf-weightforces run` still works")
                return
        else:
            target = self.build_lib
        self.mkpath(target)
        self.copy_file(str(PTH), str(Path(target) / PTH.name), preserve_mode=False)


setup(cmdclass={"build_py": BuildPyWithPth})
