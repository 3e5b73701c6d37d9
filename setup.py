"""Everything is in pyproject.toml except one file setuptools cannot place from there: the .pth
that registers `llm_lru` with lm-eval at interpreter start (llm_lru/lm_eval_hook.py), which must
sit at the top of site-packages, for wheels and for editable installs alike."""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "llm_lru_lm_eval.pth"


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        src = str(Path(__file__).parent / PTH)
        self.copy_file(src, str(Path(self.build_lib) / PTH), preserve_mode=False)
        if getattr(self, "editable_mode", False):
            # An editable wheel is built from the install dir, not build_lib (setuptools'
            # editable_wheel points install_lib at the unpacked wheel).
            install_lib = self.get_finalized_command("install").install_lib
            if install_lib:
                self.copy_file(src, str(Path(install_lib) / PTH), preserve_mode=False)


setup(cmdclass={"build_py": BuildPyWithPth})
