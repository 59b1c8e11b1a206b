"""Check a CUDA wheel of memllm-kernels: every package of the source tree is in it, and its one extension
module carries sm_90 code and PTX. Unpacks it into OUT (for tests run against the wheel's own files).

    python .ci/check_wheel.py WHEEL OUT CUOBJDUMP
"""

import pathlib
import subprocess
import sys
import zipfile

wheel, out, cuobjdump = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
root = pathlib.Path(__file__).resolve().parent.parent
with zipfile.ZipFile(wheel) as z:
    names = set(z.namelist())
    z.extractall(out)
want = {str(p.relative_to(root)) for p in (root / "memllm_kernels").rglob("__init__.py")}
missing = sorted(want - names)
assert not missing, f"{wheel.name} lacks packages: {missing}"
sos = sorted(n for n in names if n.startswith("memllm_kernels/_C") and n.endswith(".so"))
assert len(sos) == 1, f"{wheel.name}: expected one extension module, found {sos}"
assert ".abi3." in sos[0] and "-abi3-" in wheel.name, f"{wheel.name}: not a limited-API (abi3) wheel: {sos}"
elf = subprocess.run([cuobjdump, "--list-elf", str(out / sos[0])], capture_output=True, text=True, check=True).stdout
assert "sm_90.cubin" in elf, f"{sos[0]} in {wheel.name} has no sm_90 code:\n{elf}"
# PTX too (TORCH_CUDA_ARCH_LIST=9.0+PTX): GPUs newer than sm_90 JIT-compile it
ptx = subprocess.run([cuobjdump, "--list-ptx", str(out / sos[0])], capture_output=True, text=True, check=True).stdout
assert "sm_90.ptx" in ptx, f"{sos[0]} in {wheel.name} has no PTX:\n{ptx}"
print(f"{wheel.name}: {len(want)} packages, {sos[0]} with sm_90 code and PTX ({wheel.stat().st_size / 2**20:.1f} MiB)")
