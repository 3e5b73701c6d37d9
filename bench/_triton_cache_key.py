"""Is a Triton cache compiled on this CPU machine found by the GPU image's Triton? (bench/results/gpu_check.md)

    pip install --no-deps --target /tmp/tr36 'triton==3.6.0'            # the cp311 build: runs here
    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 -d /tmp/whl312 'triton==3.6.0'  # the device's cp312 build
    (mkdir -p /tmp/w312 && cd /tmp/w312 && unzip -q /tmp/whl312/triton-3.6.0-*.whl)
    TRITON_CACHE_DIR=/tmp/tc PYTHONPATH=/tmp/tr36 env -u TRITON_INTERPRET \
        .venv/bin/python bench/_triton_cache_key.py /tmp/w312/triton

Compiles one of our kernels for sm_90 into TRITON_CACHE_DIR, rebuilds triton_key() (runtime/cache.py)
over both builds' files, and compiles the kernel again keyed as the cp312 build would key it.
"""
import hashlib
import os
import sys
import time

import triton
from triton.runtime import cache as tcache
from llm_lru.kernels.common import aot
print("triton", triton.__version__, triton.__file__)
v = aot.Variant("block_fwd", 4, "softmax", "bf16", False, True)
fn, constexprs, nw = aot.kernel_spec(v)
t0 = time.time()
aot.compile_cubin(fn, constexprs, "bf16", 90, nw)
print(f"compiled block_fwd m=4 softmax bf16 for sm_90 in {time.time() - t0:.1f} s")
d = os.environ["TRITON_CACHE_DIR"]
print("cache dirs:", sorted(os.listdir(d)))
here = tcache.triton_key()
# the same function over the cp312 wheel's files (what the device's Python 3.12 loads)
root312 = sys.argv[1]
def key_over(path):
    import pkgutil, sysconfig
    contents = [hashlib.sha256(open(os.path.join(path, "runtime", "cache.py"), "rb").read()).hexdigest()]
    for sub, prefix in (("compiler", "triton.compiler."), ("backends", "triton.backends.")):
        for lib in pkgutil.walk_packages([os.path.join(path, sub)], prefix=prefix):
            contents.append(hashlib.sha256(open(lib.module_finder.find_spec(lib.name).origin, "rb").read()).hexdigest())
    contents.append(hashlib.sha256(open(os.path.join(path, "_C", "libtriton.so"), "rb").read()).hexdigest())
    for lib in pkgutil.walk_packages([os.path.join(path, "language")], prefix="triton.language."):
        contents.append(hashlib.sha256(open(lib.module_finder.find_spec(lib.name).origin, "rb").read()).hexdigest())
    return f"{triton.__version__}" + "-".join(contents), contents
k_here, c_here = key_over(os.path.dirname(triton.__file__))
k_312, c_312 = key_over(root312)
print("replicated triton_key equals triton's own here:", k_here == here)
print("parts that differ between cp311 and cp312:", [i for i, (a, b) in enumerate(zip(c_here, c_312)) if a != b], "of", len(c_here))
print("triton_key here == on the device:", k_here == k_312)
from triton.backends.compiler import GPUTarget
be = triton.compiler.make_backend(GPUTarget("cuda", 90, 32))
print("backend.hash() (ptxas version + arch):", be.hash().replace("\n", " | ")[:200])
print("sha256(triton_key) here (cp311):", hashlib.sha256(k_here.encode()).hexdigest())
print("sha256(triton_key) cp312 wheel :", hashlib.sha256(k_312.encode()).hexdigest())
# the same kernel, keyed as the device's Triton would key it: another cache folder
tcache.triton_key = lambda: k_312
os.environ["TRITON_CACHE_DIR"] = d + "_as312"
from triton import knobs
knobs.cache.dir = d + "_as312"
aot.compile_cubin(fn, constexprs, "bf16", 90, nw)
print("folder under the cp312 key:", sorted(os.listdir(d + "_as312")))
a = open(os.path.join(d, sorted(os.listdir(d))[0], "_block_fwd_kernel.cubin"), "rb").read()
b = open(os.path.join(d + "_as312", sorted(os.listdir(d + "_as312"))[0], "_block_fwd_kernel.cubin"), "rb").read()
print("cubins identical:", a == b, len(a))
