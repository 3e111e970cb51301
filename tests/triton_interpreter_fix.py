"""Imported first by every script that ``conftest.run_in_triton_interpreter`` runs in Triton's CPU interpreter.

Triton 3.6's interpreter turns a scalar tensor into a loop bound with ``int()`` of a one-element array, which numpy
2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars", triton-lang/triton#9171): any
``tl.range`` over bounds known only at run time then fails there, though it compiles for the GPU. This takes the
one element instead, as the fix upstream does. A Triton without the patched helper is left as it is.
"""

from triton.runtime import interpreter

_patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)


def _patch_tensor_with_scalar_index(tensor, scope) -> None:
    _patch_tensor(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))


if _patch_tensor is not None:
    interpreter._patch_lang_tensor = _patch_tensor_with_scalar_index
