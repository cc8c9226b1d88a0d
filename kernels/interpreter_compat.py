"""TRITON_INTERPRET=1 only: Triton 3.6's interpreter keeps scalars as 1-element numpy arrays and converts them
with int(), which numpy >= 2.3 refuses; runtime-bounded `for` loops (range over loaded bounds) need it. Applied
on import of the backend under the interpreter; compiled kernels never see it."""

from __future__ import annotations

import os


def apply() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "keye_scalar_index", False):
        return

    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch.keye_scalar_index = True
    interpreter._patch_lang_tensor = patch
