"""Triton kernel checks on the CPU: Triton's interpreter must be switched on before triton is
first imported (transformers imports it), so a test runs its own file as a script in a
subprocess (`run_as_script`), whose `__main__` calls `patch_for_numpy2()` and then the checks."""

from __future__ import annotations

import os
import subprocess
import sys


def patch_for_numpy2() -> None:
    """Triton 3.6's interpreter calls int() on 1-element arrays, which NumPy >= 2.4 refuses."""
    import triton.runtime.interpreter as interp

    original = interp._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patched


def run_as_script(path: str, timeout: int) -> subprocess.CompletedProcess:
    """Run a test file's `__main__` under the interpreter; fails with its output's tail."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, path], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done
