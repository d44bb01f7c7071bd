"""The package as users install it: `pip install ./python` builds a wheel holding the whole `ccc`
package, and the installed copy (not this checkout's) reads a library. Needs pip to reach PyPI for
the build backend; skipped when it cannot."""

import os
import shutil
import subprocess
import sys
import tempfile
import unittest
import venv

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE = os.path.join(HERE, "..", "..", "python")
LIBRARY = os.path.join(HERE, "fixtures", "fixture")


class Package(unittest.TestCase):
    def test_the_installed_wheel_reads_a_library(self):
        with tempfile.TemporaryDirectory() as scratch:
            wheels = os.path.join(scratch, "wheels")
            # A copy: setuptools builds in the source tree.
            source = shutil.copytree(PACKAGE, os.path.join(scratch, "source"),
                                     ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
            build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", wheels, source],
                                   capture_output=True, text=True)
            if build.returncode != 0 and "connection" in (build.stdout + build.stderr).lower():
                self.skipTest(f"pip cannot reach the package index: {build.stderr.strip()[-200:]}")
            self.assertEqual(build.returncode, 0, build.stdout + build.stderr)
            [wheel] = os.listdir(wheels)
            self.assertTrue(wheel.startswith("ccc_attn-"), wheel)
            env_dir = os.path.join(scratch, "env")
            venv.create(env_dir, with_pip=True)
            python = os.path.join(env_dir, "bin", "python")
            # --no-deps: torch and cuda-bindings are not needed to read a manifest.
            subprocess.run([python, "-m", "pip", "install", "--no-deps", "-q", os.path.join(wheels, wheel)],
                           check=True, capture_output=True)
            probe = ("import ccc, ccc.driver, os, sys; manifest, ptx = ccc.read_library(sys.argv[1]); "
                     "print(os.path.dirname(ccc.__file__)); print(manifest.spec.name)")
            run = subprocess.run([python, "-c", probe, LIBRARY], capture_output=True, text=True, cwd=scratch)
            self.assertEqual(run.returncode, 0, run.stderr)
            package_dir, name = run.stdout.split()
            self.assertTrue(package_dir.startswith(env_dir), f"ccc imported from {package_dir}")
            self.assertEqual(name, "fixture")


if __name__ == "__main__":
    unittest.main()
