"""The one custom build step (everything else is in pyproject.toml): put `hfpipe_launch_hook.pth` at the top of
site-packages, where `site` runs it at every interpreter start (see src/hfpipe_launch_hook.py).

setuptools cannot ship a .pth from configuration alone: data files are not installed by editable installs
(PEP 660 makes no provision for them), and those are the installs that matter here (scripts/setup.sh).
"""

from __future__ import annotations

import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))
from hfpipe_launch_hook import PTH_LINE  # noqa: E402 (the module is the one source of the line)

PTH_NAME = "hfpipe_launch_hook.pth"


class BuildPyWithPth(build_py):
    """build_py that also writes the .pth into the root of the wheel, or of the editable wheel."""

    def run(self) -> None:
        """Build as usual, then write the .pth."""
        super().run()
        # A wheel is made from build_lib; an editable wheel from the dir editable_wheel set as install_lib (it
        # copies nothing from build_lib).
        root = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(root, PTH_NAME), "w", encoding="utf-8") as file:
            file.write(PTH_LINE)


setup(cmdclass={"build_py": BuildPyWithPth})
