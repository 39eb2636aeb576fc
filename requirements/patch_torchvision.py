"""Make the CUDA-only torchvision wheel importable next to a CPU torch build (run by setup_lerobot.sh).

PyPI carries torchvision only as CUDA builds. Next to CPU torch its compiled ops (``_C.so``) cannot
load (they link libtorch_cuda), which torchvision tolerates, but ``torchvision/_meta_registrations.py``
then registers fake kernels for ``torchvision::nms`` / ``qnms`` unconditionally and the import fails
with "operator torchvision::nms does not exist". LeRobot needs only torchvision's pure-Python parts
(transforms v2, tv_tensors), so this script guards those two registrations behind
``torchvision.extension._has_ops()``, the same guard torchvision already uses for every other op.
Detection ops (nms, roi_align, ...) stay unavailable and raise torchvision's own clear error if called.

Idempotent; exits non-zero when the file does not look as expected (a different torchvision version).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

MARKER = "# scd-policy: fake kernels only when the compiled ops loaded"
GUARD = f"""
{MARKER}
def _register_fake_if_ops(qualname):
    if torchvision.extension._has_ops():
        return torch.library.register_fake(qualname)
    return lambda fn: fn

"""
TARGETS = (
    '@torch.library.register_fake("torchvision::nms")',
    '@torch.library.register_fake("torchvision::qnms")',
)


def main() -> int:
    spec = importlib.util.find_spec("torchvision")  # finds the package without importing it
    if spec is None or spec.origin is None:
        print("patch_torchvision: torchvision is not installed in this environment", file=sys.stderr)
        return 1
    path = Path(spec.origin).parent / "_meta_registrations.py"
    text = path.read_text()
    if MARKER in text:
        print(f"patch_torchvision: {path} already patched")
        return 0
    anchor = "def register_meta("
    missing = [t for t in (anchor, *TARGETS) if t not in text]
    if missing:
        print(f"patch_torchvision: {path} lacks {missing}; unknown torchvision layout", file=sys.stderr)
        return 1
    text = text.replace(anchor, GUARD.lstrip("\n") + anchor, 1)
    for target in TARGETS:
        text = text.replace(
            target, target.replace("@torch.library.register_fake(", "@_register_fake_if_ops(")
        )
    path.write_text(text)
    print(f"patch_torchvision: patched {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
