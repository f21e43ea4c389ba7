# Sourced by the GPU scripts (gpu_checks.sh, gpu_options.sh): the GPU image has torch, transformers, peft, timm,
# tokenizers, scipy and scikit-image, not the rest of our pinned packages. They travel as wheels in .whl/
# (ignored by git), made here with `bash benchmarks/gpu_env.sh download` (Python 3.12, manylinux x86-64).
# gpu_checks.sh needs the first three (it feeds the model arrays, no image files); gpu_options.sh reads built
# datasets and also needs SimpleITK and nibabel: `GPU_WHEELS="... SimpleITK nibabel" bash benchmarks/gpu_env.sh
# download`, though SimpleITK's 53 MB wheel and the 17 MB work tree exceed the 64 MiB a lease carries.
GPU_WHEELS=${GPU_WHEELS:-"segment-anything==1.0 monai==1.6.1 cachetools"}
if [ "${1:-}" = download ]; then
    mkdir -p .whl
    for w in $GPU_WHEELS; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            --platform any -d .whl "$w" || exit 1
    done
    ls .whl
else
    if ls .whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    fi
    export PYTHONPATH=/tmp/site:$PWD/trainer${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
fi
